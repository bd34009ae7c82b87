"""vLLM's CUDA-graph capture sequence, simulated on the CPU: what a capture records and what a
replay then runs.

A CUDA graph records the kernels launched during capture, with their grids and the device
addresses of their arguments, and a replay runs exactly those, reading whatever the memory
holds by then; no Python runs. The CPU has no graphs, so the recorder stands in for one:

* capture: the forward runs with the launch points patched (`mora.kernels.triton_gpu.launch`,
  the Triton backend, under `TRITON_INTERPRET=1`; `gpu_model.LAUNCHERS["stock"]`, the stock
  LoRA kernel), and every launch is recorded with its grid and arguments, grouped by op call;
* replay: the forward runs again (its base GEMMs and element-wise ops are the graph's other
  kernels), and each op call runs only the launches recorded for it, with its `y` and `x`
  substituted by this run's (a graph's activations keep their addresses); persistent buffers
  (slot tables, step metadata, merged marks, the workspace) are the recorded objects. The op
  bodies, the step's kind and the tables' host state are never consulted.

`capture_as_vllm` runs vLLM's sequence: stock-LoRA warm-up adapters in every slot and empty
MoRA tables; for each LoRA case (`0`, `MORA_ONLY`, `max_loras + 1`) and capture size, largest
first, the case's warm-up mapping prepared under the case's kind (what `graphs.py` forces in
`_dummy_run`), a warm-up run, then the capture; then the real adapters are written in place and
each step replays the graph of its kind (`graphs.py`'s dispatch) and size.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import bench.gpu_contract as gc
import bench.gpu_model as gm
import mora.kernels.fused_op as fused_op
import mora.kernels.triton_gpu as triton_gpu
from mora.kernels import StepKind, TableGroup
from mora.vllm_plugin.graphs import MORA_ONLY, kind_of_case

__all__ = ["Recorder", "capture_as_vllm", "case_for_kind", "count_launches", "lora_cases", "warmup_mapping"]


def lora_cases(cfg: gm.Config) -> list[int]:
    """vLLM's capture cases (`cudagraph_specialize_lora`) with the plugin's MoRA-only one."""
    return [0, MORA_ONLY, cfg.adapters + 1]


def case_for_kind(kind: StepKind, cfg: gm.Config) -> int:
    """The case a step of `kind` replays (`graphs.py`'s dispatch)."""
    return cfg.adapters + 1 if StepKind.LORA in kind else MORA_ONLY if StepKind.MORA in kind else 0


def warmup_mapping(case: int, size: int, cfg: gm.Config) -> list[int]:
    """vLLM's warm-up mapping (`maybe_select_dummy_loras`): a case above 0 spreads its dummy
    adapters over the tokens; 0 and MORA_ONLY activate none."""
    k = min(case, cfg.adapters)
    return [i % k for i in range(size)] if k > 0 else [-1] * size


@dataclass
class Call:
    """One op call during a capture: its `y`, `x` and the launches it made."""

    y: torch.Tensor
    x: torch.Tensor
    launches: list[tuple[str, tuple, tuple, dict]] = field(default_factory=list)


@dataclass
class Recorder:
    """The launches of one captured graph, by op call, in forward order."""

    calls: list[Call] = field(default_factory=list)

    def count(self) -> Counter:
        return Counter(kind for c in self.calls for kind, *_ in c.launches)


def _rebase(t: object, old: torch.Tensor, new: torch.Tensor) -> object:
    """`t` over `new` where it viewed `old` (same geometry: a graph's activation buffer)."""
    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
        return new.as_strided(t.shape, t.stride(), new.storage_offset() + t.storage_offset() - old.storage_offset())
    return t


def _run(kind: str, grid: tuple, args: tuple, kwargs: dict) -> None:
    if kind == "triton":
        _TRITON_LAUNCH(grid, *args, **kwargs)
    else:
        _STOCK_LAUNCH(*args)


_TRITON_LAUNCH = triton_gpu.launch
_STOCK_LAUNCH = gm.LAUNCHERS["stock"]
_GROUP_APPLY = TableGroup.apply
_STOCK_APPLY = gm.StockLora.apply


@contextlib.contextmanager
def _patched(group_apply: Callable, stock_apply: Callable, triton: Callable, stock: Callable) -> Iterator[None]:
    TableGroup.apply, gm.StockLora.apply = group_apply, stock_apply
    triton_gpu.launch, gm.LAUNCHERS["stock"] = triton, stock
    try:
        yield
    finally:
        TableGroup.apply, gm.StockLora.apply = _GROUP_APPLY, _STOCK_APPLY
        triton_gpu.launch, gm.LAUNCHERS["stock"] = _TRITON_LAUNCH, _STOCK_LAUNCH


@contextlib.contextmanager
def capturing(rec: Recorder) -> Iterator[None]:
    """Record the launches of the forwards run inside (they also run, as a warm-up would)."""
    current: list[Call] = []

    def call(orig: Callable) -> Callable:
        def wrapped(self: object, y: torch.Tensor, x: torch.Tensor, step: object) -> None:
            current[:] = [Call(y, x)]
            rec.calls.append(current[0])
            orig(self, y, x, step)
        return wrapped

    def triton(grid: tuple, *args: object, **kwargs: object) -> None:
        current[0].launches.append(("triton", grid, args, kwargs))
        _TRITON_LAUNCH(grid, *args, **kwargs)

    def stock(*args: object) -> None:
        current[0].launches.append(("stock", (), args, {}))
        _STOCK_LAUNCH(*args)

    with _patched(call(_GROUP_APPLY), call(_STOCK_APPLY), triton, stock):
        yield


@contextlib.contextmanager
def replaying(rec: Recorder) -> Iterator[None]:
    """Run the forwards inside as a replay of `rec`: each op call runs its recorded launches."""
    calls = iter(rec.calls)

    def replay(self: object, y: torch.Tensor, x: torch.Tensor, step: object) -> None:
        call = next(calls)
        if y.shape != call.y.shape or y.stride() != call.y.stride() or x.shape != call.x.shape:
            raise AssertionError("a replay runs the captured shapes")
        for kind, grid, args, kwargs in call.launches:
            args = tuple(_rebase(_rebase(a, call.y, y), call.x, x) for a in args)
            _run(kind, grid, args, kwargs)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a replay launches nothing but what was recorded")

    with _patched(replay, replay, forbidden, forbidden):
        yield


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    """Count the kernels the forwards inside launch: `stock` (the stock LoRA kernel), `mora`
    (a MoRA op call that does work, any backend), `triton` (Triton launches)."""
    counts: Counter = Counter()
    apply = fused_op.mora_apply_slices

    def mora(*args: object, **kwargs: object) -> None:
        counts["mora"] += 1
        apply(*args, **kwargs)

    def triton(grid: tuple, *args: object, **kwargs: object) -> None:
        counts["triton"] += 1
        _TRITON_LAUNCH(grid, *args, **kwargs)

    def stock(*args: object) -> None:
        counts["stock"] += 1
        _STOCK_LAUNCH(*args)

    fused_op.mora_apply_slices = mora
    try:
        with _patched(_GROUP_APPLY, _STOCK_APPLY, triton, stock):
            yield counts
    finally:
        fused_op.mora_apply_slices = apply


def capture_as_vllm(h: gc.Harness, sizes: tuple[int, ...]) -> tuple[Callable[[int], gc.Runner], dict[tuple[int, int], Recorder]]:
    """vLLM's capture sequence (module docstring); returns the replay runner (the graph of the
    step's kind and of the size asked for) and the recordings by (case, size)."""
    cfg = h.cfg
    h.load_stock_dummies()
    graphs: dict[tuple[int, int], tuple[Recorder, torch.Tensor, torch.Tensor]] = {}
    for case in lora_cases(cfg):
        for size in sorted(sizes, reverse=True):
            x = torch.zeros(size, cfg.hidden, device=cfg.device, dtype=cfg.dtype)
            rec = Recorder()
            with h.rt.forcing(kind_of_case(case)), torch.no_grad():
                h.prepare(warmup_mapping(case, size, cfg))
                h.model(x)  # warm-up
                with capturing(rec):
                    y = h.model(x)
            graphs[(case, size)] = (rec, x, y)
    h.load_adapters()  # the real adapters arrive after capture, in place

    def run(size: int) -> gc.Runner:
        def replay(x: torch.Tensor) -> torch.Tensor:
            rec, x_static, _ = graphs[(case_for_kind(h.rt.kind, cfg), size)]
            x_static.copy_(x)
            with replaying(rec), torch.no_grad():
                return h.model(x_static)

        return replay

    return run, {key: rec for key, (rec, _, _) in graphs.items()}
