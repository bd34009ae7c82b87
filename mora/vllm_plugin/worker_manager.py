"""vLLM's worker-side LoRA manager, loading MoRA checkpoints through the mora library.

* `MoraWorkerLoRAManager._load_adapter`: a checkpoint whose config says `use_mora` is read and
  validated by the mora library against the running model (module shapes, `n` per module,
  rank within `max_lora_rank`, finite values...) and becomes a `MoraLoRAModel`; anything else
  takes vLLM's stock path. Validation errors are `mora.errors` types with clear messages.
* `mora_prefetch` says where each adapter is and starts reading a cold MoRA adapter's snapshot
  in the background (`Stager`), so that the server can wait for it before queueing a request
  and the read never runs inside another tenant's step.
* Once per engine step, `set_active_adapters` loads and activates every adapter the step's
  mapping uses; the step's MoRA preparation happens in the model manager's adapter-mapping
  step (`MoraLoRAModelManager.set_adapter_mapping`, mora/vllm_plugin/manager.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from vllm.lora.lora_model import LoRAModel
from vllm.lora.utils import get_adapter_absolute_path
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from mora.checkpoint import load_mora_adapter
from mora.vllm_plugin.manager import MoraLoRAModelManager
from mora.vllm_plugin.models import MoraLoRAModel
from mora.vllm_plugin.tiers import Stager, read_snapshot, snapshot_in_page_cache
from mora.vllm_plugin.worker_api import PageIn, PageInState, Residence

__all__ = ["MoraWorkerLoRAManager"]


def _declares_mora(path: Path) -> bool:
    """Whether the adapter config asks for MoRA (then MoRA's rules apply, errors included)."""
    config = path / "adapter_config.json"
    try:
        st = os.stat(config)
    except OSError:
        return False  # vLLM's loader reports missing configs
    # Asked at every page-in and prefetch: read again only when the file changed.
    return _config_declares_mora(str(config), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _config_declares_mora(config: str, inode: int, size: int, mtime_ns: int) -> bool:
    try:
        raw = json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # vLLM's loader reports unreadable configs
    return isinstance(raw, dict) and raw.get("use_mora") is True


class MoraWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker-side LoRA manager, loading MoRA checkpoints through the mora library."""

    _manager_cls = MoraLoRAModelManager
    _mora_stager: Stager | None = None

    @property
    def mora_requests(self) -> dict[int, object]:
        """The LoRARequest of every adapter id seen, to read it again from disk after an eviction."""
        if "_mora_requests" not in self.__dict__:
            self._mora_requests: dict[int, object] = {}
        return self._mora_requests

    @property
    def mora_stager(self) -> Stager:
        if self._mora_stager is None:
            manager = self._adapter_manager
            self._mora_stager = Stager(lambda r: read_snapshot(get_adapter_absolute_path(r.lora_path)),
                                       manager.mora_tiers, manager.capacity,
                                       cached=lambda r: snapshot_in_page_cache(get_adapter_absolute_path(r.lora_path)))
        return self._mora_stager

    def _read_mora(self, lora_request) -> MoraLoRAModel:  # noqa: ANN001
        path = Path(get_adapter_absolute_path(lora_request.lora_path))
        adapter = load_mora_adapter(path, lora_request.lora_name)
        return self._adapter_manager.load_mora(adapter, lora_request.lora_int_id)

    def _load_adapter(self, lora_request) -> LoRAModel:  # noqa: ANN001
        self.mora_requests[lora_request.lora_int_id] = lora_request
        path = Path(get_adapter_absolute_path(lora_request.lora_path))
        if not _declares_mora(path):
            return super()._load_adapter(lora_request)
        staged = self.mora_stager.take(lora_request.lora_int_id) if self._mora_stager is not None else None
        started = time.perf_counter()
        model = self._read_mora(lora_request)  # from the page cache when `mora_prefetch` staged it
        if staged is None:  # a staged read was counted when the stager did it
            self._adapter_manager.mora_tiers.loaded("disk", time.perf_counter() - started)
        return model

    def add_adapter(self, lora_request) -> bool:  # noqa: ANN001
        hit = lora_request.lora_int_id in self._adapter_manager._registered_adapters
        self._adapter_manager.mora_tiers.count("host_hits" if hit else "host_misses")
        return super().add_adapter(lora_request)

    def list_adapters(self) -> set[int]:
        # vLLM's builds an ordered copy of the host cache (a Python view over every entry), and
        # add_adapter asks once per adapter of every step: with 78 slots, 3% of the worker's
        # time under spread traffic (bench.scale). The same ids, straight from the cache's keys.
        return set(self._adapter_manager._registered_adapters.keys())

    def remove_adapter(self, adapter_id: int) -> bool:
        self.mora_requests.pop(adapter_id, None)
        if self._mora_stager is not None:
            self._mora_stager.drop(adapter_id)
        return super().remove_adapter(adapter_id)

    def _apply_adapters(self, lora_requests: set) -> None:
        # Touch the step's adapters first, so that loading one of them never evicts another
        # that the same step needs (vLLM adds them one by one, evicting the LRU as it goes).
        cache = self._adapter_manager._registered_adapters
        for r in lora_requests:
            if r and r.lora_int_id in cache:
                cache.touch(r.lora_int_id)
        super()._apply_adapters(lora_requests)

    def mora_prefetch(self, items: list[PageIn]) -> dict[int, PageInState]:
        """Where each adapter is; a cold MoRA adapter starts loading in the background (a LoRA
        adapter is `Residence.STEP`: vLLM reads it in the step, as stock vLLM does)."""
        from vllm.lora.request import LoRARequest

        manager = self._adapter_manager
        out: dict[int, PageInState] = {}
        for item in items:
            lora_id = int(item.lora_id)
            if lora_id in manager.lora_index_to_id:
                out[lora_id] = PageInState(Residence.DEVICE)
            elif lora_id in manager._registered_adapters:
                out[lora_id] = PageInState(Residence.HOST)
            elif not _declares_mora(Path(item.path)):
                out[lora_id] = PageInState(Residence.STEP)
            else:
                request = LoRARequest(item.name, lora_id, item.path)
                self.mora_requests[lora_id] = request
                out[lora_id] = self.mora_stager.start(request)
        return out

    def set_active_adapters(self, requests: set, mapping: object) -> None:
        # vLLM hands over the step's adapters as a set of LoRARequests, which compare by *name*:
        # two versions of one adapter in flight at once (a hot reload) collapse into one, and the
        # other version would never be activated. Activate every id the mapping uses.
        self._apply_adapters(requests)
        if mapping is not None:
            wanted = {int(i) for i in (*mapping.index_mapping, *mapping.prompt_mapping) if i > 0}
            missing = wanted - {r.lora_int_id for r in requests if r}
            for lora_id in sorted(missing):
                if self._adapter_manager.get_adapter(lora_id) is None and lora_id in self.mora_requests:
                    self.add_adapter(self.mora_requests[lora_id])  # evicted from the host cache: read it again
                if self._adapter_manager.get_adapter(lora_id) is not None:
                    self._adapter_manager.activate_adapter(lora_id)
            self._adapter_manager.set_adapter_mapping(mapping)  # the MoRA step preparation happens there
