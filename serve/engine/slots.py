"""How many adapter slots a step gets: `max_loras`, or with `max_loras: auto` as many as the
slot memory budget (`adapter_slots_bytes`) holds for this model.

A slot costs the same on every step, whether or not it is used: vLLM's stacked LoRA buffers for
rank `max_lora_rank` and one row of the MoRA slot table, on every adapted module
(`mora.kernels.table.slot_bytes`). The kernels' time does not grow with idle slots (they visit
the step's adapters only: bench.scale measures the steps), so the budget is memory alone.
"""

from __future__ import annotations

import logging

import torch

from mora.hf import module_shapes_from_config
from mora.kernels.table import slot_bytes
from serve.config import ServerSettings
from serve.config.settings import MAX_SLOTS

__all__ = ["resolve_slots"]

log = logging.getLogger(__name__)
DTYPE_BYTES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_slots(settings: ServerSettings) -> ServerSettings:
    """`settings` with `max_loras` a number (and `max_cpu_loras` at least that: the host cache
    must hold one step's adapters)."""
    if settings.max_loras != "auto":
        return settings
    # "auto" may serve a float32 checkpoint in float32: size for the widest a slot can be.
    dtype = DTYPE_BYTES.get(settings.dtype, torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_slot = slot_bytes(module_shapes_from_config(settings.model), settings.max_lora_rank, dtype, device)
    slots = max(1, min(MAX_SLOTS, settings.adapter_slots_bytes // per_slot))
    host = max(settings.max_cpu_loras, slots)
    log.info("max_loras auto: %d slots of %d bytes in adapter_slots_bytes=%d (max_cpu_loras %d)", slots, per_slot,
             settings.adapter_slots_bytes, host)
    return settings.model_copy(update={"max_loras": slots, "max_cpu_loras": host})
