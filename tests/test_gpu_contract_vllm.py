"""The vLLM side of the GPU contract: one owner of the vLLM coupling, which refuses to start
on a vLLM that lacks an internal it needs (instead of serving stock vLLM silently)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu_contract, pytest.mark.vllm]
REPO = Path(__file__).resolve().parent.parent


def test_every_listed_internal_exists_in_the_installed_vllm():
    from mora.vllm_plugin.coupling import INTERNALS, check

    assert check().startswith("0.32.")
    names = {i.name for i in INTERNALS}
    # what register() and the wrappers touch directly is on the list
    for name in ("vllm.lora.utils._all_lora_classes", "vllm.v1.worker.lora_model_runner_mixin.LRUCacheWorkerLoRAManager",
                 "vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase.token_lora_indices"):
        assert name in names


def test_unsupported_vllm_version_is_refused(monkeypatch):
    import vllm

    from mora.vllm_plugin.coupling import VllmCouplingError, check

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(VllmCouplingError, match="vLLM 0.99.0 is not a supported version"):
        check()


def test_renamed_hook_is_detected(monkeypatch):
    """An internal that still exists but no longer calls our override would serve base outputs
    silently: the check reads that the call is still there."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from mora.vllm_plugin.coupling import VllmCouplingError, check

    def _apply_sync(self, x, bias=None):
        return self._add_adapters(x, bias)

    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_sync", _apply_sync)
    with pytest.raises(VllmCouplingError, match="_apply_sync no longer uses _apply_lora_to_output"):
        check()


def test_engine_does_not_start_when_an_internal_is_missing(tmp_path):
    """A vLLM whose punica wrapper lost `token_lora_indices`: the plugin must stop the engine
    from starting, naming the internal (stock vLLM would otherwise run without MoRA)."""
    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import tiny_model

    model = tiny_model(tmp_path / "llama")
    script = textwrap.dedent(f"""
        if __name__ == "__main__":
            from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
            del PunicaWrapperBase.token_lora_indices   # as if a vLLM upgrade renamed it
            from vllm import LLM
            try:
                LLM(model={str(model)!r}, enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32",
                    max_model_len=128, kv_cache_memory_bytes=32 * 2**20)
            except Exception as e:
                print("FAILED", type(e).__name__, e)
                raise SystemExit(3)
            print("STARTED")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "STARTED" not in proc.stdout
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "VllmCouplingError" in proc.stdout and "PunicaWrapperBase.token_lora_indices is missing" in proc.stdout
