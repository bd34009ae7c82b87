"""vLLM engine settings passed through (`--engine-arg KEY=VALUE`, `engine:` in the config file),
validated against vLLM's own `EngineArgs` dataclass: field names and their type annotations.

Nothing is copied by hand: any field vLLM's `EngineArgs` has is accepted, with its declared type.
Settings the server manages itself are refused with the name of the setting to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any

__all__ = ["MANAGED", "validate_engine_args"]

# EngineArgs fields the server sets from its own settings (or must control): key -> what to use.
MANAGED = {
    "model": "--model",
    "enable_lora": "(always on)",
    "worker_extension_cls": "(the mora worker extension, always)",
    "max_loras": "--max-loras",
    "max_cpu_loras": "--max-cpu-loras",
    "max_lora_rank": "--max-lora-rank",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "kv_cache_memory_bytes": "--kv-cache-bytes",
    "enforce_eager": "--enforce-eager",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "distributed_executor_backend": "--distributed-executor-backend",
    "scheduler_cls": "(mora's scheduler, always: adapter-aware admission with a bound; --admission-max-passes)",
    "structured_outputs_config": "--structured-output-backend and --structured-output-compact-json",
}


def _engine_fields() -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    namespace: dict[str, Any] = {}
    for klass in reversed(AsyncEngineArgs.__mro__):
        namespace.update(vars(sys.modules[klass.__module__]))
    out = {}
    for f in dataclasses.fields(AsyncEngineArgs):
        if not f.init:
            continue
        try:  # one field at a time: a few annotate with names only imported for type checkers
            out[f.name] = typing._eval_type(typing.ForwardRef(f.type), namespace, None) if isinstance(f.type, str) else f.type
        except Exception:  # noqa: BLE001 - left to vLLM's own check when the engine is built
            out[f.name] = Any
    return out


def validate_engine_args(values: dict[str, Any]) -> dict[str, Any]:
    """`values` checked against vLLM's `AsyncEngineArgs`; returns them converted to the declared
    types. Raises ValueError naming every unknown, managed or mistyped key."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    fields = _engine_fields()
    problems: list[str] = []
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key in MANAGED:
            problems.append(f"{raw_key!r} is managed by mora-serve: use {MANAGED[key]}")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{raw_key!r} is not a vLLM engine argument{hint}")
            continue
        try:
            adapter = TypeAdapter(fields[key], config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # noqa: BLE001 - a type pydantic cannot describe: vLLM checks it when the engine is built
            out[key] = value
            continue
        try:
            out[key] = adapter.validate_python(value)
        except ValidationError as e:
            detail = "; ".join(err["msg"] for err in e.errors()[:2])
            problems.append(f"{raw_key!r}: {value!r} does not fit vLLM's type {fields[key]} ({detail})")
    if problems:
        raise ValueError("engine arguments: " + "; ".join(problems))
    return out
