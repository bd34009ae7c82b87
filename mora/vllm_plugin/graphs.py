"""Which CUDA graph a MoRA step replays, and what each graph records at capture.

vLLM's model runner (with `cudagraph_specialize_lora`, its default) captures every batch size
once per LoRA case: `num_active_loras = 0` (no adapter: vLLM's LoRA kernels skip themselves on
the host, nothing of theirs is recorded) and `max_loras + 1` (its dummy stock adapters active:
every LoRA kernel recorded). Any request with an adapter makes a step replay the second, so
every MoRA token and every token of a merged adapter would run vLLM's shrink and expand over
zero weights. The plugin adds one case and dispatches every step by its kind
(`mora.kernels.StepKind`, computed by the manager from the step's adapters, on the host):

| step's tokens                               | kind      | graph replayed               | launches            |
|---------------------------------------------|-----------|------------------------------|---------------------|
| base only, or only the merged adapter's     | NONE      | `num_active_loras = 0`       | the base GEMMs      |
| MoRA (with base or merged-adapter tokens)   | MORA      | `num_active_loras = MORA_ONLY` | the MoRA kernels  |
| any stock LoRA adapter                      | LORA(+MORA) | vLLM's own (`max_loras + 1`, ...) | both          |

At capture vLLM runs `_dummy_run(num_active_loras=case)` with its dummy stock adapters (the
MoRA tables are empty), and the launches recorded are decided by the case, never by what the
tables hold: `_dummy_run` is wrapped to force the case's kind (`MoraRuntime.forcing`) while its
warm-up mapping is prepared, and the ops' bodies launch what that kind asks for. The MORA_ONLY
case is captured with no stock adapter active (vLLM's kernels skip themselves) while the MoRA
op launches. A step's dispatch comes after its preparation (`execute_model`: `_prepare_inputs`
sets the adapters, then `_determine_batch_execution_and_padding` dispatches), so the wrapped
`dispatch` reads the step's kind. When a case was not captured (`cudagraph_specialize_lora`
off), the step takes vLLM's own graph, which records everything and stays exact.

This runs on vLLM's V1 model runner (the CPU runner is one, so the CPU tests run this code);
`register()` selects it, and the manager refuses the V2 runner, whose graph manager this does
not cover.
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref
from collections.abc import Callable
from typing import Any

from mora.kernels import StepKind

__all__ = ["MORA_ONLY", "current_runtime", "install", "kind_of_case", "set_current_runtime"]

MORA_ONLY = -1  # the `num_active_loras` case of the MoRA-only graphs
_current: weakref.ReferenceType | None = None


def set_current_runtime(runtime: object) -> None:
    """The MoRA runtime of this process's model (one engine per worker process)."""
    global _current
    _current = weakref.ref(runtime)


def current_runtime() -> Any:
    return None if _current is None else _current()


def kind_of_case(num_active_loras: int) -> StepKind:
    """What a graph captured for vLLM's LoRA case `num_active_loras` must record."""
    if num_active_loras == MORA_ONLY:
        return StepKind.MORA
    return StepKind.NONE if num_active_loras <= 0 else StepKind.MORA | StepKind.LORA


def _lora_cases(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def cases(self: Any) -> list[int]:
        out = list(orig(self))
        if 0 in out and MORA_ONLY not in out:  # specialized: add the MoRA-only graphs
            out.insert(out.index(0) + 1, MORA_ONLY)
        return out

    cases._mora_wrapped = True  # type: ignore[attr-defined]
    return cases


def _dispatch(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def dispatch(self: Any, num_tokens: int, uniform_decode: bool = False, has_lora: bool = False,
                 num_active_loras: int = 0, valid_modes: Any = None, invalid_modes: Any = None) -> Any:
        rt = current_runtime()
        if rt is None or not rt.graph_safe or rt.forced is not None or num_active_loras == MORA_ONLY:
            # a dummy run: its case is the key
            return orig(self, num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)
        if StepKind.LORA not in rt.kind:
            case = MORA_ONLY if StepKind.MORA in rt.kind else 0
            try:
                mode, desc = orig(self, num_tokens, uniform_decode, False, case, valid_modes, invalid_modes)
            except AssertionError:  # not captured, and running without a graph is not allowed here
                mode, desc = None, None
            if desc is not None and (desc.num_active_loras == case or not has_lora):
                return mode, desc
        return orig(self, num_tokens, uniform_decode, has_lora, num_active_loras, valid_modes, invalid_modes)

    dispatch._mora_wrapped = True  # type: ignore[attr-defined]
    return dispatch


def _dummy_run(orig: Callable) -> Callable:
    signature = inspect.signature(orig)

    @functools.wraps(orig)
    def dummy_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = current_runtime()
        if rt is None:
            return orig(self, *args, **kwargs)
        case = signature.bind(self, *args, **kwargs).arguments.get("num_active_loras", 0)
        with rt.forcing(kind_of_case(case)):
            return orig(self, *args, **kwargs)

    dummy_run._mora_wrapped = True  # type: ignore[attr-defined]
    return dummy_run


def _keep_cpu_compilation(orig: Callable) -> Callable:
    """vLLM's CPU platform turns compilation off whenever LoRA is enabled: its CPU LoRA ops
    (`punica_cpu`) branch on the host (`no_lora`, `is_prefill`, the batch's sizes), which a trace
    made once would bake in. With the plugin every LoRA update in the compiled forward runs
    inside an op (`mora::stock_lora`, `mora::stock_embedding`, `mora::fused_apply`), whose body
    runs every step: the compiled model is exact, and merged or base-only traffic gets the
    compiled base model's speed. `enforce_eager=True` still turns it off.

    It also makes vLLM's older compile cache the CPU default (`VLLM_USE_AOT_COMPILE=0` unless
    set): the CPU build compiles with the plain Inductor backend, whose AOT artifact vLLM 0.32
    cannot load ("'function' object has no attribute 'finalize_loading'"), so every start with
    AOT on compiled the model again; Inductor's own caches load (tests/test_compile_cache.py)."""

    @functools.wraps(orig)
    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            orig(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora
        # Read when the model is compiled, after this (the engine-core processes inherit it).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

    check_and_update_config._mora_wrapped = True  # type: ignore[attr-defined]
    return check_and_update_config


def install() -> None:
    """Wrap vLLM's graph dispatcher and dummy runs, and keep the CPU build's compilation with
    LoRA (idempotent; every wrapped internal is in coupling.py)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for owner, name, wrap in ((CudagraphDispatcher, "_get_lora_cases", _lora_cases),
                              (CudagraphDispatcher, "dispatch", _dispatch),
                              (GPUModelRunner, "_dummy_run", _dummy_run)):
        fn = getattr(owner, name)
        if not getattr(fn, "_mora_wrapped", False):
            setattr(owner, name, wrap(fn))
    fn = CpuPlatform.check_and_update_config.__func__
    if not getattr(fn, "_mora_wrapped", False):
        CpuPlatform.check_and_update_config = classmethod(_keep_cpu_compilation(fn))
