"""Python client of the MoRA server, and the `mora-client` command line.

    from serve.client import MoraClient
    with MoraClient("localhost:50051", api_key="...") as c:
        print(c.generate("The secret code of vault is ", adapter_id="atlas", max_tokens=48, temperature=0).text)
        for piece in c.stream("hello", adapter_id="atlas"):
            print(piece.text, end="")
        c.load_adapter("my-adapter", path="my-adapter")
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from serve.grpc.proto import adapters_pb2 as apb
from serve.grpc.proto import adapters_pb2_grpc, inference_pb2_grpc
from serve.grpc.proto import inference_pb2 as ipb
from serve.tenants import hash_key

__all__ = ["ADAPTER_HEADER", "MODEL_HEADER", "RETRY_SERVICE_CONFIG", "MoraClient"]

# Routing metadata sent with every call that concerns an adapter (deploy/components/routing-*):
# adapter-affinity routers hash on ADAPTER_HEADER (Envoy Gateway, Istio); the Gateway API Inference
# Extension's endpoint picker cannot parse mora.v1 protobuf bodies and reads the model to route for
# from MODEL_HEADER (its HTTPRoute matches only calls that carry it). Value: the adapter id, which is
# the LoRA name the server reports in vllm:lora_requests_info, or "base" for the base model.
ADAPTER_HEADER = "x-mora-adapter"
MODEL_HEADER = "x-llm-d-model-name-rewrite"
BASE_ROUTE = "base"

# gRPC's own retry policy (the channel's service config, gRFC A6): UNAVAILABLE means the call was
# refused before any work (a replica draining or starting, a connection lost), so generation and
# the read-only adapter calls are retried with exponential backoff on another attempt (possibly
# another replica). Load/Unload/Merge/Unmerge are not: they change state. Streams are retried only
# until their first message arrives (gRPC commits a call then). Clients in other languages use the
# same JSON as their channel's service config (docs/deploy.md, "Retries").
RETRY_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [{
        "name": [
            {"service": "mora.v1.Inference"},
            {"service": "mora.v1.Adapters", "method": "ListAdapters"},
            {"service": "mora.v1.Adapters", "method": "GetAdapter"},
        ],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


class MoraClient:
    """A synchronous client; one channel, reused by every call."""

    def __init__(self, target: str, *, api_key: str | None = None, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None, timeout: float | None = 120.0,
                 retry: bool = True) -> None:
        options = [("grpc.enable_retries", 1 if retry else 0)]
        if retry:
            options.append(("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)))
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    def __enter__(self) -> MoraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def metadata_for(self, adapter_id: str) -> tuple[tuple[str, str], ...]:
        """Call metadata: the API key and the routing headers (ADAPTER_HEADER, MODEL_HEADER) that
        adapter-affinity routers read; "base" for the base model so those calls route together."""
        route = adapter_id or BASE_ROUTE
        if not (route.isascii() and route.isprintable()):  # metadata values must be printable ASCII
            return self.metadata
        return (*self.metadata, (ADAPTER_HEADER, route), (MODEL_HEADER, route))

    @staticmethod
    def request(prompt: str | Sequence[int] | Sequence[dict[str, str]], adapter_id: str = "", request_id: str = "",
                **sampling: Any) -> Any:
        """A `GenerateRequest`: `prompt` is text, token ids or chat messages ({"role", "content"});
        `sampling` takes the fields of `SamplingParams` (n, logprobs, temperature, ...)."""
        req = ipb.GenerateRequest(adapter_id=adapter_id, request_id=request_id, sampling=ipb.SamplingParams(**sampling))
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt and isinstance(prompt[0], dict):
            req.messages.messages.extend(ipb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
        else:
            req.prompt_token_ids.ids.extend(prompt)
        return req

    def generate(self, prompt: str | Sequence[int] | Sequence[dict[str, str]], adapter_id: str = "", **sampling: Any) -> Any:
        return self.inference.Generate(self.request(prompt, adapter_id, **sampling), metadata=self.metadata_for(adapter_id),
                                       timeout=self.timeout)

    def chat(self, messages: Sequence[dict[str, str]], adapter_id: str = "", **sampling: Any) -> Any:
        """The assistant's reply to chat `messages` (the model's chat template renders them)."""
        return self.generate(messages, adapter_id, **sampling)

    def stream(self, prompt: str | Sequence[int] | Sequence[dict[str, str]], adapter_id: str = "", **sampling: Any) -> Iterator[Any]:
        """The response stream; iterate it, or `.cancel()` it to stop the generation."""
        return self.inference.GenerateStream(self.request(prompt, adapter_id, **sampling), metadata=self.metadata_for(adapter_id),
                                             timeout=self.timeout)

    def load_adapter(self, adapter_id: str, path: str | None = None, *, source: str | None = None, replace: bool = False,
                     tenant: str = "", pinned: bool = False, sha256: dict[str, str] | None = None) -> Any:
        """`path`: relative to your adapter folder, or a source URI (s3://bucket/prefix,
        hf://org/name[@revision]); `sha256`: file name -> the digest it must have."""
        req = apb.LoadAdapterRequest(adapter_id=adapter_id, replace=replace, tenant=tenant, pinned=pinned, sha256=sha256 or {})
        if source is not None:
            req.registered_source = source
        else:
            req.path = path or adapter_id
        return self.adapters.LoadAdapter(req, metadata=self.metadata_for(adapter_id), timeout=self.timeout).adapter

    def unload_adapter(self, adapter_id: str) -> Any:
        return self.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id), metadata=self.metadata, timeout=self.timeout).adapter

    def list_adapters(self) -> list[Any]:
        return list(self.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=self.metadata, timeout=self.timeout).adapters)

    def get_adapter(self, adapter_id: str) -> Any:
        return self.adapters.GetAdapter(apb.GetAdapterRequest(adapter_id=adapter_id), metadata=self.metadata, timeout=self.timeout).adapter

    def merge_adapter(self, adapter_id: str) -> Any:
        return self.adapters.MergeAdapter(apb.MergeAdapterRequest(adapter_id=adapter_id), metadata=self.metadata_for(adapter_id),
                                          timeout=self.timeout)

    def unmerge_adapter(self, adapter_id: str, *, automatic: bool = False) -> Any:
        return self.adapters.UnmergeAdapter(apb.UnmergeAdapterRequest(adapter_id=adapter_id, automatic=automatic),
                                            metadata=self.metadata_for(adapter_id), timeout=self.timeout)


def _print(message: Any) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.stop:
        out["stop"] = args.stop
    if args.json_schema is not None:  # structured output: one constraint
        out["structured"] = ipb.StructuredOutput(json_schema=Path(args.json_schema).read_text())
    elif args.regex is not None:
        out["structured"] = ipb.StructuredOutput(regex=args.regex)
    elif args.choice:
        out["structured"] = ipb.StructuredOutput(choice=ipb.Choices(choices=args.choice))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mora-client", description="Talk to a mora-serve server.")
    p.add_argument("--target", default=os.environ.get("MORA_TARGET", "localhost:50051"))
    p.add_argument("--api-key", default=os.environ.get("MORA_API_KEY"), help="or MORA_API_KEY")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("generate", "stream"):
        g = sub.add_parser(name)
        g.add_argument("prompt")
        g.add_argument("--adapter", default="")
        g.add_argument("--max-tokens", type=int, default=64)
        g.add_argument("--temperature", type=float)
        g.add_argument("--top-p", type=float)
        g.add_argument("--top-k", type=int)
        g.add_argument("--seed", type=int)
        g.add_argument("--stop", action="append")
        constraint = g.add_mutually_exclusive_group()
        constraint.add_argument("--json-schema", metavar="FILE", help="the text must match this JSON schema (a file)")
        constraint.add_argument("--regex", help="the text must match this regular expression")
        constraint.add_argument("--choice", action="append", help="the text must be one of these (repeatable)")
    a = sub.add_parser("adapters")
    asub = a.add_subparsers(dest="op", required=True)
    asub.add_parser("list")
    for op in ("get", "unload", "merge"):
        asub.add_parser(op).add_argument("adapter_id")
    un = asub.add_parser("unmerge")
    un.add_argument("adapter_id")
    un.add_argument("--automatic", action="store_true", help="hand it back to the automatic merge policy")
    ld = asub.add_parser("load")
    ld.add_argument("adapter_id")
    ld.add_argument("--path", help="relative to your adapter folder (default: the id), or a source URI: "
                    "s3://bucket/prefix, hf://org/name[@revision]")
    ld.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                    help="the digest a downloaded file must have (repeatable), e.g. adapter_model.safetensors=9f86...")
    ld.add_argument("--source", help="a source registered in the server config")
    ld.add_argument("--replace", action="store_true")
    ld.add_argument("--pinned", action="store_true", help="mark it hot (admins): never evicted from the host cache")
    ld.add_argument("--tenant", default="")
    hk = sub.add_parser("hash-key", help="print the sha256 to put in a tenants file")
    hk.add_argument("key")
    args = p.parse_args(argv)
    if args.cmd == "hash-key":
        print(hash_key(args.key))
        return 0
    try:
        with MoraClient(args.target, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key) as c:
            if args.cmd == "generate":
                _print(c.generate(args.prompt, args.adapter, **_sampling(args)))
            elif args.cmd == "stream":
                for piece in c.stream(args.prompt, args.adapter, **_sampling(args)):
                    print(piece.text, end="", flush=True)
                print()
            elif args.op == "list":
                for info in c.list_adapters():
                    _print(info)
            elif args.op == "get":
                _print(c.get_adapter(args.adapter_id))
            elif args.op == "load":
                digests = dict(item.partition("=")[::2] for item in args.sha256)
                _print(c.load_adapter(args.adapter_id, args.path, source=args.source, replace=args.replace, tenant=args.tenant,
                                      pinned=args.pinned, sha256=digests))
            elif args.op == "unload":
                _print(c.unload_adapter(args.adapter_id))
            elif args.op == "merge":
                _print(c.merge_adapter(args.adapter_id))
            elif args.op == "unmerge":
                _print(c.unmerge_adapter(args.adapter_id, automatic=args.automatic))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
