"""Request bodies of the OpenAI-compatible API (the OpenAI spec's fields, plus vLLM's usual extras),
validated at the edge: an unknown or mistyped field is a 400 naming it."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from serve.errors import InvalidRequest
from serve.services.requests import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP,
    MAX_STOP_TOKEN_IDS,
    ChatMessage,
    Constraint,
    ConstraintKind,
    Sampling,
)

__all__ = ["AdapterLoad", "ChatRequest", "CompletionRequest", "VllmLoraLoad", "VllmLoraUnload", "parse_body"]


def _finite(value: Any) -> Any:
    """NaN and infinities are named as such (before range checks would call NaN "not >= 0")."""
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        return value  # not a number: the field's own type check says so
    if number is not None and math.isnan(number):
        raise ValueError("is NaN; give a finite number")
    if number is not None and math.isinf(number):
        raise ValueError("is infinite; give a finite number")
    return value


Finite = Annotated[float, BeforeValidator(_finite)]


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """`raw` (the whole body, already bounded by the HTTP edge) parsed straight into `model`: no
    intermediate Python objects for fields the model does not have; any problem is a 400 that
    names the field, or the JSON error and where."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            if err["type"] == "json_invalid":
                msg = str(err["msg"]).removeprefix("Invalid JSON: ")
                hint = " (a \\u escape of a lone UTF-16 surrogate is not text)" if "escape" in msg else ""
                raise InvalidRequest(f"the request body is not valid JSON text: {msg}{hint}") from None
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise InvalidRequest("invalid request: " + "; ".join(problems)) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`. The schema is always enforced exactly (the engine
    compiles it into a grammar), so `strict` is accepted either way."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with (and only with) type json_schema")
        return self


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extra: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=MAX_CHOICES)
    grammar: str | None = None
    json_object: Literal[True] | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def constraint(self) -> Constraint:
        if self.json_ is not None:
            spec = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return Constraint(ConstraintKind.JSON_SCHEMA, spec)
        if self.regex is not None:
            return Constraint(ConstraintKind.REGEX, self.regex)
        if self.choice is not None:
            return Constraint(ConstraintKind.CHOICE, choices=tuple(self.choice))
        if self.grammar is not None:
            return Constraint(ConstraintKind.GRAMMAR, self.grammar)
        return Constraint(ConstraintKind.JSON_OBJECT)


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON keys) as token id -> bias."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 12:
            raise InvalidRequest(f"logit_bias: {key[:24]!r} is not a token id")
        out[int(key)] = value
    return out


class _Common(_Body):
    model: str = Field(min_length=1, max_length=256, description="an adapter id, or the base model's name")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = None
    temperature: Finite | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extra sampling parameters, as its own server accepts them
    top_k: int | None = None
    min_p: Finite | None = None
    repetition_penalty: Finite | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    request_id: str = Field("", max_length=128)
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs extra
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[str, Finite] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @model_validator(mode="after")
    def _one_format(self) -> _Common:
        if self.structured_outputs is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def constraint(self) -> Constraint | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        f = self.response_format
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return Constraint(ConstraintKind.JSON_OBJECT)
        assert f.json_schema is not None
        return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(f.json_schema.schema_))

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            constraint=self.constraint(), logit_bias=_logit_bias(self.logit_bias),
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens, n=self.n, logprobs=logprobs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=1024)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            # the prompt's own log-probabilities would be a second engine pass over every prompt token
            raise ValueError("echo with logprobs is not supported (it needs the prompt tokens' log-probabilities)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def single_prompt(self) -> tuple[str | None, list[int] | None]:
        """(text, token ids): one prompt per request (a list of one is accepted)."""
        p: Any = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequest(f"prompt: one prompt per request (got {len(p)}); send several requests")
            p = p[0]
        if isinstance(p, str):
            return p, None
        return None, list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str = Field(max_length=32)
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = Field(None, max_length=256)

    def chat_message(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return ChatMessage(self.role, content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=1024)

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class AdapterLoad(_Body):
    adapter_id: str
    path: str | None = Field(None, description="relative to your adapter folder, or s3://bucket/prefix, hf://org/name[@rev]")
    source: str | None = Field(None, description="a source registered in the server config")
    replace: bool = False
    tenant: str = ""
    pinned: bool = Field(False, description="mark it hot (admins only): never evicted from the host cache")
    sha256: dict[str, str] = Field(default_factory=dict, max_length=8, description="file name -> pinned sha256 (source URIs)")

    @model_validator(mode="after")
    def _one_source(self) -> AdapterLoad:
        if self.path is not None and self.source is not None:
            raise ValueError("give path or source, not both")
        return self


class AdapterUnmerge(_Body):
    automatic: bool = False


class VllmLoraLoad(BaseModel):
    """vLLM's `/v1/load_lora_adapter` body, so that tools written for vLLM work unchanged."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class VllmLoraUnload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
