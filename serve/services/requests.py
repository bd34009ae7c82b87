"""What a generation request is, whatever API it came from, and the limits on it.

Transports (gRPC, HTTP) translate their messages into a `GenerateCall`, checking the sizes that
scale work or memory from their counts first (`check_sizes`), and the service's `Chunk`s back
into their answers (`collect` for a whole one).
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from mora.files import json_depth
from serve.errors import InvalidRequest, Unavailable

__all__ = ["CHAT_ROLES", "MAX_CHOICES", "MAX_CONSTRAINT_BYTES", "MAX_LOGIT_BIAS", "MAX_MESSAGES", "MAX_N", "MAX_SCHEMA_DEPTH",
           "MAX_STOP", "MAX_STOP_TOKEN_IDS", "ChatMessage", "Choice", "Chunk", "Constraint", "ConstraintKind", "GenerateCall",
           "Sampling", "TokenLogprob", "check_constraint", "check_sampling", "check_sizes", "check_text", "collect"]

log = logging.getLogger(__name__)
# Sizes that scale a request's work or memory, checked by the transports before they copy
# anything of that size out of a message (`check_sizes`) and again here.
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID = 128
MAX_N = 16
MAX_MESSAGES = 256
MAX_PROMPT_TOKENS = 1 << 20  # a static bound for transports; the engine's context is checked too
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
# Structured outputs: the text of a JSON schema, regex or grammar, and a choice list, are bounded
# before the engine compiles them (compilation time and memory grow with them); schemas nest at
# most as deep as adapter configs may (mora/checkpoint.py).
MAX_CONSTRAINT_BYTES = 64 << 10
MAX_CHOICES = 256
MAX_SCHEMA_DEPTH = 32
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
SEED_MAX = (1 << 63) - 1


def check_sizes(*, n: int = 1, stop: int = 0, stop_token_ids: int = 0, messages: int = 0, prompt_tokens: int = 0,
                request_id: int = 0) -> None:
    """Refuse a request whose sizes exceed the limits, from its counts alone (nothing copied yet)."""
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be between 1 and {MAX_N}")
    if stop > MAX_STOP:
        raise InvalidRequest(f"stop: at most {MAX_STOP} strings")
    if stop_token_ids > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids")
    if messages > MAX_MESSAGES:
        raise InvalidRequest(f"messages: give 1 to {MAX_MESSAGES} chat messages")
    if prompt_tokens > MAX_PROMPT_TOKENS:
        raise InvalidRequest(f"prompt_token_ids: at most {MAX_PROMPT_TOKENS} token ids")
    if request_id > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID} characters")


def check_text(name: str, text: str, max_bytes: int) -> None:
    """`text` must be valid Unicode (no lone surrogates, which JSON's \\u escapes can carry) of at
    most `max_bytes` UTF-8 bytes; the error names the problem and where."""
    if len(text) > max_bytes:  # a character is at least one byte: no need to encode to refuse
        raise InvalidRequest(f"{name} is longer than {max_bytes} bytes")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{name} is not valid Unicode text: a lone surrogate (U+{ord(text[e.start]):04X}) "
                             f"at character {e.start}") from None
    if size > max_bytes:
        raise InvalidRequest(f"{name} is longer than {max_bytes} bytes")


class ConstraintKind(enum.Enum):
    """What a structured-output constraint is (vLLM's structured-output backends compile each)."""

    JSON_SCHEMA = "json_schema"  # `spec`: the schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"  # `spec`: the pattern
    CHOICE = "choice"  # `choices`: the text is exactly one of them
    GRAMMAR = "grammar"  # `spec`: an EBNF (GBNF) or Lark grammar


@dataclass(frozen=True)
class Constraint:
    """Every generated text of a request must match this (whatever adapter serves it)."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()


def check_constraint(c: Constraint) -> Constraint:
    """`c` within the limits (sizes, schema depth, valid text); the engine compiles it, and what it
    cannot compile is INVALID_ARGUMENT with its reason (serve/engine)."""
    what = c.kind.value
    if c.kind is ConstraintKind.CHOICE:
        if not 1 <= len(c.choices) <= MAX_CHOICES:
            raise InvalidRequest(f"choice: give 1 to {MAX_CHOICES} choices")
        if sum(len(x) for x in c.choices) > MAX_CONSTRAINT_BYTES:
            raise InvalidRequest(f"choice: the choices together are longer than {MAX_CONSTRAINT_BYTES} bytes")
        for i, x in enumerate(c.choices):
            check_text(f"choice[{i}]", x, MAX_CONSTRAINT_BYTES)
        return c
    if c.kind is ConstraintKind.JSON_OBJECT:
        return c
    check_text(what, c.spec, MAX_CONSTRAINT_BYTES)
    if not c.spec.strip():
        raise InvalidRequest(f"{what} is empty")
    if c.kind is ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(c.spec)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidRequest(f"json_schema is not valid JSON: {str(e)[:120]}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("json_schema must be a JSON object (a JSON Schema)")
        if json_depth(schema) > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"json_schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    return c


@dataclass
class Sampling:
    """Sampling options with vLLM's meaning; None takes vLLM's default."""

    max_tokens: int | None = 16  # None: up to the end of the context
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    n: int = 1  # completions per prompt
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k most likely
    constraint: Constraint | None = None  # structured output: what the text must match
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100 to 100)


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class GenerateCall:
    """One generation request, whatever API it came from. Exactly one of `prompt`,
    `prompt_token_ids` and `messages` (rendered with the tokenizer's chat template)."""

    adapter_id: str | None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = ""


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob), most likely first


@dataclass
class Chunk:
    """New output of choice `index` (one of `n`); the last chunk of a choice has its finish reason,
    the last chunk of the request its usage (`final`)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str = ""
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str = ""


async def collect(chunks: AsyncIterator[Chunk], n: int) -> tuple[list[Choice], Chunk]:
    """A whole answer from its stream: the `n` choices, and the final chunk (usage)."""
    # Choices appear as the engine reports them (never `n` allocated up front: n is checked by
    # the service, which this stream only runs after).
    by_index: dict[int, Choice] = {}
    text: dict[int, list[str]] = {}
    last: Chunk | None = None
    async for chunk in chunks:
        c = by_index.get(chunk.index)
        if c is None:
            c = by_index[chunk.index] = Choice(chunk.index)
            text[chunk.index] = []
        text[chunk.index].append(chunk.text)
        c.token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            c.logprobs = (c.logprobs or []) + chunk.logprobs
        if chunk.finish_reason is not None:
            c.finish_reason, c.stop_reason = chunk.finish_reason, chunk.stop_reason
        last = chunk
    if last is None or not last.final:
        raise Unavailable("the engine ended the request without an answer")
    choices = [by_index.get(i) or Choice(i) for i in range(min(n, MAX_N))]
    for c in choices:
        c.text = "".join(text.get(c.index, []))
    return choices, last


def _finite(name: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise InvalidRequest(f"{name} is {value!r} (NaN or infinite); give a finite number")
    return value


def check_sampling(sp: Sampling, max_tokens_left: int, max_logprobs: int) -> Sampling:
    """`sp` validated and resolved for a prompt that leaves `max_tokens_left` tokens of context:
    bad values are INVALID_ARGUMENT naming the field; `max_tokens` is resolved (None: to the
    end of the context), and greedy `n > 1` becomes top-1 sampling (the same tokens)."""
    if sp.max_tokens is not None and sp.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1")
    max_tokens = max_tokens_left if sp.max_tokens is None else min(sp.max_tokens, max_tokens_left)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        _finite(name, getattr(sp, name))
    if sp.seed is not None and not 0 <= sp.seed <= SEED_MAX:
        raise InvalidRequest(f"seed must be between 0 and {SEED_MAX}")
    check_sizes(n=sp.n, stop=len(sp.stop), stop_token_ids=len(sp.stop_token_ids))
    if any(len(s) > MAX_STOP_CHARS or not s for s in sp.stop):
        raise InvalidRequest(f"stop: at most {MAX_STOP} non-empty strings of <= {MAX_STOP_CHARS} characters")
    for s in sp.stop:
        check_text("stop", s, 4 * MAX_STOP_CHARS)
    if sp.min_tokens and sp.min_tokens > max_tokens:
        raise InvalidRequest("min_tokens exceeds max_tokens (or the context left)")
    if sp.logprobs is not None and not 0 <= sp.logprobs <= max_logprobs:
        raise InvalidRequest(f"logprobs (top_logprobs) must be between 0 and {max_logprobs}")
    if sp.constraint is not None:
        check_constraint(sp.constraint)
    if len(sp.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
    for token, bias in sp.logit_bias.items():
        if _finite(f"logit_bias[{token}]", bias) is not None and not -100 <= bias <= 100:
            raise InvalidRequest(f"logit_bias[{token}] must be between -100 and 100")
    resolved = replace(sp, max_tokens=max_tokens, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                       logit_bias=dict(sp.logit_bias))
    if sp.n > 1 and (sp.temperature if sp.temperature is not None else 1.0) < 1e-5:
        # vLLM refuses n > 1 with greedy decoding; OpenAI's API answers n identical greedy
        # completions. Top-1 sampling picks the argmax at every step: the same tokens.
        resolved = replace(resolved, temperature=1.0, top_k=1, top_p=1.0, min_p=0.0)
    return resolved
