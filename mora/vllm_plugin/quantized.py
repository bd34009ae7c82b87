"""A quantized base model inside a vLLM worker: which layers are quantized, and whether this
machine can run them.

vLLM's CPU build ships its kernels in one library per CPU kind (`vllm._C` for AVX-512 with
AVX512_BF16, `vllm._C_AVX512`, `vllm._C_AVX2`) and loads the one the CPU can run. They do not
hold the same ops: the AVX2 build has no `cpu_gemm_wna16` (the W4A16 GEMM of GPTQ, AWQ and
compressed-tensors `pack-quantized`) and no `int8_scaled_mm_with_quant`. vLLM builds the model
and starts serving anyway, then dies at the first step that reaches the missing op.

`check_quantized_layers` runs every kind of quantized layer of the model once, on one row of
zeros, when the plugin's model manager is built (`MoraLoRAModelManager.__init__`, before the
engine reports ready). A kernel this machine lacks fails there, and the engine refuses to start
with `QuantizationUnsupportedError`, naming the quantization method and what the CPU lacks,
instead of serving until its first request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mora.errors import MergeError, QuantizationUnsupportedError

__all__ = ["QuantizedLayer", "check_quantized_layers", "cpu_kernel_build", "quantized_layers", "refuse_merge"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized linear layer of the base model (through its LoRA wrapper)."""

    name: str
    layer: torch.nn.Module
    method: str  # the quantization config's name, e.g. "compressed-tensors", "gptq", "awq"
    scheme: str  # the layer's kernel family, e.g. "CompressedTensorsWNA16"

    @property
    def kind(self) -> tuple[str, str]:
        return self.method, self.scheme


def _quant_method(base: torch.nn.Module) -> object | None:
    """The layer's quant method, or None for a dense (unquantized) layer."""
    quant = getattr(base, "quant_method", None)
    if quant is None:  # no quant method at all (a plain layer: bench/gpu_contract.py's, without vLLM)
        return None
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return None if isinstance(quant, UnquantizedLinearMethod) else quant


def quantized_layers(modules: Iterable[tuple[str, torch.nn.Module]]) -> list[QuantizedLayer]:
    """The quantized base layers among LoRA-wrapped `modules` (`(name, wrapper)` pairs)."""
    out = []
    for name, module in modules:
        base = getattr(module, "base_layer", module)
        quant = _quant_method(base)
        if quant is None:
            continue
        config = getattr(quant, "quant_config", None) or getattr(quant, "quantization_config", None)
        method = config.get_name() if hasattr(config, "get_name") else type(quant).__name__
        scheme = type(getattr(base, "scheme", None) or quant).__name__
        out.append(QuantizedLayer(name, base, str(method), scheme))
    return out


def refuse_merge(base: torch.nn.Module) -> None:
    """Raise `MergeError` if `base` is quantized: adding a float update to integer codes would
    corrupt them, and re-quantizing would make the unmerge inexact, so a quantized base serves
    its adapters unmerged only."""
    quant = _quant_method(base)
    if quant is not None:
        raise MergeError(f"the base model is quantized ({type(quant).__name__}): MoRA adapters on it are served unmerged only")


def cpu_kernel_build() -> tuple[str, str | None]:
    """(which of vLLM's CPU kernel libraries this CPU gets, the CPU feature it lacks for the
    fuller one or None), as `vllm.platforms.cpu.CpuPlatform.import_kernels` chooses."""
    if not hasattr(torch, "cpu") or not hasattr(torch.cpu, "_is_avx512_supported"):
        return "vllm._C", None
    if not torch.cpu._is_avx512_supported():
        return "vllm._C_AVX2", "AVX-512F"
    if not torch.cpu._is_avx512_bf16_supported():
        return "vllm._C_AVX512", "AVX512_BF16"
    return "vllm._C", None


def _why(error: BaseException, device: torch.device) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    if device.type != "cpu":
        return text
    build, lacks = cpu_kernel_build()
    if lacks is None:
        return text
    return (f"{text}; vLLM's CPU build loaded its {build} kernels because this CPU has no {lacks}, and they lack "
            f"the kernel this quantization needs")


def check_quantized_layers(modules: Iterable[tuple[str, torch.nn.Module]], dtype: torch.dtype, device: torch.device) -> int:
    """Run one layer of every quantization kind in `modules` on one row of zeros; raise
    `QuantizationUnsupportedError` (naming the method, the layer kind and what the CPU lacks)
    for the first kind whose kernel cannot run here. Returns how many kinds were checked.

    A warm-up of the real forward rather than a list of op names: whatever vLLM's kernel for a
    layer needs (an op, an ISA, a dtype), the check needs nothing to be kept in step with it.
    """
    seen: set[tuple[str, str]] = set()
    for q in quantized_layers(modules):
        if q.kind in seen:
            continue
        seen.add(q.kind)
        width = getattr(q.layer, "input_size_per_partition", None) or q.layer.input_size
        x = torch.zeros(1, int(width), dtype=dtype, device=device)
        try:
            with torch.inference_mode():
                q.layer.quant_method.apply(q.layer, x)
        except Exception as e:  # noqa: BLE001 - any failure of the kernel means the base cannot be served here
            raise QuantizationUnsupportedError(
                f"the base model is quantized with {q.method} ({q.scheme}, e.g. layer {q.name}) and this machine "
                f"cannot run it: {_why(e, device)}. Serve an unquantized base here, or use a machine whose CPU has "
                f"what this kernel needs.") from None
        log.debug("quantized layers %s (%s) run on this machine", q.method, q.scheme)
    return len(seen)
