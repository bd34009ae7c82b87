"""Every vLLM internal the MoRA plugin relies on, in one place, checked before registering.

MoRA rides on vLLM's LoRA machinery: it replaces internal classes and module attributes,
overrides private methods and reads private attributes (every one of them is listed here:
tests/test_coupling.py fails when the plugin touches a private name this list lacks). If a vLLM upgrade renames one, stock vLLM either dies on the first
MoRA adapter or, worse, silently stops calling our override and serves base-model outputs.
So `check()` verifies the vLLM version and each internal below, and `register()` raises
`VllmCouplingError` (the engine does not start) when anything is off. `docs/gpu.md` lists the
same table for readers.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

__all__ = ["INTERNALS", "SUPPORTED_VLLM", "Internal", "VllmCouplingError", "check"]

SUPPORTED_VLLM = ("0.32.",)  # version prefixes this plugin was written and tested against


class VllmCouplingError(RuntimeError):
    """The installed vLLM lacks an internal the MoRA plugin needs (or is another version)."""


@dataclass(frozen=True)
class Internal:
    module: str
    attr: str  # dotted path inside the module
    why: str
    calls: str | None = None  # the attribute (a function) must still call this name

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"


INTERNALS: tuple[Internal, ...] = (
    Internal("vllm.lora.utils", "_all_lora_classes", "register() puts the MoRA layer wrappers first in it"),
    Internal("vllm.v1.worker.lora_model_runner_mixin", "LRUCacheWorkerLoRAManager",
             "register() replaces it with MoraWorkerLoRAManager (the runner builds its manager from it)"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_sync", "the wrappers' forward path",
             calls="_apply_lora_to_output"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output",
             "overridden: adds the MoRA update after the stock LoRA one"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights", "overridden: allocates the slot tables"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.reset_lora", "overridden: clears a slot"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", "overridden: a LoRA adapter takes a slot"),
    Internal("vllm.lora.layers", "ColumnParallelLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.layers", "MergedColumnParallelLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.layers", "QKVParallelLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.layers", "MergedQKVParallelLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.layers", "RowParallelLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.layers", "ReplicatedLinearWithLoRA", "subclassed"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._load_adapter",
             "overridden: MoRA checkpoints load through the mora library"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.set_active_adapters",
             "overridden: activates every adapter id the step's mapping uses (two versions of one name)",
             calls="set_adapter_mapping"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.create_lora_manager",
             "sets _adapter_manager, the model manager the worker manager and the extension use",
             calls="_adapter_manager"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._apply_adapters",
             "overridden: touches the step's adapters in the host cache first; called by set_active_adapters"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter",
             "overridden: counts host-cache hits and misses; reads an adapter missing from the host cache",
             calls="_load_adapter"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.list_adapters",
             "overridden: the host cache's ids without vLLM's ordered copy (add_adapter asks per adapter per step)"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.remove_adapter",
             "overridden: forgets the adapter's staged copy and request"),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager.remove_oldest_adapter",
             "overridden: counts host-cache evictions (vLLM's LRU skips pinned adapters)"),
    Internal("vllm.lora.model_manager", "AdapterLRUCache", "the host cache (_registered_adapters) and device slots "
             "(_active_adapters): touch, pin and pinned_items are used by tiers and pins"),
    Internal("vllm.utils.cache", "LRUCache.pin", "mora_pin keeps preloaded adapters in the host cache"),
    Internal("vllm.utils.cache", "LRUCache.touch", "the step's adapters are touched before vLLM evicts"),
    Internal("vllm.lora.model_manager", "LoRAModelManager.__init__", "the host cache and the slot map the tiers read",
             calls="_registered_adapters"),
    Internal("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._manager_cls", "set to MoraLoRAModelManager"),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager.activate_adapter",
             "overridden: writes a MoRA adapter's M's into its slot"),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager._add_adapter", "overridden: MoRA adapters are not packed"),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager.remove_adapter", "overridden: a merged adapter stays"),
    Internal("vllm.lora.model_manager", "LRUCacheLoRAModelManager.set_adapter_mapping",
             "overridden: the step's adapter-mapping step, where MoRA compacts slots, hides MoRA tokens from "
             "vLLM's mapping and prepares the step",
             calls="_set_adapter_mapping"),
    Internal("vllm.lora.layers", "LoRAMapping", "the step's adapters by token (index_mapping) and by sampled row "
             "(prompt_mapping): read on the host, rebuilt without the MoRA adapters", calls="prompt_mapping"),
    Internal("vllm.lora.layers", "LoRAMappingType", "MoRA serves the language model's (LANGUAGE) mappings"),
    Internal("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin.set_active_loras",
             "a step's mapping holds its scheduled (unpadded) tokens", calls="num_scheduled_tokens"),
    Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model",
             "prepares a step's adapters (in _prepare_inputs) before it dispatches its CUDA graph",
             calls="_determine_batch_execution_and_padding"),
    Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._determine_batch_execution_and_padding",
             "dispatches a step's CUDA graph by its LoRA case", calls="cudagraph_dispatcher.dispatch"),
    Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._dummy_run", "wrapped (graphs.py): warm-ups and "
             "captures launch what their LoRA case asks for, whatever the dummy adapters are",
             calls="maybe_dummy_run_with_lora"),
    Internal("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin.maybe_select_dummy_loras",
             "a capture case below 1 (0, and MoRA's -1) activates no dummy adapter", calls="effective_num_loras > 0"),
    Internal("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher._get_lora_cases",
             "wrapped (graphs.py): adds the MoRA-only capture case", calls="cudagraph_specialize_lora"),
    Internal("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.initialize_cudagraph_keys",
             "makes a graph key per capture size and LoRA case", calls="_get_lora_cases"),
    Internal("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher.dispatch",
             "wrapped (graphs.py): a step replays the graph of its kind", calls="num_active_loras"),
    Internal("vllm.config", "VllmConfig.use_v2_model_runner", "the graph cases are built on the V1 runner: "
             "register() selects it (VLLM_USE_V2_MODEL_RUNNER=0 unless set), the manager refuses V2",
             calls="VLLM_USE_V2_MODEL_RUNNER"),
    Internal("vllm.utils.network_utils", "get_open_zmq_ipc_path", "the engine face points VLLM_RPC_BASE_PATH at a "
             "private folder it removes at shutdown (vLLM leaves its IPC sockets in the temp folder)",
             calls="VLLM_RPC_BASE_PATH"),
    Internal("vllm.config.lora", "LoRAConfig", "fully_sharded_loras=True is refused at start (its layer classes are "
             "not MoRA's)", calls="fully_sharded_loras"),
    Internal("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", "wrapped (graphs.py): keeps compilation "
             "with LoRA (it turns it off because its CPU LoRA ops branch on the host; ours run inside ops)",
             calls="lora_config"),
    Internal("vllm.lora.model_manager", "LoRAModelManager._create_lora_modules", "builds the LoRA logits processor "
             "through the module global register() replaces (logits.py)", calls="from_layer_logits_processor"),
    Internal("vllm.lora.model_manager", "from_layer_logits_processor", "replaced: builds MoraLogitsProcessorWithLoRA"),
    Internal("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA._get_logits",
             "overridden: a step without LoRA tokens skips its LoRA add (logits.py)", calls="add_lora_logits"),
    Internal("vllm.model_executor.layers.logits_processor", "LogitsProcessor._get_logits",
             "the plain logits a step without LoRA tokens takes (logits.py)", calls="_apply_head"),
    Internal("vllm.lora.layers", "VocabParallelEmbeddingWithLoRA", "subclassed: its LoRA update runs inside an op "
             "in a compiled CPU model", calls="add_lora_embedding"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_async_impl",
             "overridden: the dual-stream path runs the synchronous one, MoRA update included"),
    Internal("vllm.lora.model_manager", "LoRAModelManager.__init__",
             "_active_adapters (device slots, an LRU) counts device evictions", calls="_active_adapters"),
    Internal("vllm.utils.cache", "LRUCache._unpin", "a merged adapter's pin is released after the unmerge"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.apply", "the dual-stream path "
             "(lora_linear_async) bypasses _apply_lora_to_output: the wrappers turn _enable_aux_cuda_stream off",
             calls="_enable_aux_cuda_stream"),
    Internal("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.__init__",
             "sets _enable_aux_cuda_stream (read by apply)", calls="_enable_aux_cuda_stream"),
    Internal("vllm.lora.model_manager", "LoRAModelManager.__init__", "reads max_num_batched_tokens for the step buffers",
             calls="max_num_batched_tokens"),
    Internal("vllm.lora.lora_model", "LoRAModel", "subclassed by MoraLoRAModel"),
    Internal("vllm.lora.utils", "get_adapter_absolute_path", "resolves adapter paths like stock vLLM"),
    Internal("vllm.model_executor.models.utils", "PPMissingLayer", "pipeline stages skip other stages' layers"),
    Internal("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm",
             "merging on the CPU repacks the oneDNN weights into a layer's cpu_linear (read and swapped by merges)",
             calls="cpu_linear"),
    Internal("vllm.model_executor.layers.attention.attention", "Attention.forward",
             "guard.py wraps it: keys and values are made finite before the KV-cache write", calls="unified_kv_cache_update"),
    Internal("vllm.model_executor.layers.linear", "UnquantizedLinearMethod",
             "merging refuses a layer with any other quant_method (a quantized base is served unmerged)"),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "subclassed by MoraScheduler (admission with a "
             "bound on passes); vLLM skips a request whose adapter cannot get a slot", calls="max_loras"),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.__init__", "MoraScheduler reads the waiting queue, the "
             "requests and additional_config", calls="self.waiting"),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "MoraScheduler's strict order (passes 0) repeats "
             "vLLM's slot check: a request's lora_int_id against the running requests' adapters", calls="lora_int_id"),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.__init__", "strict order reads the running requests and the "
             "LoRA config", calls="self.running"),
    Internal("vllm.v1.core.sched.request_queue", "RequestQueue.remove_requests", "MoraScheduler holds requests back"),
    Internal("vllm.v1.core.sched.request_queue", "RequestQueue.add_request", "MoraScheduler puts them back, in order"),
    Internal("vllm.v1.core.sched.output", "NewRequestData", "MoraScheduler counts passes from the admitted requests"),
    Internal("vllm.platforms.cpu", "CpuPlatform.import_kernels", "which of vLLM's CPU kernel libraries a CPU gets "
             "(quantized.py names it when a quantized base cannot run)", calls="_is_avx512_supported"),
    Internal("torch.cpu", "_is_avx512_supported", "quantized.py: the CPU feature vLLM's kernel library choice turns on"),
    Internal("torch.cpu", "_is_avx512_bf16_supported", "quantized.py: the CPU feature vLLM's kernel library choice turns on"),
)


def _resolve(item: Internal) -> object:
    obj: object = importlib.import_module(item.module)
    for part in item.attr.split("."):
        obj = getattr(obj, part)
    return obj


def check() -> str:
    """Verify the vLLM version and every internal; returns the version, raises
    `VllmCouplingError` naming everything missing."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    problems = []
    if not version.startswith(SUPPORTED_VLLM):
        problems.append(f"vLLM {version} is not a supported version ({', '.join(p + 'x' for p in SUPPORTED_VLLM)})")
    for item in INTERNALS:
        try:
            obj = _resolve(item)
        except (ImportError, AttributeError) as e:
            problems.append(f"{item.name} is missing ({item.why}): {e}")
            continue
        if item.calls is not None:
            try:
                source = inspect.getsource(obj.fget if isinstance(obj, property) else obj)
            except (OSError, TypeError):
                source = ""
            if item.calls not in source:
                problems.append(f"{item.name} no longer uses {item.calls} ({item.why})")
    if problems:
        raise VllmCouplingError(
            "the MoRA vLLM plugin cannot run on this vLLM; refusing to start rather than serve "
            "without MoRA:\n  - " + "\n  - ".join(problems)
        )
    return version
