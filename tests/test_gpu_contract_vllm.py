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


# vLLM's CPU engine, compiled (Dynamo traced once, guards dropped: what vLLM does on a GPU),
# serving MoRA-only adapters. Test-only patches: vLLM's CPU platform turns compilation off
# whenever LoRA is enabled, because its punica CPU ops branch on the host; with no LoRA adapter
# ever resident, the stock LoRA updates (linear and embedding) would add zeros and are skipped;
# the runtime takes its GPU (graph-safe) path on the CPU.
_COMPILED_ENGINE = textwrap.dedent("""
    import json, sys

    def patch():
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA
        from vllm.platforms.cpu import CpuPlatform

        import mora.vllm_plugin.runtime as runtime

        orig = CpuPlatform.check_and_update_config.__func__

        def check_and_update_config(cls, vllm_config):
            # vLLM's CPU platform turns compilation off whenever LoRA is enabled; keep it on.
            lora = vllm_config.lora_config
            vllm_config.lora_config = None
            try:
                orig(cls, vllm_config)
            finally:
                vllm_config.lora_config = lora

        CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
        init = runtime.MoraRuntime.__init__

        def graph_safe_init(self, max_slots, device, *, max_tokens=None, graph_safe=None):
            init(self, max_slots, device, max_tokens=max_tokens, graph_safe=True)  # the GPU path, on the CPU

        runtime.MoraRuntime.__init__ = graph_safe_init
        # No LoRA adapter ever holds a slot: the stock LoRA updates (host-branchy punica CPU ops,
        # the reason vLLM runs LoRA models eagerly on the CPU) would add zeros. The MoRA
        # wrappers' own forward runs unchanged on top.
        BaseLinearLayerWithLoRA._apply_lora_to_output = lambda self, x, output: output
        VocabParallelEmbeddingWithLoRA.forward = lambda self, x: self.base_layer.forward(x)

    if __name__ == "__main__":
        model, spec = sys.argv[1], json.loads(sys.argv[2])
        patch()
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        llm = LLM(model=model, enable_lora=True, max_loras=4, max_lora_rank=8, dtype="float32", max_model_len=128,
                  kv_cache_memory_bytes=64 * 2**20, max_num_seqs=32, seed=0)
        print("MODE", llm.llm_engine.vllm_config.compilation_config.mode.name, flush=True)
        reqs = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        out = []
        for batch in spec["batches"]:
            outs = llm.generate([p for p, _ in batch], params, lora_request=[reqs[n] if n else None for _, n in batch],
                                use_tqdm=False)
            out.append([list(o.outputs[0].token_ids) for o in outs])
        print("RESULT" + json.dumps(out), flush=True)
""")


def test_compiled_cpu_engine_serves_mixed_mora_batches(tmp_path):
    """Batches of 1, 3, 5 and 17 requests over MoRA adapters of types 1/6/3/2/4 and the base
    model, through the compiled engine, equal the transformers reference token for token."""
    import json

    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import assert_greedy_matches, hf_greedy_scored, random_mora, tiny_model

    model = tiny_model(tmp_path / "llama")
    adapters = {}
    for i, t in enumerate([1, 6, 3, 2, 4, 6]):
        path = tmp_path / f"a{i}-t{t}"
        random_mora(model, path, mora_type=t, r=4, seed=20 + i, scale=0.08)
        adapters[path.name] = str(path)
    names = [*adapters, None]
    batches = [[(f"prompt {k} hello", names[(k * 3 + size) % len(names)]) for k in range(size)] for size in (1, 3, 5, 17)]
    spec = {"adapters": adapters, "batches": batches, "max_tokens": 6}
    (tmp_path / "run.py").write_text(_COMPILED_ENGINE)
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_CI_ENV="1")  # Dynamo with the eager backend: vLLM's own CPU CI setting
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(model), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = proc.stdout.splitlines()
    assert "MODE DYNAMO_TRACE_ONCE" in lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = [ln for ln in lines if ln.startswith("RESULT")]
    assert result, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(result[0][len("RESULT"):])
    jobs = [job for batch in batches for job in batch]
    want = hf_greedy_scored(Path(model), {n: Path(p) for n, p in adapters.items()}, jobs, spec["max_tokens"])
    assert_greedy_matches([tokens for batch in got for tokens in batch], want)


def test_docs_list_every_internal():
    """docs/gpu.md's table and the code's list stay one list."""
    from mora.vllm_plugin.coupling import INTERNALS

    doc = (REPO / "docs" / "gpu.md").read_text(encoding="utf-8")
    missing = [i.name for i in INTERNALS if f"`{i.name}`" not in doc]
    assert not missing, f"add these to the table in docs/gpu.md: {missing}"
