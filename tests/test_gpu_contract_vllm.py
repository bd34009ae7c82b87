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
                 "vllm.v1.cudagraph_dispatcher.CudagraphDispatcher.dispatch",
                 "vllm.v1.worker.gpu_model_runner.GPUModelRunner._dummy_run",
                 "vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA._apply_async_impl"):
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
    """A vLLM whose graph dispatcher lost `_get_lora_cases`: the plugin must stop the engine
    from starting, naming the internal (stock vLLM would otherwise run without MoRA's graphs)."""
    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import tiny_model

    model = tiny_model(tmp_path / "llama")
    script = textwrap.dedent(f"""
        if __name__ == "__main__":
            from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
            del CudagraphDispatcher._get_lora_cases   # as if a vLLM upgrade renamed it
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
    assert "VllmCouplingError" in proc.stdout and "CudagraphDispatcher._get_lora_cases is missing" in proc.stdout


def test_unservable_configurations_are_refused_at_start():
    """fully_sharded_loras (vLLM's sharded LoRA classes, which the MoRA wrappers do not extend:
    no MoRA adapter could load) and, on a GPU, vLLM's V2 model runner (the graph cases are built
    on V1) stop the engine before the model is wrapped, saying why."""
    from types import SimpleNamespace

    import torch
    from vllm.config import CompilationMode, CUDAGraphMode

    from mora.vllm_plugin.coupling import VllmCouplingError
    from mora.vllm_plugin.manager import refuse_configuration

    def config(sharded: bool, v2: bool) -> SimpleNamespace:
        cc = SimpleNamespace(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.PIECEWISE)
        return SimpleNamespace(lora_config=SimpleNamespace(fully_sharded_loras=sharded), compilation_config=cc,
                               use_v2_model_runner=v2)

    refuse_configuration(config(False, False), torch.device("cuda"))
    refuse_configuration(config(False, True), torch.device("cpu"))  # the CPU runner is V1 whatever the flag
    with pytest.raises(VllmCouplingError, match="fully_sharded_loras=True is not supported with MoRA"):
        refuse_configuration(config(True, False), torch.device("cpu"))
    with pytest.raises(VllmCouplingError, match="V2 model runner"):
        refuse_configuration(config(False, True), torch.device("cuda"))


def test_vllm_never_sees_mora_tokens():
    """The model manager's split of a step's mapping: vLLM's mapping (its LoRA kernels' input)
    has the MoRA adapters replaced by "no adapter", so its shrink and expand never run over a
    MoRA token (nor at all in a step without a stock LoRA token); the MoRA runtime gets each
    token's table row (the merged adapter's: the reserved row) and the step's kind."""
    from types import SimpleNamespace

    from vllm.lora.layers import LoRAMapping

    from mora.kernels import StepKind
    from mora.vllm_plugin.manager import MoraLoRAModelManager
    from mora.vllm_plugin.models import MoraLoRAModel

    def manager(target: int | None, merged: bool) -> SimpleNamespace:
        cache = {1: MoraLoRAModel(1, 4), 2: object(), 3: MoraLoRAModel(3, 4)}  # 2: a stock LoRA adapter
        return SimpleNamespace(
            mora_merges=SimpleNamespace(target=target, merged_id=target if merged else None),
            lora_index_to_id=[1, 2, None, 3], _registered_adapters=SimpleNamespace(cache=cache),
            mora_runtime=SimpleNamespace(merged_row=4))

    mapping = LoRAMapping((1, 1, 2, 0, 3), (1, 2, 0, 3), is_prefill=True)
    stock, rows, kind = MoraLoRAModelManager.split_mapping(manager(None, False), mapping)
    assert stock.index_mapping == (0, 0, 2, 0, 0) and stock.prompt_mapping == (0, 2, 0, 0) and stock.is_prefill
    assert rows.tolist() == [0, 0, -1, -1, 3] and kind == StepKind.MORA | StepKind.LORA
    stock, rows, kind = MoraLoRAModelManager.split_mapping(manager(3, True), LoRAMapping((3, 3), (3,)))
    assert stock.index_mapping == (0, 0) and rows.tolist() == [4, 4] and kind == StepKind.NONE  # merged only
    _, rows, kind = MoraLoRAModelManager.split_mapping(manager(3, False), LoRAMapping((3, 0), (3, 0)))
    assert rows.tolist() == [4, -1] and kind == StepKind.MORA  # being merged: layers not merged yet add it
    unchanged = LoRAMapping((2, 0), (2, 0))
    assert MoraLoRAModelManager.split_mapping(manager(None, False), unchanged)[0] is unchanged


# vLLM's CPU engine, compiled as the plugin keeps it (Dynamo traced once, guards dropped: what
# vLLM does on a GPU; the eager backend, vLLM's CPU-CI setting, to keep the test short). vLLM's
# CPU platform would turn compilation off with LoRA; the plugin keeps it and runs every LoRA
# update (its own, vLLM's) inside ops whose bodies run every step.
_COMPILED_ENGINE = textwrap.dedent("""
    import json, sys
    from collections import Counter

    COUNTS = Counter()

    def install_counters(worker):
        # what the step launches: the MoRA op's work, vLLM's stock LoRA kernels (linear, embedding)
        import mora.kernels.fused_op as fused_op
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        def counted(name, fn):
            def wrapped(*args, **kwargs):
                COUNTS[name] += 1
                return fn(*args, **kwargs)
            return wrapped

        fused_op.mora_apply_slices = counted("mora", fused_op.mora_apply_slices)
        PunicaWrapperCPU.add_lora_linear = counted("lora", PunicaWrapperCPU.add_lora_linear)
        PunicaWrapperCPU.add_lora_embedding = counted("lora", PunicaWrapperCPU.add_lora_embedding)

    def drain(worker):
        out = dict(COUNTS)
        COUNTS.clear()
        return out

    def record_cases(worker):
        # vLLM's warm-up/capture runs of each LoRA case (with its stock dummies, MoRA tables empty)
        from mora.vllm_plugin.graphs import MORA_ONLY
        max_loras = worker.vllm_config.lora_config.max_loras
        out = {}
        for case in (0, MORA_ONLY, max_loras + 1):
            COUNTS.clear()
            worker.model_runner._dummy_run(8, num_active_loras=case)
            out[case] = dict(COUNTS)
        COUNTS.clear()
        return out

    def dispatch(worker):
        # vLLM's own dispatcher, configured to capture: its keys and where each step kind goes
        import copy
        from vllm.config import CUDAGraphMode
        from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
        from mora.kernels import StepKind
        from mora.vllm_plugin.graphs import current_runtime

        cfg = copy.copy(worker.vllm_config)
        cc = cfg.compilation_config = copy.deepcopy(cfg.compilation_config)
        cc.cudagraph_capture_sizes, cc.max_cudagraph_capture_size = [1, 2, 4, 8], 8
        cc.cudagraph_mode = CUDAGraphMode.FULL  # (piecewise graphs would need a piecewise-compiled model)
        d = CudagraphDispatcher(cfg)
        d.initialize_cudagraph_keys(CUDAGraphMode.FULL)
        keys = sorted({(k.num_tokens, k.has_lora, k.num_active_loras) for k in d.cudagraph_keys[CUDAGraphMode.FULL]})
        rt, out = current_runtime(), {}
        saved = rt.kind
        for kind in (StepKind.NONE, StepKind.MORA, StepKind.LORA, StepKind.MORA | StepKind.LORA):
            rt.kind = kind
            mode, desc = d.dispatch(3, False, True, 2)  # 3 tokens of 2 adapter requests
            out[str(kind.value)] = [mode.name, desc.num_tokens, desc.has_lora, desc.num_active_loras]
        rt.kind = saved
        return {"keys": keys, "dispatch": out}

    if __name__ == "__main__":
        model, spec = sys.argv[1], json.loads(sys.argv[2])
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        llm = LLM(model=model, enable_lora=True, max_loras=4, max_cpu_loras=8, max_lora_rank=8, dtype="float32",
                  max_model_len=128, kv_cache_memory_bytes=64 * 2**20, max_num_seqs=32, seed=0,
                  worker_extension_cls="mora.vllm_plugin.extension.MoraWorkerExtension")
        print("MODE", llm.llm_engine.vllm_config.compilation_config.mode.name, flush=True)
        llm.collective_rpc(install_counters)
        print("CASES" + json.dumps(llm.collective_rpc(record_cases)[0]), flush=True)
        print("DISPATCH" + json.dumps(llm.collective_rpc(dispatch)[0]), flush=True)
        reqs = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        out = []
        for step in spec["steps"]:
            if step.get("merge"):
                llm.collective_rpc("mora_merge", args=(reqs[step["merge"]].lora_int_id,))
            batch = step["batch"]
            llm.collective_rpc(drain)
            outs = llm.generate([p for p, _ in batch], params, lora_request=[reqs[n] if n else None for _, n in batch],
                                use_tqdm=False)
            out.append({"tokens": [list(o.outputs[0].token_ids) for o in outs], "counts": llm.collective_rpc(drain)[0]})
        print("RESULT" + json.dumps(out), flush=True)
""")


def _hf_lora_greedy(model_dir: Path, lora_dir: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of the transformers model with a LoRA adapter folded into its weights
    (`W += lora_alpha / r * B @ A`, vLLM's scaling)."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                modules[name].weight += cfg["lora_alpha"] / cfg["r"] * (b @ a)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id, min_new_tokens=max_tokens)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_compiled_cpu_engine_launches_only_what_each_step_needs(tmp_path):
    """vLLM's CPU engine, compiled: batches over MoRA adapters of types 1/6/3/2/4, a LoRA adapter
    and the base model, a merge and merged-only steps, equal the transformers reference token for
    token; and the kernels launched are what each step's kind needs, in vLLM's own warm-up and
    capture runs of each LoRA case (MoRA tables empty), in its graph dispatcher's keys, and in
    real steps: no stock LoRA kernel without a LoRA request, nothing for merged-only steps."""
    import json

    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import assert_greedy_matches, hf_greedy_scored, random_lora, random_mora, tiny_model

    model = tiny_model(tmp_path / "llama")
    adapters = {}
    for i, t in enumerate([1, 6, 3, 2, 4, 6]):
        path = tmp_path / f"a{i}-t{t}"
        random_mora(model, path, mora_type=t, r=4, seed=20 + i, scale=0.08)
        adapters[path.name] = str(path)
    random_lora(model, tmp_path / "lora", seed=3)
    moras = list(adapters)
    merged = moras[1]
    steps = [
        {"batch": [("prompt 0 hello", moras[0])]},
        {"batch": [(f"prompt {k} hello", [moras[1], moras[2], None][k]) for k in range(3)]},
        {"batch": [(f"prompt {k} hi", [moras[3], "lora", None, "lora", moras[4]][k]) for k in range(5)]},
        {"batch": [(f"prompt {k} hello", [*moras, None][(k * 3 + 17) % 7]) for k in range(17)]},
        {"batch": [("prompt 1 base", None), ("prompt 2 base", None)]},
        {"batch": [(f"prompt {k} merged", merged) for k in range(3)], "merge": merged},
        {"batch": [("prompt 3 merged", merged), ("prompt 4 base", None), ("prompt 5", moras[0])]},
    ]
    spec = {"adapters": {**adapters, "lora": str(tmp_path / "lora")}, "steps": steps, "max_tokens": 6}
    (tmp_path / "run.py").write_text(_COMPILED_ENGINE)
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_CI_ENV="1")  # Dynamo with the eager backend: vLLM's own CPU CI setting
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(model), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = proc.stdout.splitlines()
    assert "MODE DYNAMO_TRACE_ONCE" in lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = {tag: json.loads(ln[len(tag):]) for ln in lines for tag in ("CASES", "DISPATCH", "RESULT") if ln.startswith(tag)}
    assert set(found) == {"CASES", "DISPATCH", "RESULT"}, proc.stdout[-2000:] + proc.stderr[-4000:]

    layers = 8  # 2 decoder layers x (qkv, o, gate_up, down)
    cases = found["CASES"]
    assert cases["0"] == {}, cases  # the base-only graphs record no adapter kernel
    assert cases["-1"] == {"mora": layers}, cases  # the MoRA-only graphs: MoRA, no stock LoRA kernel
    assert cases["5"]["mora"] == layers and cases["5"]["lora"] >= layers, cases  # vLLM's: both
    keys, dispatched = found["DISPATCH"]["keys"], found["DISPATCH"]["dispatch"]
    assert all([n, False, -1] in keys and [n, False, 0] in keys and [n, True, 5] in keys for n in (1, 2, 4, 8)), keys
    assert dispatched == {"0": ["FULL", 4, False, 0], "1": ["FULL", 4, False, -1],
                          "2": ["FULL", 4, True, 5], "3": ["FULL", 4, True, 5]}, dispatched

    result = found["RESULT"]
    counts = [r["counts"] for r in result]
    for i in (0, 1, 3, 6):
        assert counts[i].get("lora", 0) == 0 and counts[i]["mora"] > 0, (i, counts[i])
    assert counts[2]["lora"] > 0 and counts[2]["mora"] > 0, counts[2]
    assert counts[4] == {} and counts[5] == {}, (counts[4], counts[5])  # base only; merged only

    jobs = [job for step in steps for job in step["batch"]]
    got = [tokens for r in result for tokens in r["tokens"]]
    mora_jobs = [(i, (p, n)) for i, (p, n) in enumerate(jobs) if n != "lora"]
    want = hf_greedy_scored(Path(model), {n: Path(p) for n, p in adapters.items()}, [j for _, j in mora_jobs], 6)
    assert_greedy_matches([got[i] for i, _ in mora_jobs], want)
    lora_jobs = [i for i, (_, n) in enumerate(jobs) if n == "lora"]
    assert [got[i] for i in lora_jobs] == _hf_lora_greedy(Path(model), tmp_path / "lora", [jobs[i][0] for i in lora_jobs], 6)


def test_docs_list_every_internal():
    """docs/gpu.md's table and the code's list stay one list."""
    from mora.vllm_plugin.coupling import INTERNALS

    doc = (REPO / "docs" / "gpu.md").read_text(encoding="utf-8")
    missing = [i.name for i in INTERNALS if f"`{i.name}`" not in doc]
    assert not missing, f"add these to the table in docs/gpu.md: {missing}"
