"""Request bodies of the OpenAI-compatible API (the OpenAI spec's fields, plus vLLM's usual extras),
validated at the edge: an unknown or mistyped field is a 400 naming it."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from serve.errors import InvalidRequest
from serve.services.requests import MAX_MESSAGES, MAX_N, MAX_STOP, MAX_STOP_TOKEN_IDS, ChatMessage, Sampling

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

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
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
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
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
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
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
