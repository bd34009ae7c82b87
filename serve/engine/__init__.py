"""The engine face: vLLM's `AsyncLLM` in this process, with the mora plugin's worker extension.

The one part of `serve/` that imports vLLM (this package). It starts the engine, tokenizes,
generates (translating vLLM's outputs into `serve.engine.outputs` types and its client errors
into `InvalidRequest`), registers adapters, and calls the worker extension through the typed
worker API (`mora.vllm_plugin.worker_api`). All tensor work happens inside vLLM and `mora/`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from mora.vllm_plugin.worker_api import (
    EngineStatus,
    MergeState,
    PageIn,
    PageInState,
    TierReport,
    WorkerApi,
    decode_page_ins,
)
from serve.config import ServerSettings
from serve.engine.outputs import Alternative, EngineOutput, SequenceDelta
from serve.engine.read_ins import FIRST_DELAY_S, MAX_DELAY_S, ReadIns
from serve.engine.sampling import sampling_params
from serve.errors import InvalidRequest, Unavailable
from serve.services.requests import Sampling

__all__ = ["AdapterHandle", "Engine", "EngineError"]

log = logging.getLogger(__name__)
EXTENSION = "mora.vllm_plugin.extension.MoraWorkerExtension"
SCHEDULER = "mora.vllm_plugin.scheduler.MoraScheduler"  # adapter-aware admission with a bound on passes
ADMISSION_KEY = "mora_admission_max_passes"  # its bound, in vLLM's additional_config
DEATH_POLL_S = 0.5  # how often a call waiting on the engine checks that it is still alive
IPC_BASE_ENV = "VLLM_RPC_BASE_PATH"  # where vLLM puts its IPC sockets (coupling.py)
T = TypeVar("T")
AdapterHandle = Any  # vLLM's LoRARequest for one registered adapter version (opaque to callers)


class EngineError(RuntimeError):
    """The engine refused an operation (its message says why); the engine itself is fine."""


def _worker_message(e: Exception) -> str:
    """vLLM wraps worker errors as "... Worker failed with error '<msg>', please check ..."."""
    message = str(e)
    marker = "Worker failed with error '"
    if marker in message:
        message = message.split(marker, 1)[1].split("', please check", 1)[0]
    return message


def _output(out: Any) -> EngineOutput:
    """vLLM's `RequestOutput` (a delta) as our types."""
    sequences = []
    for c in out.outputs:
        logprobs = None
        if c.logprobs is not None:
            logprobs = tuple({i: Alternative(float(lp.logprob), lp.rank, lp.decoded_token) for i, lp in step.items()}
                             for step in c.logprobs)
        sequences.append(SequenceDelta(c.index, c.text, tuple(c.token_ids), logprobs, c.finish_reason, c.stop_reason))
    m = out.metrics
    wait = None
    if m is not None and getattr(m, "scheduled_ts", 0) and getattr(m, "queued_ts", 0):
        wait = max(0.0, m.scheduled_ts - m.queued_ts)
    return EngineOutput(tuple(sequences), bool(out.finished), wait)


class Engine:
    """One vLLM engine serving the base model and its adapters."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.llm: Any = None
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.eos_token_id: int | None = None
        self.dtype: Any = None  # torch dtype the engine serves in (adapters are validated in it)
        self.max_logprobs = 0
        self.quantization: str | None = None
        self._read_ins = ReadIns(self.prefetch)
        self._ipc_dir: str | None = None

    async def start(self) -> None:
        """Build the engine (tens of seconds on a CPU) without blocking the event loop."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        if IPC_BASE_ENV not in os.environ:
            # vLLM names its ZeroMQ IPC sockets in the temp folder and never removes them (dozens
            # per start, world-listable): a private folder (0700), removed at shutdown. Set only
            # while the engine starts: it names its sockets then, and the processes it spawns
            # keep the environment they were started with (nothing else here inherits it).
            self._ipc_dir = tempfile.mkdtemp(prefix="mora-ipc-")
        args = AsyncEngineArgs(
            model=str(s.model),
            dtype=s.dtype,
            enable_lora=True,
            max_loras=s.max_loras,
            max_cpu_loras=s.max_cpu_loras,
            max_lora_rank=s.max_lora_rank,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            kv_cache_memory_bytes=s.kv_cache_bytes,
            enforce_eager=s.enforce_eager,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            distributed_executor_backend=s.distributed_executor_backend,
            worker_extension_cls=EXTENSION,
            scheduler_cls=SCHEDULER,
            disable_log_stats=False,
            structured_outputs_config=StructuredOutputsConfig(backend=s.structured_output_backend,
                                                              disable_any_whitespace=s.structured_output_compact_json),
            # anything else of vLLM's EngineArgs, validated in the settings; the served name (metrics'
            # model_name label) defaults to the model directory's name, never its path
            **{"seed": 0, "served_model_name": s.model_name, **s.engine,
               "additional_config": {**s.engine.get("additional_config", {}), ADMISSION_KEY: s.admission_max_passes}},
        )
        try:
            if self._ipc_dir is not None:
                os.environ[IPC_BASE_ENV] = self._ipc_dir
            self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as e:  # noqa: BLE001 - vLLM reports a failed engine process only as "see above"
            raise RuntimeError(f"the vLLM engine did not start ({e}); the engine's own error is logged above "
                               "(for example a quantized base whose kernels this CPU lacks)") from None
        finally:
            if self._ipc_dir is not None:
                os.environ.pop(IPC_BASE_ENV, None)
        await self.require_mora()
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.dtype = self.llm.model_config.dtype
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        self.max_logprobs = max(0, self.llm.model_config.max_logprobs)
        self.quantization = self.llm.model_config.quantization  # None for a dense base
        log.info("engine ready: %s, max_model_len=%d, %d adapter slots", s.model, self.max_model_len, s.max_loras)

    async def require_mora(self) -> None:
        """The engine must run the MoRA wrappers: a plugin that failed to import, or a
        VLLM_PLUGINS list without `mora`, leaves vLLM stock (and the worker extension without its
        manager), which would serve base outputs for MoRA adapters. Checked on every worker
        before the server reports SERVING."""
        try:
            statuses = await self._unless_dead(self.llm.collective_rpc(WorkerApi.mora_status.__name__))
        except Exception as e:  # noqa: BLE001 - vLLM wraps worker errors in a bare Exception
            raise RuntimeError(f"the engine started without MoRA ({_worker_message(e)}); is the mora plugin installed "
                               "and in VLLM_PLUGINS?") from None
        layers = [EngineStatus.decode(st).mora_layers for st in statuses]
        if not layers or min(layers) == 0:
            raise RuntimeError(f"the engine started without the MoRA layer wrappers (MoRA layers per worker: {layers}); "
                               "the mora plugin did not register (VLLM_PLUGINS must include 'mora')")

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.llm.errored

    @property
    def dead(self) -> bool:
        return self.llm is not None and self.llm.errored

    def _require(self) -> Any:
        if self.llm is None:
            raise Unavailable("the engine is starting")
        if self.llm.errored:
            raise Unavailable("the engine has stopped")
        return self.llm

    async def _unless_dead(self, call: Awaitable[T]) -> T:
        """Await an engine call, failing with `Unavailable` if the engine dies meanwhile.

        vLLM marks a dead engine core but never answers, nor fails, a utility call (adapter
        add, worker RPC) that was in flight when the process died: awaited bare, the caller
        (a client's RPC, the health monitor) would wait forever.
        """
        task = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DEATH_POLL_S)
            if done:
                return task.result()
            if self.llm is None or self.llm.errored:
                task.cancel()
                raise Unavailable("the engine stopped while the call was in flight")

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages as prompt token ids, through the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("the model's tokenizer has no chat template: send a prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may raise on messages it does not accept
            raise InvalidRequest(f"the chat template refused the messages: {e}") from None
        # The template writes the special tokens it wants (BOS included), as in HF and vLLM's server.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: Sampling,
                       adapter: AdapterHandle | None) -> AsyncIterator[EngineOutput]:
        """The engine's output stream for one request (deltas); `sampling` already checked
        (`serve.services.requests.check_sampling`)."""
        from vllm.exceptions import VLLMClientError

        llm = self._require()
        params = sampling_params(sampling)
        try:
            async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=adapter):
                yield _output(out)
        except VLLMClientError as e:  # the engine's own "bad request" errors (a constraint it cannot compile...)
            constraint = f" (the request's {sampling.constraint.kind.value} constraint)" if sampling.constraint else ""
            raise InvalidRequest(f"{e}{constraint}") from None

    async def abort(self, request_id: str) -> None:
        if self.llm is not None and not self.llm.errored:
            await self.llm.abort(request_id)

    # -- adapters --------------------------------------------------------------------------

    @staticmethod
    def adapter_handle(name: str, engine_id: int, path: str) -> AdapterHandle:
        """How the engine names one registered adapter version (its snapshot at `path`)."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, engine_id, path)

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        """Register an adapter; the engine validates it again and the error says why not."""
        try:
            await self._unless_dead(self._require().add_lora(adapter))
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM wraps worker errors in a bare Exception
            raise EngineError(_worker_message(e)) from None

    async def remove_adapter(self, engine_id: int) -> None:
        if self.ready:
            await self.llm.remove_lora(engine_id)

    # -- the worker API (mora.vllm_plugin.worker_api) --------------------------------------

    async def _call(self, method: Callable[..., T], *args: Any) -> T:
        """One worker API call on every worker; the first worker's answer (all ranks do the same)."""
        try:
            results = await self._unless_dead(self._require().collective_rpc(method.__name__, args=args))
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001
            raise EngineError(_worker_message(e)) from None
        return results[0]

    async def _call_until(self, done: Callable[[T], bool], method: Callable[..., T], *args: Any) -> tuple[T, float]:
        """`_call(method, *args)` until `done(answer)`, 5 ms apart at first and 50 ms at most
        (each call runs between two engine steps; `ReadIns` polls on the same schedule); the
        last answer and the longest call."""
        loop = asyncio.get_running_loop()
        longest, delay = 0.0, FIRST_DELAY_S
        while True:
            started = loop.time()
            answer = await self._call(method, *args)
            longest = max(longest, loop.time() - started)
            if done(answer):
                return answer, longest
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)

    async def prefetch(self, items: list[PageIn]) -> dict[int, PageInState]:
        """Where each adapter is; a cold MoRA adapter starts reading off the step loop."""
        return decode_page_ins(await self._call(WorkerApi.mora_prefetch, items))

    async def read_in(self, item: PageIn) -> PageInState:
        """Read one adapter into the host cache off the step loop; its settled state (reads
        asked for at the same time share each call: `ReadIns`)."""
        return await self._read_ins.read_in(item)

    async def pin(self, engine_id: int) -> EngineStatus:
        return EngineStatus.decode(await self._call(WorkerApi.mora_pin, engine_id))

    async def tier_stats(self) -> TierReport:
        return TierReport.decode(await self._call(WorkerApi.mora_tier_stats))

    async def prepare_merge(self, engine_id: int) -> tuple[EngineStatus, float]:
        """Prepare a merge a slice per call between the engine's steps, without swapping it in
        (`commit_merge` does; `cancel_merge` drops it); the status and the longest one call
        kept the engine from stepping."""
        status, stall = await self._call_until(lambda s: EngineStatus.decode(s).state is not MergeState.PREPARING,
                                               WorkerApi.mora_merge, engine_id, True, self.settings.merge_memory_bytes, False)
        return EngineStatus.decode(status), stall

    async def commit_merge(self, engine_id: int) -> EngineStatus:
        return EngineStatus.decode(await self._call(WorkerApi.mora_merge_commit, engine_id))

    async def cancel_merge(self, engine_id: int) -> EngineStatus:
        return EngineStatus.decode(await self._call(WorkerApi.mora_merge_cancel, engine_id))

    async def unmerge(self) -> EngineStatus:
        return EngineStatus.decode(await self._call(WorkerApi.mora_unmerge))

    async def status(self) -> EngineStatus:
        return EngineStatus.decode(await self._call(WorkerApi.mora_status))

    # -- lifecycle -------------------------------------------------------------------------

    async def check_health(self) -> bool:
        if self.llm is None or self.llm.errored:
            return False
        try:
            await self.llm.check_health()
        except Exception:  # noqa: BLE001
            return False
        return True

    def shutdown(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.shutdown()
            # Collect it now: AsyncLLM.__del__ at interpreter exit would shut down twice.
            del llm
            gc.collect()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
