"""What vLLM's GPU model runner needs from MoRA, proven on the CPU (`pytest -m gpu_contract`).

On a GPU vLLM compiles the model once (`torch.compile`, guards dropped) and replays steps from
CUDA graphs captured per batch size and LoRA case with its stock-LoRA warm-up adapters, while
the MoRA tables are empty. Between steps it only updates state in place. These tests run the
project's own runtime, layer state, custom ops and kernels (`bench/gpu_contract.py`'s decoder
stack, the same calls as the vLLM wrappers' graph-safe forward) through exactly that: vLLM's
capture sequence with the kernel launches recorded and replayed (`bench/gpu_capture.py`, the
Triton kernel under `TRITON_INTERPRET=1`), or one compilation traced with empty tables; then
steps with other mappings, fewer real tokens, new adapters and merges. The same checks run on a
real GPU in `bench/gpu_check.sh`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.gpu_contract import Config, Harness, Step, check_steps, compiled, scenario
from mora.kernels import StepKind, StepMeta, prepare_batch

pytestmark = pytest.mark.gpu_contract
REPO = Path(__file__).resolve().parent.parent
SMALL = Config(hidden=32, inter=48, adapters=8, max_tokens=32, lora_slots=(3,))
SIZES = (2, 4, 8, 16)
# The Triton interpreter is slow: one layer, few adapters, two capture sizes.
TINY = Config(hidden=24, inter=32, layers=1, adapters=6, ranks=(4,), max_tokens=16, lora_slots=(3,), backend="triton")
TINY_SIZES = (4, 8)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_compiled_once_serves_every_step_like_eager():
    """Traced once while the MoRA tables are empty (vLLM compiles before any adapter loads),
    fullgraph=True, dynamic token counts: one compilation serves every later step (other
    mappings, token counts, LoRA beside MoRA, a merge, merged-only tokens), each equal to eager
    bit for bit, real rows equal to the reference, padded rows untouched."""
    h = Harness(SMALL)
    run, counter = compiled(h, "aot_eager")
    steps = scenario(SMALL, SIZES)
    assert any(s.merge is not None for s in steps)
    g = torch.Generator().manual_seed(5)
    kinds = set()
    for step in steps:
        size = min(s for s in SIZES if s >= step.n)
        x = torch.randn(size, SMALL.hidden, generator=g)
        kinds.add(h.apply_step(step))
        with torch.no_grad():
            assert torch.equal(run(size)(x), h.model(x)), f"compiled != eager at n={step.n}, size={size}"
    assert {StepKind.NONE, StepKind.MORA, StepKind.MORA | StepKind.LORA} <= kinds
    h.unmerge()
    results = check_steps(h, steps, run, SIZES)
    assert all(r.ok for r in results), results
    assert {r.n for r in results} != {r.size for r in results}, "some steps must run padded"
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


def test_custom_ops_are_opaque_to_the_compiler():
    """The ops' fake implementations let the compiler trace a graph that contains the ops
    themselves (not their host-side planning or their gates), and they write `y` in place only."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    h = Harness(Config(hidden=16, inter=24, layers=1, adapters=3, max_tokens=8))
    h.load_adapters()
    h.prepare([0, 1, 2])
    backend = EagerAndRecordGraphs()
    fn = torch.compile(h.model.layers[0].o_proj, fullgraph=True, backend=backend)
    with torch.no_grad():
        fn(torch.randn(4, 16))
    code = "\n".join(g.code for g in backend.graphs)
    assert "torch.ops.mora.fused_apply" in code and "torch.ops.mora_bench.stock_lora" in code
    assert "tolist" not in code and "item" not in code


def test_capture_as_vllm_replays_every_step(interpret):
    """vLLM's capture sequence (stock-LoRA warm-up adapters, empty MoRA tables, every LoRA case
    and size), then the real adapters in place and steps replaying only the recorded launches
    of their kind's graph: real rows equal eager and the reference, padded rows untouched, for
    MoRA, MoRA with LoRA, base, a merge and merged-only steps."""
    from bench.gpu_capture import capture_as_vllm

    h = Harness(TINY)
    run, recordings = capture_as_vllm(h, TINY_SIZES)
    eager = Harness(TINY)
    eager.load_adapters()
    steps = scenario(TINY, TINY_SIZES)
    g = torch.Generator().manual_seed(2)
    kinds = []
    for step in steps:
        size = min(s for s in TINY_SIZES if s >= step.n)
        x = torch.randn(size, TINY.hidden, generator=g)
        kinds.append(h.apply_step(step))
        eager.apply_step(step)
        got = run(size)(x).clone()
        with torch.no_grad():
            want = eager.model(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"replay != eager at {step}"
    assert {StepKind.NONE, StepKind.MORA, StepKind.MORA | StepKind.LORA} <= set(kinds)
    h.unmerge()
    results = check_steps(h, steps, run, TINY_SIZES)
    assert all(r.ok for r in results), results


def test_each_graph_records_what_its_case_launches(interpret):
    """What a capture records, by LoRA case: the base-only case (replayed by base and
    merged-only steps) nothing at all; the MoRA-only case the MoRA kernels and no stock LoRA
    kernel; vLLM's LoRA case both. Recorded with empty MoRA tables."""
    from bench.gpu_capture import capture_as_vllm

    h = Harness(TINY)
    _, recordings = capture_as_vllm(h, TINY_SIZES)
    slices, linears = 7, 4  # q, k, v, o, gate, up, down in 4 linears; two Triton launches per slice
    for (case, size), rec in recordings.items():
        counts = rec.count()
        if case == 0:
            assert counts == {}, (case, size, counts)
        elif case < 0:
            assert counts == {"triton": 2 * slices}, (case, size, counts)
        else:
            assert counts == {"triton": 2 * slices, "stock": linears}, (case, size, counts)


@pytest.mark.parametrize(("merge", "slots", "want"), [
    (False, [0, 1, 2, 4, -1], {"mora": 4}),  # MoRA and base tokens: no stock LoRA kernel
    (False, [-1, -1, -1], {}),  # base only: no adapter kernel
    (True, [5, 5, 5], {}),  # only the merged adapter's tokens: the base GEMMs only
    (True, [5, -1, 5], {"mora": 4}),  # base tokens beside a merged adapter: its update subtracted
    (False, [3, 0, -1], {"mora": 4, "stock": 4}),  # a stock LoRA adapter's tokens
], ids=["mora", "base", "merged-only", "merged-and-base", "lora"])
def test_each_step_launches_only_its_kind(merge, slots, want):
    """Kernels launched per step, counted: 4 linears per layer, each one MoRA op call and one
    stock LoRA launch at most. Slot 3 holds a stock LoRA adapter; slot 5's adapter is merged."""
    from bench.gpu_capture import count_launches

    h = Harness(SMALL)
    h.load_adapters()
    if merge:
        h.merge(5)
    h.prepare(slots)
    x = torch.randn(len(slots), SMALL.hidden)
    with count_launches() as counts, torch.no_grad():
        h.model(x)
    assert dict(counts) == {k: v * SMALL.layers for k, v in want.items()}


def test_sliced_merge_is_exact_at_every_step(interpret, monkeypatch):
    """A merge proceeds a slice of layers per call between steps (dense layers merged in place,
    each marked merged for the kernels): every step replayed meanwhile, from graphs captured
    with empty tables, equals the reference; unmerge restores the weights bit for bit."""
    import mora.vllm_plugin.merging as merging
    from bench.gpu_capture import capture_as_vllm

    monkeypatch.setattr(merging, "MERGE_SLICE_BYTES", 1)  # one layer per call
    cfg = TINY
    h = Harness(cfg)
    run, _ = capture_as_vllm(h, TINY_SIZES)
    h.merge(4, background=True)
    calls = 0
    while h.merges.merged_id is None:
        results = check_steps(h, [Step(8, [4, 0, -1, 3, 4, 1, 2, 5])], run, TINY_SIZES, seed=calls)
        assert all(r.ok for r in results), (calls, results)
        h.merge_slice()
        calls += 1
    assert calls == 4  # one per linear
    assert all(r.ok for r in check_steps(h, [Step(4, [4, 4, 0, -1]), Step(3, [4, 4, 4])], run, TINY_SIZES))
    h.unmerge()


# --- the three launch defects that CPU tests missed before (regression tests) ----------------


def test_regression_capture_with_empty_tables_records_the_launch(interpret):
    """A launch skipped because no slot holds a MoRA adapter would be skipped at capture (vLLM
    captures with stock-LoRA dummies) and never replayed: every MoRA step would get the base
    model. The MoRA-only graph is captured with empty tables and must apply the adapters."""
    from bench.gpu_capture import capture_as_vllm

    h = Harness(TINY)
    run, recordings = capture_as_vllm(h, (8,))
    assert recordings[(-1, 8)].count()["triton"] > 0
    results = check_steps(h, [Step(8, [0, 1, 2, 4, 5, 0, 1, -1])], run, (8,))
    assert all(r.ok for r in results), results


def test_regression_grid_sized_from_the_static_slot_count(interpret):
    """A grid sized from the slots filled at capture (none) has too few row tiles for a later
    step whose tokens use many adapters (one tile per segment): those rows would get no update."""
    from bench.gpu_capture import capture_as_vllm

    h = Harness(TINY)
    run, _ = capture_as_vllm(h, (8,))
    # 8 tokens in 6 segments (5 MoRA adapters and the base): 6 row tiles of 16 for 8 rows
    results = check_steps(h, [Step(8, [5, 4, 2, 1, 0, -1, 5, 0])], run, (8,))
    assert all(r.ok for r in results), results


def test_regression_rows_past_the_forward_are_never_written(interpret):
    """Metadata prepared for more tokens than a forward has rows (a stale step seen by a warm-up
    forward): the kernel must not touch a row at or past the forward's row count."""
    h = Harness(TINY)
    h.load_adapters()
    lin = h.model.layers[0].qkv_proj
    h.prepare([0, 1, 2, 4, 5, 0, 1, 2, 4, 5, 0, 1])  # 12 tokens
    x_big = torch.randn(12, TINY.hidden)
    y_big = torch.randn(12, lin.weight.shape[0])
    before = y_big.clone()
    lin.mora_update(x_big[:4], y_big[:4])  # a forward over 4 rows
    assert torch.equal(y_big[4:], before[4:]), "rows past the forward were written"
    want = before[:4].clone()
    meta = prepare_batch(torch.tensor([0, 1, 2, 4]), h.rt.max_slots)
    from mora.kernels import mora_apply_slices

    mora_apply_slices(want, x_big[:4], lin.mora_tables, meta, lin._mora_offsets, backend="reference")
    assert torch.allclose(y_big[:4], want, atol=1e-5)


# --- the step metadata -----------------------------------------------------------------------------


def test_step_metadata_is_rewritten_in_place():
    """`prepare` keeps every buffer's storage; rows past the step are in no segment; the
    segments describe only the step's tokens, exactly as `prepare_batch` sorts them."""
    step = StepMeta(10, 4, "cpu")
    ptrs = [t.data_ptr() for t in step.tensors]
    step.prepare(torch.tensor([2, -1, 2, 0]))
    assert step.slot.tolist() == [2, -1, 2, 0] + [-1] * 6
    assert step.order[:4].tolist() == [1, 3, 0, 2] and step.order[4:].tolist() == list(range(4, 10))
    assert int(step.num_segments) == 3 and step.seg_start[:4].tolist() == [0, 1, 2, 4]
    assert step.seg_slot[:3].tolist() == [-1, 0, 2]
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 10):
        slots = torch.randint(-1, 4, (n,), generator=g)
        step.prepare(slots, StepKind.MORA)
        ref = prepare_batch(slots, 4)
        k = int(ref.num_segments)
        assert torch.equal(step.order[:n], ref.order) and int(step.num_segments) == k
        assert step.seg_start[: k + 1].tolist() == ref.seg_start[: k + 1].tolist()
        assert step.seg_slot[:k].tolist() == ref.seg_slot[:k].tolist()
    assert [t.data_ptr() for t in step.tensors] == ptrs
    with pytest.raises(ValueError, match="sized for 10"):
        step.prepare(torch.zeros(11, dtype=torch.long))


HOST_READS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique2", "masked_select", "equal",
              "is_nonzero", "tolist", "allclose"}


def test_prepare_is_sync_and_allocation_free():
    """`prepare` on device tensors (the meta device: any read of a value fails there) under a
    dispatch mode that fails on every op reading device data back to the host and on every op
    that makes a new tensor: each writes a persistent buffer in place (`out=`, `op_`) or views it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Strict(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.__name__.split(".")[0]
            seen.append(name)
            if name.lstrip("_") in HOST_READS or name in HOST_READS:
                raise AssertionError(f"host read in prepare: {func}")
            schema = func._schema
            writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
            view = all(r.alias_info is not None for r in schema.returns) and schema.returns
            if not (writes or view or not schema.returns):
                raise AssertionError(f"prepare makes a new tensor: {func}")
            return func(*args, **kwargs)

    step = StepMeta(64, 9, "meta")
    slots = torch.zeros(37, dtype=torch.int64, device="meta")
    with Strict():
        step.prepare(slots, StepKind.MORA)
        step.prepare(slots[:5], StepKind.MORA)
        step.prepare(slots[:0], StepKind.NONE)
    assert {"scatter_", "cumsum", "gather", "index_select"} <= set(seen)


def test_eager_runtime_keeps_adapters_on_padded_forwards():
    """vLLM's mapping holds the unpadded token count; a forward over more rows must still apply
    the step's adapters; padding rows are in no segment; a merged layer gets its own metadata."""
    from mora.vllm_plugin.runtime import MoraRuntime

    rt = MoraRuntime(4, "cpu")
    meta = rt.prepare(torch.tensor([0, 1, -1]))
    padded = rt.meta_for(8)
    assert padded.slot.tolist() == [0, 1, -1] + [-1] * 5
    assert padded.host_segments() == meta.host_segments()
    assert rt.meta_for(8) is padded and rt.meta_for(3) is meta
    merged = rt.meta_for(3, 4)
    assert merged.merged_slot == 4 and meta.merged_slot == -1 and merged.plans is not meta.plans
    assert rt.meta_for(2).slot.tolist() == [-1, -1]  # fewer rows: a forward outside the step


def test_torch_backend_is_refused_under_graphs_on_cuda(monkeypatch):
    """The torch backend plans on the host (device reads): under CUDA graphs or compilation it
    would fail at capture or bake one step in. Refused before any buffer is allocated."""
    from mora.vllm_plugin.runtime import MoraRuntime

    monkeypatch.setenv("MORA_KERNEL_BACKEND", "torch")
    with pytest.raises(ValueError, match="cannot run in a compiled or CUDA-graph forward"):
        MoraRuntime(4, "cuda", max_tokens=8)


def test_gpu_check_python_runs_without_vllm(tmp_path):
    """`bench/gpu_check.sh` runs on a machine without vLLM: its Python (the harnesses, the
    kernel benchmark, the runtime) must import and run with `vllm` unimportable."""
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ImportError("vllm is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        import bench.gpu_contract as gc, bench.gpu_capture, bench.gpu_kernel as gk, bench.kernel  # noqa: F401
        cfg = gc.Config(hidden=16, inter=24, layers=1, adapters=4, max_tokens=8, lora_slots=(1,))
        h = gc.Harness(cfg)
        run, counter = gc.compiled(h, "aot_eager")
        res = gc.check_steps(h, gc.scenario(cfg, (2, 4)), run, (2, 4))
        assert all(r.ok for r in res), res
        assert counter.frame_count == 1
        longest, normal = gc.merge_stall(h, run, 4, steps=3)
        assert longest > 0 and normal > 0
        gk.main(["--device", "cpu", "--tokens", "2", "--adapters", "2", "--rounds", "1", "--small"])
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
        print("NO_VLLM_OK")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert "NO_VLLM_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "vs_roofline_t6=" in proc.stdout and "vs_roofline_t1=" in proc.stdout


def test_gpu_check_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
