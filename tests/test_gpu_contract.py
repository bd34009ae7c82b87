"""What vLLM's GPU model runner needs from MoRA, proven on the CPU (`pytest -m gpu_contract`).

On a GPU vLLM compiles the model once (`torch.compile`, guards dropped) and replays decode
steps from CUDA graphs captured at padded batch sizes with dummy adapters. Between steps it
only updates state in place. These tests run the project's own runtime, custom op and kernels
(`bench/gpu_contract.py`'s decoder stack, the same calls as the vLLM wrappers' graph-safe
forward) through exactly that: one compilation or one captured set of tensor objects, then
steps with other mappings, fewer real tokens, new adapters and merge/unmerge. The same
checks run on a real GPU in `bench/gpu_check.sh`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.gpu_contract import Config, Harness, check_steps, compiled, scenario
from mora.kernels import StepMeta, TableGroup, mora_apply_slices, prepare_batch

pytestmark = pytest.mark.gpu_contract
REPO = Path(__file__).resolve().parent.parent
SMALL = Config(hidden=32, inter=48, adapters=16, max_tokens=32)
SIZES = (2, 4, 8, 16)


def test_compiled_once_serves_every_step_like_eager():
    """fullgraph=True (no graph break), dynamic token counts, one compilation for >= 5 steps with
    other mappings, token counts and a merged slot; each step equal to eager bit for bit, real
    rows equal to the reference, padded rows untouched."""
    h = Harness(SMALL)
    h.load_adapters()
    run, counter = compiled(h, "aot_eager")
    steps = scenario(SMALL, SIZES)
    assert len(steps) >= 5 and any(s.merge is not None for s in steps)
    g = torch.Generator().manual_seed(5)
    for step in steps:
        size = min(s for s in SIZES if s >= step.n)
        x = torch.randn(size, SMALL.hidden, generator=g)
        h.apply_step(step)
        with torch.no_grad():
            assert torch.equal(run(size)(x), h.model(x)), f"compiled != eager at n={step.n}, size={size}"
    h.unmerge()
    results = check_steps(h, steps, run, SIZES)
    assert all(r.ok for r in results), results
    assert {r.n for r in results} != {r.size for r in results}, "some steps must run padded"
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


def test_custom_op_is_opaque_to_the_compiler():
    """The op's fake implementation lets the compiler trace a graph that contains the op itself
    (not its host-side planning), and it writes `y` in place only."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    h = Harness(Config(hidden=16, inter=24, layers=1, adapters=3, max_tokens=8))
    h.load_adapters()
    h.prepare([0, 1, 2])
    backend = EagerAndRecordGraphs()
    fn = torch.compile(h.model.layers[0].o_proj, fullgraph=True, backend=backend)
    with torch.no_grad():
        fn(torch.randn(4, 16))
    code = "\n".join(g.code for g in backend.graphs)
    assert "torch.ops.mora.fused_apply" in code
    assert "tolist" not in code and "item" not in code


def _replay_simulation(cfg: Config, steps_sizes: tuple[int, ...], capture_size: int) -> None:
    """Capture the tensor objects the op reads at a padded step with dummy adapters, then for
    later steps update state only in place (new adapters, `prepare`, merge/unmerge), refill the
    captured `x`/`y` and call the op on exactly those objects, as a CUDA-graph replay does."""
    h = Harness(cfg)
    h.load_dummies()
    lin = h.model.layers[0].qkv_proj
    calls = []
    real = TableGroup.apply

    def record(self, y, x, step_tensors):
        calls.append((self, y, x, tuple(step_tensors)))
        return real(self, y, x, step_tensors)

    x_cap = torch.randn(capture_size, cfg.hidden).to(cfg.dtype)
    h.prepare([i % cfg.adapters for i in range(capture_size)])
    TableGroup.apply = record
    try:
        with torch.no_grad():
            lin(x_cap)
    finally:
        TableGroup.apply = real
    (group, y_cap, x_seen, captured), = calls
    assert x_seen is x_cap
    assert all(a is b for a, b in zip(captured, h.rt.step.tensors, strict=True)), "the op must read the persistent buffers"
    ptrs = [t.data_ptr() for t in captured]
    h.load_adapters()  # the real adapters replace the dummies in place
    g = torch.Generator().manual_seed(3)
    for step in scenario(cfg, steps_sizes):
        h.apply_step(step)
        assert [t.data_ptr() for t in h.rt.step.tensors] == ptrs
        n = step.n
        x_cap.copy_(torch.randn(capture_size, cfg.hidden, generator=g))
        y_cap.copy_(F.linear(x_cap, lin.weight))
        y0 = y_cap.clone()
        torch.ops.mora.fused_apply(y_cap, x_cap, *captured, group.handle)  # the "replay"
        slots = torch.tensor(step.slots)
        if h.merged is not None:
            slots = torch.where(slots == h.merged, h.rt.merged_row, slots)
        merged = -1 if h.merged is None else h.rt.merged_row
        want = y0.clone()
        meta = prepare_batch(slots, h.rt.max_slots, merged_slot=merged)
        mora_apply_slices(want[:n], x_cap[:n], lin.tables, meta, lin.offsets, backend="reference")
        err = (y_cap[:n].double() - want[:n].double()).abs().max().item()
        assert err <= 3e-5 * max(1.0, want.abs().max().item()), f"n={n}: error {err}"
        assert torch.equal(y_cap[n:], y0[n:]), f"n={n}: padded rows changed"
        if any(s >= 0 for s in step.slots):
            assert not torch.equal(y_cap[:n], y0[:n])


def test_graph_replay_simulation_torch_backend():
    _replay_simulation(SMALL, SIZES, capture_size=16)


def test_graph_replay_simulation_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = Config(hidden=24, inter=32, layers=1, adapters=6, ranks=(4,), max_tokens=16, backend="triton")
    _replay_simulation(cfg, (3, 6), capture_size=8)


def test_step_metadata_is_rewritten_in_place():
    """`prepare` keeps every buffer's storage; rows past the step hold the merged slot; the
    segments describe only the step's tokens."""
    step = StepMeta(10, 4, "cpu")
    ptrs = [t.data_ptr() for t in step.tensors]
    step.prepare(torch.tensor([2, -1, 2, 0]), merged_slot=-1)
    assert step.slot.tolist() == [2, -1, 2, 0] + [-1] * 6
    assert step.order[:4].tolist() == [1, 3, 0, 2] and step.order[4:].tolist() == list(range(4, 10))
    assert int(step.num_segments) == 3 and step.seg_start[:4].tolist() == [0, 1, 2, 4]
    step.prepare(torch.tensor([1]), merged_slot=3)
    assert step.slot.tolist() == [1] + [3] * 9 and int(step.merged) == 3
    step.set_merged(-1)
    assert step.slot.tolist() == [1] + [-1] * 9
    assert [t.data_ptr() for t in step.tensors] == ptrs
    with pytest.raises(ValueError, match="sized for 10"):
        step.prepare(torch.zeros(11, dtype=torch.long))


def test_eager_runtime_keeps_adapters_on_padded_forwards():
    """vLLM's `set_active_loras` gets the unpadded token count; a forward over more rows must
    still apply the step's adapters (it used to fall back to the base model)."""
    from mora.vllm_plugin.runtime import MoraRuntime

    rt = MoraRuntime(4, "cpu")
    meta = rt.prepare(torch.tensor([0, 1, -1]))
    padded = rt.meta_for(8)
    assert padded.slot.tolist() == [0, 1, -1] + [-1] * 5
    assert padded.host_segments() == meta.host_segments()
    assert rt.meta_for(8) is padded and rt.meta_for(3) is meta
    rt.set_merged(4)
    rt.prepare(torch.tensor([0, 1, -1]))
    assert rt.meta_for(6).slot.tolist() == [0, 1, -1, 4, 4, 4]  # padding: the merged row, untouched
    assert rt.meta_for(2).slot.tolist() == [-1, -1]  # fewer rows: a forward outside the step


def test_gpu_check_python_runs_without_vllm(tmp_path):
    """`bench/gpu_check.sh` runs on a machine without vLLM: its Python (the harness, the
    kernel benchmark, the runtime) must import and run with `vllm` unimportable."""
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ImportError("vllm is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        import bench.gpu_contract as gc, bench.kernel as bk, mora.vllm_plugin.runtime  # noqa: F401
        cfg = gc.Config(hidden=16, inter=24, layers=1, adapters=4, max_tokens=8)
        h = gc.Harness(cfg); h.load_adapters()
        run, counter = gc.compiled(h, "aot_eager")
        res = gc.check_steps(h, gc.scenario(cfg, (2, 4)), run, (2, 4))
        assert all(r.ok for r in res), res
        assert counter.frame_count == 1
        bk.main(["--tokens", "2", "--adapters", "2", "--modules", "q_proj", "--rounds", "1", "--budget", "0.05", "--copy-mib", "4"])
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
        print("NO_VLLM_OK")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert "NO_VLLM_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "vs_roofline=" in proc.stdout


def test_gpu_check_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
