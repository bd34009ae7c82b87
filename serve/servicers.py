"""The gRPC servicers: thin translations between API messages and the server's components.

Errors are raised, never returned: `serve.errors.ErrorInterceptor` maps them to status codes.
"""

from __future__ import annotations

from typing import Any

import grpc

from mora.checkpoint import MoraAdapter
from serve.errors import InvalidRequest
from serve.generation import (
    ChatMessage,
    Chunk,
    GenerateCall,
    GenerationService,
    Sampling,
    TokenLogprob,
    collect,
)
from serve.proto import adapters_pb2 as apb
from serve.proto import adapters_pb2_grpc, inference_pb2_grpc
from serve.proto import inference_pb2 as ipb
from serve.registry import AdapterRegistry, Entry
from serve.tenants import TenantDirectory

__all__ = ["AdaptersServicer", "InferenceServicer", "generate_call"]

FINISH = {"stop": ipb.FINISH_REASON_STOP, "length": ipb.FINISH_REASON_LENGTH, "abort": ipb.FINISH_REASON_ABORT}
LOCATION = {
    "device_slot": apb.ADAPTER_LOCATION_DEVICE_SLOT,
    "host_cache": apb.ADAPTER_LOCATION_HOST_CACHE,
    "disk_only": apb.ADAPTER_LOCATION_DISK_ONLY,
}
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "logprobs")


def generate_call(request: Any) -> GenerateCall:
    """The API message as the generation core's request."""
    sp = request.sampling
    sampling = Sampling(
        max_tokens=sp.max_tokens or 16, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_tokens, skip_special_tokens=sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True,
        n=sp.n or 1, **{name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)})
    call = GenerateCall(adapter_id=request.adapter_id or None, sampling=sampling, request_id=request.request_id)
    which = request.WhichOneof("input")
    if which == "prompt":
        call.prompt = request.prompt
    elif which == "prompt_token_ids":
        call.prompt_token_ids = list(request.prompt_token_ids.ids)
    elif which == "messages":
        call.messages = [ChatMessage(m.role, m.content) for m in request.messages.messages]
    return call


def _logprobs(lps: list[TokenLogprob] | None) -> list[Any]:
    return [ipb.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
                             top_logprobs=[ipb.TopLogprob(token_id=i, token=t, logprob=v) for i, t, v in lp.top])
            for lp in lps or []]


def _response(chunk: Chunk, adapter_id: str) -> Any:
    r = ipb.GenerateResponse(request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids, index=chunk.index,
                             adapter_id=adapter_id, stop_reason=chunk.stop_reason, logprobs=_logprobs(chunk.logprobs))
    if chunk.finish_reason is not None:
        r.finish_reason = FINISH.get(chunk.finish_reason, ipb.FINISH_REASON_UNSPECIFIED)
    if chunk.final:
        r.usage.prompt_tokens = chunk.prompt_tokens
        r.usage.completion_tokens = chunk.completion_tokens
    return r


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, generation: GenerationService) -> None:
        self.generation = generation

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = generate_call(request)
        choices, last = await collect(self.generation.run(call, context.invocation_metadata(), "Generate", context), call.sampling.n)
        completions = [ipb.Completion(index=c.index, text=c.text, token_ids=c.token_ids, stop_reason=c.stop_reason,
                                      finish_reason=FINISH.get(c.finish_reason or "", ipb.FINISH_REASON_UNSPECIFIED),
                                      logprobs=_logprobs(c.logprobs)) for c in choices]
        first = completions[0]
        r = ipb.GenerateResponse(request_id=last.request_id, text=first.text, token_ids=first.token_ids,
                                 finish_reason=first.finish_reason, stop_reason=first.stop_reason, logprobs=first.logprobs,
                                 adapter_id=request.adapter_id, completions=completions)
        r.usage.prompt_tokens = last.prompt_tokens
        r.usage.completion_tokens = last.completion_tokens
        return r

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async for chunk in self.generation.run(generate_call(request), context.invocation_metadata(), "GenerateStream",
                                                  context):
            yield _response(chunk, request.adapter_id)


def location_of(entry: Entry, status: dict[str, Any]) -> str:
    engine_id = entry.version.engine_id
    if any(s.get("lora_id") == engine_id for s in status.get("slots", {}).values()):
        return "device_slot"
    if engine_id in status.get("registered", []):
        return "host_cache"
    return "disk_only"


def adapter_info(entry: Entry, registry: AdapterRegistry, status: dict[str, Any]) -> Any:
    a = entry.version.adapter
    merged = registry.merged is not None and registry.merged[0] == entry.adapter_id
    info = apb.AdapterInfo(
        adapter_id=entry.adapter_id,
        tenant=entry.tenant or "",
        kind=apb.ADAPTER_KIND_MORA if isinstance(a, MoraAdapter) else apb.ADAPTER_KIND_LORA,
        mora_type=int(a.mora_type) if isinstance(a, MoraAdapter) else 0,
        rank=a.config.r,
        parameters=a.num_parameters,
        location=LOCATION[location_of(entry, status)],
        merged=merged,
        in_flight=entry.version.in_flight + sum(v.in_flight for v in entry.retiring),
        merge_control=apb.MERGE_CONTROL_MANUAL if entry.manual_merge else apb.MERGE_CONTROL_AUTOMATIC,
        version=entry.version.number,
        source=entry.version.source,
        requests_total=entry.requests_total,
        merge_backup_bytes=registry.merge_backup_bytes if merged else 0,
        pinned=entry.version.pinned,
    )
    return info


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    """The Adapters service. The HTTP API's admin routes call these same methods, with a context
    that carries only the caller's credentials (`invocation_metadata()`)."""

    def __init__(self, registry: AdapterRegistry, tenants: TenantDirectory) -> None:
        self.registry = registry
        self.tenants = tenants

    def _caller(self, context: grpc.aio.ServicerContext) -> Any:
        return self.tenants.authenticate(context.invocation_metadata())

    async def _info(self, entry: Entry) -> Any:
        return adapter_info(entry, self.registry, await self.registry.engine.status())

    async def LoadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        if request.tenant and not caller.is_admin and request.tenant != caller.name:
            raise InvalidRequest("only admins load adapters for another tenant")
        which = request.WhichOneof("source")
        # Who owns the id is decided and checked by the registry under its lock (no race).
        entry = await self.registry.load(
            request.adapter_id,
            path=request.path if which == "path" else None,
            source_name=request.registered_source if which == "registered_source" else None,
            caller=caller,
            owner=request.tenant or None,
            replace=request.replace,
            pin=request.pinned,
            strict_pin=True,
        )
        return apb.LoadAdapterResponse(adapter=await self._info(entry))

    async def UnloadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        self.tenants.check_manage(caller)
        entry = self.registry.get(request.adapter_id, caller)
        status = await self.registry.engine.status()
        info = adapter_info(entry, self.registry, status)
        await self.registry.unload(request.adapter_id, caller)
        info.location = apb.ADAPTER_LOCATION_UNSPECIFIED
        info.in_flight = 0
        return apb.UnloadAdapterResponse(adapter=info)

    async def ListAdapters(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        status = await self.registry.engine.status()
        entries = sorted(self.registry.visible(caller), key=lambda e: e.adapter_id)
        return apb.ListAdaptersResponse(adapters=[adapter_info(e, self.registry, status) for e in entries])

    async def GetAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        entry = self.registry.get(request.adapter_id, caller)
        return apb.GetAdapterResponse(adapter=await self._info(entry))

    async def MergeAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        result = await self.registry.merge(request.adapter_id, manual=True, trigger="manual", caller=caller)
        entry = self.registry.get(request.adapter_id, caller)
        return apb.MergeAdapterResponse(adapter=await self._info(entry), seconds=result["seconds"])

    async def UnmergeAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = self._caller(context)
        result = await self.registry.unmerge(request.adapter_id, manual=True, trigger="manual", automatic=request.automatic,
                                             caller=caller)
        entry = self.registry.get(request.adapter_id, caller)
        return apb.UnmergeAdapterResponse(adapter=await self._info(entry), seconds=result["seconds"])
