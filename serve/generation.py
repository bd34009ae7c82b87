"""The generate pipeline: authenticate, admit, validate, lease the adapter, stream from the engine.

Every request's outcome is counted per adapter and tenant, with its latency profile (time to
first token, time per output token, queue wait, end to end). A cancelled call or an expired
deadline aborts the engine request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from serve.config import ServerSettings
from serve.engine import Engine
from serve.errors import InvalidRequest, NonFiniteOutput, ResourceExhausted, Unavailable, status_for
from serve.metrics import ServerMetrics
from serve.policy import MergePolicy
from serve.registry import AdapterRegistry, check_adapter_id
from serve.tenants import Tenant, TenantDirectory

__all__ = ["Chunk", "GenerationService"]

log = logging.getLogger(__name__)
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID = 128
SEED_MAX = (1 << 63) - 1


@dataclass
class Chunk:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def sampling_params(sp: Any, max_tokens_left: int) -> Any:
    """vLLM `SamplingParams` from the API message; bad values are INVALID_ARGUMENT."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # logprobs=0: the sampled token's log-probability, from which the server tells when a
    # request's logits became non-finite (and stops it alone; see docs/security.md).
    kw: dict[str, Any] = {"output_kind": RequestOutputKind.DELTA, "logprobs": 0}
    requested = sp.max_tokens or 16
    kw["max_tokens"] = min(requested, max_tokens_left)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if sp.HasField(name):
            value = getattr(sp, name)
            if not math.isfinite(value):
                raise InvalidRequest(f"sampling.{name} must be a finite number")
            kw[name] = value
    if sp.HasField("top_k"):
        kw["top_k"] = sp.top_k
    if sp.HasField("seed"):
        if sp.seed > SEED_MAX:
            raise InvalidRequest(f"sampling.seed must be <= {SEED_MAX}")
        kw["seed"] = sp.seed
    if len(sp.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS or not s for s in sp.stop):
        raise InvalidRequest(f"sampling.stop: at most {MAX_STOP} non-empty strings of <= {MAX_STOP_CHARS} characters")
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    if sp.min_tokens:
        if sp.min_tokens > kw["max_tokens"]:
            raise InvalidRequest("sampling.min_tokens exceeds max_tokens (or the context left)")
        kw["min_tokens"] = sp.min_tokens
    kw["skip_special_tokens"] = sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True
    from vllm.exceptions import VLLMClientError

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
        self.draining = asyncio.Event()  # set when the shutdown grace period runs out
        self._live: set[str] = set()
        self._shutdown_aborted: set[str] = set()

    async def _prompt(self, request: Any) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
            bad = [i for i in ids if i >= self.engine.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (size {self.engine.vocab_size})")
        elif which == "prompt":
            if len(request.prompt.encode("utf-8", "surrogatepass")) > self.settings.max_prompt_bytes:
                raise InvalidRequest(f"prompt is longer than {self.settings.max_prompt_bytes} bytes")
            # Off the event loop: a long prompt takes a while to tokenize and health checks must not wait.
            ids = await asyncio.to_thread(self.engine.tokenize, request.prompt)
        else:
            raise InvalidRequest("give a prompt or prompt_token_ids")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) >= self.engine.max_model_len:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the model's context is {self.engine.max_model_len}")
        return ids

    @contextlib.contextmanager
    def _admit(self, tenant: Tenant) -> Any:
        if self.pending >= self.settings.max_pending_requests:
            raise ResourceExhausted(f"server overloaded: {self.pending} requests in progress; retry later")
        mine = self.per_tenant.get(tenant.name, 0)
        if mine >= tenant.max_concurrent_requests:
            raise ResourceExhausted(f"tenant {tenant.name!r} already has {mine} requests in progress (limit {tenant.max_concurrent_requests})")
        self.pending += 1
        self.per_tenant[tenant.name] = mine + 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.pending -= 1
            self.per_tenant[tenant.name] -= 1
            self.metrics.in_flight.dec()

    async def run(self, request: Any, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Chunk]:
        arrival = time.perf_counter()
        tenant_name, adapter_id = "unauthenticated", request.adapter_id or None
        # Metric labels carry only what authentication and authorization vouched for: an id the
        # caller may not use (or that is not loaded) never becomes a label.
        adapter_label = "unknown" if adapter_id is not None else None
        code = grpc.StatusCode.OK
        try:
            tenant = self.tenants.authenticate(context.invocation_metadata())
            tenant_name = tenant.name
            if self.draining.is_set():
                raise Unavailable("the server is shutting down")
            if adapter_id is not None:
                check_adapter_id(adapter_id)
                self.registry.get(adapter_id, tenant)
                adapter_label = adapter_id
            else:
                self.tenants.check_base(tenant)
            if len(request.request_id) > MAX_REQUEST_ID:
                raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID} characters")
            with self._admit(tenant):
                if not self.engine.ready:
                    raise Unavailable("the engine is not serving")
                ids = await self._prompt(request)
                params = sampling_params(request.sampling, self.engine.max_model_len - len(ids))
                async with contextlib.AsyncExitStack() as stack:
                    lora = None
                    if adapter_id is not None:
                        lora = (await stack.enter_async_context(self.registry.lease(adapter_id, tenant))).lora_request
                    if self.settings.auto_merge:  # nothing reads the request log otherwise: keep none
                        self.policy.observe(adapter_id, time.monotonic())
                    async for chunk in self._stream(request, ids, params, lora, tenant_name, arrival):
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
            cancelled = getattr(context, "cancelled", None)  # gRPC's; other front ends may not have one
            if code == grpc.StatusCode.OK and callable(cancelled) and cancelled():
                code = grpc.StatusCode.CANCELLED
            a, t = self.metrics.labels(adapter_label, tenant_name)
            self.metrics.requests.labels(a, t, method, code.name).inc()
            if code == grpc.StatusCode.OK:
                self.metrics.request_duration.labels(a, t).observe(time.perf_counter() - arrival)

    async def abort_all(self) -> int:
        """Shutdown: abort every request still running; they end with UNAVAILABLE."""
        self.draining.set()
        live = list(self._live)
        for rid in live:
            self._shutdown_aborted.add(rid)
            await self.engine.abort(rid)
        return len(live)

    async def _stream(self, request: Any, ids: list[int], params: Any, lora: Any, tenant: str, arrival: float) -> AsyncIterator[Chunk]:
        rid = request.request_id or uuid.uuid4().hex
        engine_rid = uuid.uuid4().hex  # unique in the engine whatever clients send
        a, t = self.metrics.labels(request.adapter_id or None, tenant)
        last_token_at: float | None = None
        completion = 0
        finished = False
        self._live.add(engine_rid)
        try:
            async for out in self.engine.generate(engine_rid, ids, params, lora):
                if engine_rid in self._shutdown_aborted:
                    raise Unavailable("the server shut down before the request completed")
                now = time.perf_counter()
                c = out.outputs[0]
                new = list(c.token_ids)
                if new:
                    if last_token_at is None:
                        self.metrics.ttft.labels(a, t).observe(now - arrival)
                        m = out.metrics
                        if m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "queued_ts", 0):
                            self.metrics.queue_wait.labels(a, t).observe(max(0.0, m.scheduled_ts - m.queued_ts))
                    else:
                        gap = (now - last_token_at) / len(new)
                        for _ in new:
                            self.metrics.tpot.labels(a, t).observe(gap)
                    last_token_at = now
                if c.logprobs and not all(math.isfinite(lp.logprob) for step in c.logprobs for lp in step.values()):
                    raise NonFiniteOutput(
                        "the model's outputs became non-finite (NaN or inf) for this request"
                        + (f" with adapter {request.adapter_id!r}" if request.adapter_id else "")
                        + "; it was stopped (other requests are unaffected)")
                completion += len(new)
                chunk = Chunk(rid, c.text, new)
                if out.finished:
                    finished = True
                    chunk.finish_reason = c.finish_reason
                    chunk.stop_reason = "" if c.stop_reason is None else str(c.stop_reason)
                    chunk.prompt_tokens = len(ids)
                    chunk.completion_tokens = completion
                    self.metrics.prompt_tokens.labels(a, t).inc(len(ids))
                    self.metrics.generation_tokens.labels(a, t).inc(completion)
                yield chunk
            if engine_rid in self._shutdown_aborted:
                raise Unavailable("the server shut down before the request completed")
        finally:
            self._live.discard(engine_rid)
            self._shutdown_aborted.discard(engine_rid)
            if not finished:
                await asyncio.shield(self.engine.abort(engine_rid))
