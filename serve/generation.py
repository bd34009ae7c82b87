"""The generate pipeline shared by every front end (gRPC and the OpenAI-compatible HTTP API):
authenticate, admit, validate, lease the adapter, stream from the engine.

Front ends translate their messages into a `GenerateCall` and the `Chunk`s back; everything
else (tenants, quotas, merge policy, metrics, error classes) happens here, once. Every
request's outcome is counted per adapter and tenant, with its latency profile (time to first
token, time per output token, queue wait, end to end). A cancelled call or an expired deadline
aborts the engine request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from serve.config import ServerSettings
from serve.engine import Engine
from serve.errors import InvalidRequest, NonFiniteOutput, ResourceExhausted, Unavailable, status_for
from serve.metrics import UNKNOWN, ServerMetrics
from serve.policy import MergePolicy
from serve.registry import AdapterRegistry
from serve.tenants import Tenant, TenantDirectory
from serve.validation import check_adapter_id

__all__ = ["ChatMessage", "Choice", "Chunk", "GenerateCall", "GenerationService", "Sampling", "TokenLogprob", "check_sizes",
           "check_text", "collect"]

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


def sampling_params(sp: Sampling, max_tokens_left: int, max_logprobs: int) -> Any:
    """vLLM `SamplingParams`; bad values are INVALID_ARGUMENT naming the field."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    # logprobs=0 at least: the sampled token's log-probability, from which the server tells when a
    # request's logits became non-finite (and stops it alone; see docs/security.md).
    kw: dict[str, Any] = {"output_kind": RequestOutputKind.DELTA, "logprobs": 0}
    if sp.max_tokens is not None and sp.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1")
    kw["max_tokens"] = max_tokens_left if sp.max_tokens is None else min(sp.max_tokens, max_tokens_left)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = _finite(name, getattr(sp, name))
        if value is not None:
            kw[name] = value
    if sp.top_k is not None:
        kw["top_k"] = sp.top_k
    if sp.seed is not None:
        if not 0 <= sp.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be between 0 and {SEED_MAX}")
        kw["seed"] = sp.seed
    check_sizes(n=sp.n, stop=len(sp.stop), stop_token_ids=len(sp.stop_token_ids))
    if any(len(s) > MAX_STOP_CHARS or not s for s in sp.stop):
        raise InvalidRequest(f"stop: at most {MAX_STOP} non-empty strings of <= {MAX_STOP_CHARS} characters")
    for s in sp.stop:
        check_text("stop", s, 4 * MAX_STOP_CHARS)
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    if sp.min_tokens:
        if sp.min_tokens > kw["max_tokens"]:
            raise InvalidRequest("min_tokens exceeds max_tokens (or the context left)")
        kw["min_tokens"] = sp.min_tokens
    kw["skip_special_tokens"] = sp.skip_special_tokens
    kw["n"] = sp.n
    if sp.n > 1 and kw.get("temperature", 1.0) < 1e-5:
        # vLLM refuses n > 1 with greedy decoding; OpenAI's API answers n identical greedy
        # completions. Top-1 sampling picks the argmax at every step: the same tokens.
        kw.update(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0)
    if sp.logprobs is not None:
        if not 0 <= sp.logprobs <= max_logprobs:
            raise InvalidRequest(f"logprobs (top_logprobs) must be between 0 and {max_logprobs}")
        kw["logprobs"] = sp.logprobs
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError, OverflowError, VLLMClientError) as e:
        raise InvalidRequest(f"invalid sampling parameters: {e}") from None


class GenerationService:
    def __init__(self, settings: ServerSettings, engine: Engine, registry: AdapterRegistry, tenants: TenantDirectory,
                 metrics: ServerMetrics, policy: MergePolicy) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tenants = tenants
        self.metrics = metrics
        self.policy = policy
        self.pending = 0
        self.per_tenant: dict[str, int] = {}
        self.draining = asyncio.Event()  # set at shutdown: new calls are refused UNAVAILABLE
        self._live: set[str] = set()
        self._shutdown_aborted: set[str] = set()

    def _check_text(self, name: str, text: str) -> None:
        check_text(name, text, self.settings.max_prompt_bytes)

    async def _prompt(self, call: GenerateCall) -> list[int]:
        given = [x for x in (call.prompt, call.prompt_token_ids, call.messages) if x is not None]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of a prompt, prompt token ids or chat messages")
        if call.prompt_token_ids is not None:
            ids = list(call.prompt_token_ids)
            bad = [i for i in ids if not 0 <= i < self.engine.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (size {self.engine.vocab_size})")
        elif call.prompt is not None:
            self._check_text("prompt", call.prompt)
            # Tokenizing a long prompt takes a while: off the event loop, so other calls keep flowing.
            ids = await asyncio.to_thread(self.engine.tokenize, call.prompt)
        else:
            messages = call.messages or []
            if not messages or len(messages) > MAX_MESSAGES:
                raise InvalidRequest(f"messages: give 1 to {MAX_MESSAGES} chat messages")
            for m in messages:
                if m.role not in CHAT_ROLES:
                    raise InvalidRequest(f"messages: unknown role {m.role[:32]!r} (one of {', '.join(CHAT_ROLES)})")
            if sum(len(m.content) for m in messages) > self.settings.max_prompt_bytes:
                raise InvalidRequest(f"messages is longer than {self.settings.max_prompt_bytes} bytes")
            for i, m in enumerate(messages):
                self._check_text(f"messages[{i}].content", m.content)
            self._check_text("messages", "".join(m.content for m in messages))
            ids = await asyncio.to_thread(self.engine.render_chat, [{"role": m.role, "content": m.content} for m in messages])
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.engine.max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the model's context is {self.engine.max_model_len}")
        return ids

    @contextlib.contextmanager
    def _admit(self, tenant: Tenant, sequences: int) -> Any:
        """Hold `sequences` (a request's `n`) of the server's and the tenant's concurrency: quotas
        count sequences, the unit of engine work, not requests."""
        if self.pending + sequences > self.settings.max_pending_requests:
            raise ResourceExhausted(f"server overloaded: {self.pending} sequences in progress; retry later")
        mine = self.per_tenant.get(tenant.name, 0)
        if mine + sequences > tenant.max_concurrent_requests:
            raise ResourceExhausted(f"tenant {tenant.name!r} already has {mine} sequences in progress; {sequences} more "
                                    f"would exceed its limit of {tenant.max_concurrent_requests} (each of n counts)")
        self.pending += sequences
        self.per_tenant[tenant.name] = mine + sequences
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.pending -= sequences
            self.per_tenant[tenant.name] -= sequences
            self.metrics.in_flight.dec()

    async def run(self, call: GenerateCall, tenant: Tenant, method: str,
                  cancelled: Callable[[], bool] | None = None) -> AsyncIterator[Chunk]:
        """The answer's chunks for `tenant` (authenticated by the transport); raises `ServeError`s
        (the transport maps them to its status codes). `cancelled`: whether the transport saw
        the client cancel (then the request counts as CANCELLED)."""
        arrival = time.perf_counter()
        tenant_name, adapter_id = tenant.name, call.adapter_id or None
        # Metric labels carry only what authentication and authorization vouched for: an id the
        # caller may not use (or that is not loaded) never becomes a label.
        adapter_label, owner = (UNKNOWN if adapter_id is not None else None), None
        code = grpc.StatusCode.OK
        try:
            sp = call.sampling
            check_sizes(n=sp.n, stop=len(sp.stop), stop_token_ids=len(sp.stop_token_ids),
                        messages=len(call.messages or ()), prompt_tokens=len(call.prompt_token_ids or ()),
                        request_id=len(call.request_id))
            if self.draining.is_set():
                raise Unavailable("the server is shutting down")
            if adapter_id is not None:
                check_adapter_id(adapter_id)
                entry = await self.registry.resolve(adapter_id, tenant)  # registers it on first use for lazy tenants
                adapter_label, owner = adapter_id, entry.tenant
            else:
                self.tenants.check_base(tenant)
            with self._admit(tenant, sp.n):
                if not self.engine.ready:
                    raise Unavailable("the engine is not serving")
                ids = await self._prompt(call)
                params = sampling_params(call.sampling, self.engine.max_model_len - len(ids), self.engine.max_logprobs)
                async with contextlib.AsyncExitStack() as stack:
                    lora = None
                    if adapter_id is not None:
                        lora = (await stack.enter_async_context(self.registry.lease(adapter_id, tenant))).lora_request
                    if self.settings.auto_merge:  # nothing reads the request log otherwise: keep none
                        self.policy.observe(adapter_id, time.monotonic())
                    # Past the gate, this request never shares a step with another adapter's merge.
                    await stack.enter_async_context(self.registry.gate.admit(lora.lora_int_id if lora else None))
                    labels = self.metrics.labels(adapter_label, tenant_name, owner)
                    async for chunk in self._stream(call, ids, params, lora, labels, arrival):
                        yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: the client cancelled a stream between two messages.
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_for(exc)[0]
            if self.engine.dead and code == grpc.StatusCode.INTERNAL:
                code = grpc.StatusCode.UNAVAILABLE
                raise Unavailable("the engine stopped while serving this request") from exc
            raise
        finally:
            if code == grpc.StatusCode.OK and cancelled is not None and cancelled():
                code = grpc.StatusCode.CANCELLED
            a, t = self.metrics.labels(adapter_label, tenant_name, owner)
            self.metrics.requests.labels(a, t, method, code.name).inc()
            self.metrics.request_duration.labels(a, t, code.name).observe(time.perf_counter() - arrival)

    async def abort_all(self) -> int:
        """Shutdown: abort every request still running; they end with UNAVAILABLE."""
        self.draining.set()
        live = list(self._live)
        for rid in live:
            self._shutdown_aborted.add(rid)
            await self.engine.abort(rid)
        return len(live)

    def _logprobs(self, token_ids: list[int], steps: Any) -> list[TokenLogprob]:
        """vLLM's per-step {token id: Logprob} (the sampled token and the top k) as TokenLogprobs."""
        out = []
        for tid, step in zip(token_ids, steps, strict=True):
            def text(i: int, lp: Any) -> str:
                return lp.decoded_token if lp.decoded_token is not None else self.engine.decode_token(i)

            ranked = sorted(((lp.rank, i, lp) for i, lp in step.items() if lp.rank is not None), key=lambda x: x[0])
            chosen = step[tid]
            top = [(i, text(i, lp), float(lp.logprob)) for _, i, lp in ranked]  # the caller keeps its k
            out.append(TokenLogprob(tid, text(tid, chosen), float(chosen.logprob), top))
        return out

    async def _stream(self, call: GenerateCall, ids: list[int], params: Any, lora: Any, labels: tuple[str, str],
                      arrival: float) -> AsyncIterator[Chunk]:
        rid = call.request_id or uuid.uuid4().hex
        engine_rid = uuid.uuid4().hex  # unique in the engine whatever clients send
        a, t = labels
        want_logprobs = call.sampling.logprobs is not None  # the engine always returns the sampled token's
        top_k = call.sampling.logprobs or 0
        last_token_at: float | None = None
        first_token_at = 0.0
        completion = 0
        finished = False
        self._live.add(engine_rid)
        try:
            async for out in self.engine.generate(engine_rid, ids, params, lora):
                if engine_rid in self._shutdown_aborted:
                    raise Unavailable("the server shut down before the request completed")
                now = time.perf_counter()
                new_total = sum(len(c.token_ids) for c in out.outputs)
                if new_total:
                    if last_token_at is None:
                        self.metrics.ttft.labels(a, t).observe(now - arrival)
                        m = out.metrics
                        if m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "queued_ts", 0):
                            self.metrics.queue_wait.labels(a, t).observe(max(0.0, m.scheduled_ts - m.queued_ts))
                        first_token_at = now
                    else:
                        gap = (now - last_token_at) / new_total
                        for _ in range(new_total):
                            self.metrics.itl.labels(a, t).observe(gap)
                    last_token_at = now
                for c in out.outputs:
                    if c.logprobs and not all(math.isfinite(lp.logprob) for step in c.logprobs for lp in step.values()):
                        raise NonFiniteOutput(
                            "the model's outputs became non-finite (NaN or inf) for this request"
                            + (f" with adapter {call.adapter_id!r}" if call.adapter_id else "")
                            + "; it was stopped (other requests are unaffected)")
                completion += new_total
                chunks = []
                for c in out.outputs:
                    new = list(c.token_ids)
                    chunk = Chunk(rid, c.text, new, index=c.index)
                    if want_logprobs:
                        lps = self._logprobs(new, c.logprobs or [])
                        for lp in lps:
                            lp.top = lp.top[:top_k]
                        chunk.logprobs = lps
                    if c.finish_reason is not None:
                        chunk.finish_reason = c.finish_reason
                        chunk.stop_reason = "" if c.stop_reason is None else str(c.stop_reason)
                    chunks.append(chunk)
                if out.finished:
                    finished = True
                    if not chunks:
                        chunks.append(Chunk(rid))
                    last = chunks[-1]
                    last.final = True
                    last.prompt_tokens = len(ids)
                    last.completion_tokens = completion
                    self.metrics.prompt_tokens.labels(a, t).inc(len(ids))
                    self.metrics.generation_tokens.labels(a, t).inc(completion)
                    per_sequence = completion / max(1, getattr(params, "n", 1) or 1)  # n > 1: tokens of each sequence
                    if per_sequence > 1 and last_token_at is not None:
                        self.metrics.tpot.labels(a, t).observe((last_token_at - first_token_at) / (per_sequence - 1))
                for chunk in chunks:
                    yield chunk
            if engine_rid in self._shutdown_aborted:
                raise Unavailable("the server shut down before the request completed")
        finally:
            self._live.discard(engine_rid)
            self._shutdown_aborted.discard(engine_rid)
            if not finished:
                await asyncio.shield(self.engine.abort(engine_rid))
