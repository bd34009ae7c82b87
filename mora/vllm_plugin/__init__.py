"""vLLM integration: serve MoRA adapters with vLLM's own LoRA machinery.

Installed as the `vllm.general_plugins` entry point `mora`, so every vLLM process (API,
engine core, workers) calls `register()` before it builds a model. With the package installed,
a plain vLLM user serves MoRA adapters unchanged:

    llm = LLM(model=..., enable_lora=True, max_loras=4, max_lora_rank=16)
    llm.generate(prompts, params, lora_request=LoRARequest("tenant-a", 1, "/path/to/mora_adapter"))

`register()` puts MoRA-capable wrappers in front of vLLM's LoRA layer classes, installs the
MoRA-aware worker LoRA manager and the CUDA-graph cases of MoRA steps (graphs.py), and selects
vLLM's V1 model runner unless one was chosen. It is idempotent, cheap and touches no device. Every vLLM
internal it relies on is listed in `coupling.py` and checked first, with the vLLM version:
when one is missing it raises `VllmCouplingError` and the engine does not start. It never
leaves vLLM stock silently (stock vLLM would die on the first MoRA adapter, or serve base
outputs if a renamed hook stopped being called).
"""

from __future__ import annotations

import logging
import os

__all__ = ["register"]

log = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    global _registered
    if _registered:
        return
    from mora.vllm_plugin.coupling import check

    version = check()  # raises VllmCouplingError: the engine must not start without MoRA
    from mora.vllm_plugin.graphs import install as install_graphs
    from mora.vllm_plugin.guard import install as install_guards

    install_guards()  # finite KV cache, no orphan processes (see guard.py)
    install_graphs()  # CUDA-graph cases by step kind; the CPU build compiles with LoRA (graphs.py)
    # The graph cases are built on vLLM's V1 model runner; the manager refuses V2 if asked for.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    import vllm.v1.worker.lora_model_runner_mixin as runner_mixin

    from mora.vllm_plugin.layers import MORA_LAYER_CLASSES
    from mora.vllm_plugin.logits import mora_logits_processor
    from mora.vllm_plugin.worker_manager import MoraWorkerLoRAManager

    # `from_layer` walks this ordered tuple and takes the first class that can replace a
    # layer; ours subclass the stock wrappers, so putting them first is all it takes.
    stock = tuple(c for c in lora_utils._all_lora_classes if c not in MORA_LAYER_CLASSES)
    lora_utils._all_lora_classes = MORA_LAYER_CLASSES + stock
    # The logits processor is built apart from the other wrappers (logits.py).
    model_manager.from_layer_logits_processor = mora_logits_processor
    # The v1 model runner builds its worker LoRA manager from this module attribute.
    runner_mixin.LRUCacheWorkerLoRAManager = MoraWorkerLoRAManager
    _registered = True
    log.debug("mora vLLM plugin registered on vLLM %s", version)
