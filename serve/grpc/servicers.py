"""The gRPC servicers: thin translations between API messages and the transport-free services.

The gRPC edge (`serve.grpc.edge.GrpcEdge`) has authenticated the call before its request
was parsed; servicers take the caller from it (`serve.grpc.caller`). Errors are raised, never
returned: the edge maps them to status codes.
"""

from __future__ import annotations

from typing import Any

import grpc

from serve.errors import InvalidRequest
from serve.grpc.caller import caller
from serve.grpc.proto import adapters_pb2 as apb
from serve.grpc.proto import adapters_pb2_grpc, inference_pb2_grpc
from serve.grpc.proto import inference_pb2 as ipb
from serve.services.adapters import AdapterInfo, AdapterService, LoadRequest, Location
from serve.services.generation import GenerationService
from serve.services.requests import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    ChatMessage,
    Chunk,
    Constraint,
    ConstraintKind,
    GenerateCall,
    Sampling,
    TokenLogprob,
    check_sizes,
    collect,
)

__all__ = ["AdaptersServicer", "InferenceServicer", "generate_call"]

FINISH = {"stop": ipb.FINISH_REASON_STOP, "length": ipb.FINISH_REASON_LENGTH, "abort": ipb.FINISH_REASON_ABORT}
LOCATION = {
    Location.UNSPECIFIED: apb.ADAPTER_LOCATION_UNSPECIFIED,
    Location.DEVICE_SLOT: apb.ADAPTER_LOCATION_DEVICE_SLOT,
    Location.HOST_CACHE: apb.ADAPTER_LOCATION_HOST_CACHE,
    Location.DISK_ONLY: apb.ADAPTER_LOCATION_DISK_ONLY,
}
MAX_DIGESTS = 8
KIND = {"mora": apb.ADAPTER_KIND_MORA, "lora": apb.ADAPTER_KIND_LORA}
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "logprobs")


def _constraint(structured: Any) -> Constraint:
    """The message's structured-output constraint; sizes checked from its lengths first."""
    which = structured.WhichOneof("constraint")
    if which is None:
        raise InvalidRequest("structured: give one of json_schema, json_object, regex, choice, grammar")
    if which == "choice":
        if len(structured.choice.choices) > MAX_CHOICES:
            raise InvalidRequest(f"choice: give 1 to {MAX_CHOICES} choices")
        return Constraint(ConstraintKind.CHOICE, choices=tuple(structured.choice.choices))
    if which == "json_object":
        if not structured.json_object:
            raise InvalidRequest("structured.json_object must be true when set")
        return Constraint(ConstraintKind.JSON_OBJECT)
    kind = {"json_schema": ConstraintKind.JSON_SCHEMA, "regex": ConstraintKind.REGEX, "grammar": ConstraintKind.GRAMMAR}[which]
    return Constraint(kind, getattr(structured, which))


def generate_call(request: Any) -> GenerateCall:
    """The API message as the generation core's request; sizes are checked from the message's
    counts before anything of that size is copied out of it."""
    sp = request.sampling
    which = request.WhichOneof("input")
    check_sizes(n=sp.n or 1, stop=len(sp.stop), stop_token_ids=len(sp.stop_token_ids),
                messages=len(request.messages.messages) if which == "messages" else 0,
                prompt_tokens=len(request.prompt_token_ids.ids) if which == "prompt_token_ids" else 0,
                request_id=len(request.request_id))
    if len(sp.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
    sampling = Sampling(
        constraint=_constraint(sp.structured) if sp.HasField("structured") else None, logit_bias=dict(sp.logit_bias),
        max_tokens=sp.max_tokens or 16, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_tokens, skip_special_tokens=sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True,
        n=sp.n or 1, **{name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)})
    call = GenerateCall(adapter_id=request.adapter_id or None, sampling=sampling, request_id=request.request_id)
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
        choices, last = await collect(self.generation.run(call, caller(), "Generate", context.cancelled), call.sampling.n)
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
        async for chunk in self.generation.run(generate_call(request), caller(), "GenerateStream", context.cancelled):
            yield _response(chunk, request.adapter_id)


def adapter_info(info: AdapterInfo) -> Any:
    return apb.AdapterInfo(
        adapter_id=info.adapter_id, tenant=info.tenant, kind=KIND[info.kind], mora_type=info.mora_type, rank=info.rank,
        parameters=info.parameters, location=LOCATION[info.location], merged=info.merged, in_flight=info.in_flight,
        merge_control=apb.MERGE_CONTROL_MANUAL if info.manual_merge else apb.MERGE_CONTROL_AUTOMATIC,
        version=info.version, source=info.source, requests_total=info.requests_total,
        merge_backup_bytes=info.merge_backup_bytes, pinned=info.pinned)


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    """The Adapters service over `AdapterService`."""

    def __init__(self, adapters: AdapterService) -> None:
        self.adapters = adapters

    async def LoadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        which = request.WhichOneof("source")
        if len(request.sha256) > MAX_DIGESTS:  # from the count, before copying them
            raise InvalidRequest(f"sha256: at most {MAX_DIGESTS} digests (one per adapter file)")
        load = LoadRequest(request.adapter_id, path=request.path if which == "path" else None,
                           source=request.registered_source if which == "registered_source" else None,
                           replace=request.replace, tenant=request.tenant, pinned=request.pinned,
                           sha256=dict(request.sha256))
        return apb.LoadAdapterResponse(adapter=adapter_info(await self.adapters.load(caller(), load)))

    async def UnloadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return apb.UnloadAdapterResponse(adapter=adapter_info(await self.adapters.unload(caller(), request.adapter_id)))

    async def ListAdapters(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return apb.ListAdaptersResponse(adapters=[adapter_info(i) for i in await self.adapters.list(caller())])

    async def GetAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return apb.GetAdapterResponse(adapter=adapter_info(await self.adapters.get(caller(), request.adapter_id)))

    async def MergeAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        info, seconds = await self.adapters.merge(caller(), request.adapter_id)
        return apb.MergeAdapterResponse(adapter=adapter_info(info), seconds=seconds)

    async def UnmergeAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        info, seconds = await self.adapters.unmerge(caller(), request.adapter_id, request.automatic)
        return apb.UnmergeAdapterResponse(adapter=adapter_info(info), seconds=seconds)
