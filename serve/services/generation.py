"""The generate pipeline shared by every transport (gRPC and the OpenAI-compatible HTTP API):
admit, validate, lease the adapter, pass the merge gate, stream from the engine.

Transports authenticate the caller and translate their messages into a `GenerateCall` and the
`Chunk`s back (serve/services/requests.py); everything else (tenants' permissions, quotas,
merge policy, metrics, error classes) happens here, once. Every request's outcome is counted
per adapter and tenant, with its latency profile (time to first token, time per output token,
queue wait, end to end). A cancelled call or an expired deadline aborts the engine request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from serve.adapters import AdapterRegistry, LazyResolver, Merges
from serve.adapters.validation import check_adapter_id
from serve.config import ServerSettings
from serve.engine import AdapterHandle, Engine
from serve.engine.outputs import Alternative
from serve.errors import InvalidRequest, NonFiniteOutput, ResourceExhausted, Unavailable, status_for
from serve.metrics import UNKNOWN, ServerMetrics
from serve.services.requests import (
    CHAT_ROLES,
    MAX_MESSAGES,
    Chunk,
    GenerateCall,
    Sampling,
    TokenLogprob,
    check_sampling,
    check_sizes,
    check_text,
)
from serve.tenants import Tenant, TenantDirectory

__all__ = ["GenerationService"]

log = logging.getLogger(__name__)


class GenerationService:
    def __init__(self, settings: ServerSettings, engine: Engine, registry: AdapterRegistry, resolver: LazyResolver,
                 tenants: TenantDirectory, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.resolver = resolver
        self.merges: Merges = registry.merges
        self.tenants = tenants
        self.metrics = metrics
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
                entry = await self.resolver.resolve(adapter_id, tenant)  # registers it on first use for lazy tenants
                adapter_label, owner = adapter_id, entry.tenant
            else:
                self.tenants.check_base(tenant)
            with self._admit(tenant, sp.n):
                if not self.engine.ready:
                    raise Unavailable("the engine is not serving")
                ids = await self._prompt(call)
                sampling = check_sampling(call.sampling, self.engine.max_model_len - len(ids), self.engine.max_logprobs)
                async with contextlib.AsyncExitStack() as stack:
                    version = None
                    if adapter_id is not None:
                        version = await stack.enter_async_context(self.registry.lease(adapter_id, tenant))
                    self.merges.observe(adapter_id)
                    # Past the gate, this request never shares a step with another adapter's merge.
                    await stack.enter_async_context(self.merges.gate.admit(version.engine_id if version else None))
                    labels = self.metrics.labels(adapter_label, tenant_name, owner)
                    async for chunk in self._stream(call, ids, sampling, version.handle if version else None, labels, arrival):
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

    def _logprobs(self, token_ids: list[int], steps: tuple[dict[int, Alternative], ...]) -> list[TokenLogprob]:
        """The engine's per-step {token id: Alternative} (the sampled token and the top k) as TokenLogprobs."""
        out = []
        for tid, step in zip(token_ids, steps, strict=True):
            def text(i: int, alt: Alternative) -> str:
                return alt.text if alt.text is not None else self.engine.decode_token(i)

            ranked = sorted(((alt.rank, i, alt) for i, alt in step.items() if alt.rank is not None), key=lambda x: x[0])
            chosen = step[tid]
            top = [(i, text(i, alt), alt.logprob) for _, i, alt in ranked]  # the caller keeps its k
            out.append(TokenLogprob(tid, text(tid, chosen), chosen.logprob, top))
        return out

    async def _stream(self, call: GenerateCall, ids: list[int], sampling: Sampling, adapter: AdapterHandle | None,
                      labels: tuple[str, str], arrival: float) -> AsyncIterator[Chunk]:
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
            async for out in self.engine.generate(engine_rid, ids, sampling, adapter):
                if engine_rid in self._shutdown_aborted:
                    raise Unavailable("the server shut down before the request completed")
                now = time.perf_counter()
                new_total = sum(len(c.token_ids) for c in out.sequences)
                if new_total:
                    if last_token_at is None:
                        self.metrics.ttft.labels(a, t).observe(now - arrival)
                        if out.queue_wait is not None:
                            self.metrics.queue_wait.labels(a, t).observe(out.queue_wait)
                        first_token_at = now
                    else:
                        gap = (now - last_token_at) / new_total
                        for _ in range(new_total):
                            self.metrics.itl.labels(a, t).observe(gap)
                    last_token_at = now
                for c in out.sequences:
                    if c.finish_reason == "error":
                        # The engine failed this request alone (vLLM: e.g. a structured-output
                        # grammar its backend could not compile); the others go on.
                        if sampling.constraint is not None:
                            raise InvalidRequest(f"the engine could not apply the request's {sampling.constraint.kind.value} "
                                                 "constraint (it compiled no grammar from it)")
                        raise Unavailable("the engine failed this request; retry")
                    if c.logprobs and not all(math.isfinite(alt.logprob) for step in c.logprobs for alt in step.values()):
                        raise NonFiniteOutput(
                            "the model's outputs became non-finite (NaN or inf) for this request"
                            + (f" with adapter {call.adapter_id!r}" if call.adapter_id else "")
                            + "; it was stopped (other requests are unaffected)")
                completion += new_total
                chunks = []
                for c in out.sequences:
                    new = list(c.token_ids)
                    chunk = Chunk(rid, c.text, new, index=c.index)
                    if want_logprobs:
                        lps = self._logprobs(new, c.logprobs or ())
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
                    per_sequence = completion / max(1, sampling.n)  # n > 1: tokens of each sequence
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
