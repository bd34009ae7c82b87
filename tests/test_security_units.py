"""Containment criteria and file/limit checks at their edges (no server; see test_security.py)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from mora.checkpoint import (
    AdapterConfig,
    LoraAdapter,
    MoraAdapter,
    load_adapter,
    save_mora_adapter,
)
from mora.containment import MAX_UPDATE_RATIO, UpdateReport, merge_ratio_limit, update_norm
from mora.delta import delta_weight
from mora.errors import (
    AdapterConfigError,
    AdapterPathError,
    AdapterWeightsError,
    NonFiniteWeightsError,
    UpdateTooLargeError,
)
from mora.kinds import check_update
from mora.spec import MoraSpec
from serve.adapters.policy import MAX_EVENTS, MergePolicy
from serve.adapters.snapshots import _lock_snapshot_dir, clean_stale_snapshots
from serve.adapters.validation import check_adapter_id
from serve.errors import Unauthenticated
from serve.tenants import Tenant, TenantDirectory, hash_key

MODULE = "model.layers.0.self_attn.q_proj"
SHAPES = {MODULE: (8, 8)}


def _lora(c: float, *, alpha: float = 1.0, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """r = 1, scale = alpha: ||scale * B A||_F = alpha * c exactly."""
    a = torch.zeros(1, 8, dtype=dtype)
    b = torch.zeros(8, 1, dtype=dtype)
    a[0, 0], b[0, 0] = 1.0, c
    # Built without validation: configs refuse a non-finite lora_alpha themselves
    # (test_non_finite_lora_alpha_is_refused_for_every_kind); check_update is a second defence.
    config = AdapterConfig.model_construct(r=1, lora_alpha=alpha, target_modules=["q_proj"])
    return LoraAdapter("t", config, {MODULE: a}, {MODULE: b})


@pytest.mark.parametrize("use_mora", [False, True])
@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_lora_alpha_is_refused_for_every_kind(alpha, use_mora):
    with pytest.raises(ValueError, match="lora_alpha is .*finite"):
        AdapterConfig(r=1, lora_alpha=alpha, target_modules=["q_proj"], use_mora=use_mora)
    with pytest.raises(ValueError, match="alpha_pattern values must be finite"):
        AdapterConfig(r=1, alpha_pattern={"q_proj": alpha}, target_modules=["q_proj"], use_mora=use_mora)


@pytest.mark.parametrize("factor, ok", [(1.0, True), (1 - 1e-9, True), (1 + 1e-6, False), (math.inf, False)])
def test_update_bound_edges(factor, ok):
    adapter = _lora(MAX_UPDATE_RATIO * factor if math.isfinite(factor) else 1.0, alpha=1.0 if math.isfinite(factor) else math.inf)
    if ok:
        report = check_update(adapter, None, {MODULE: 1.0}, torch.float32)
        assert report.worst[1] == pytest.approx(MAX_UPDATE_RATIO * factor)
    else:
        with pytest.raises((UpdateTooLargeError, NonFiniteWeightsError)):
            check_update(adapter, None, {MODULE: 1.0}, torch.float32)


def test_no_dense_base_weight_means_never_merged():
    """A quantized base has no dense weight to bound against: loadable, never mergeable."""
    report = check_update(_lora(10.0), None, {}, torch.float32)
    assert report.worst[1] == math.inf and report.merge_refusal(torch.float32) is not None


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, 1e30])
def test_lora_alpha_non_finite_or_huge(alpha):
    with pytest.raises((NonFiniteWeightsError, UpdateTooLargeError)):
        check_update(_lora(0.1, alpha=alpha), None, {MODULE: 1.0}, torch.float32)


def test_finite_in_the_serving_dtype():
    big = _lora(3.5e38, dtype=torch.float64)  # finite in float64, inf in float32
    with pytest.raises(NonFiniteWeightsError, match="serving dtype float32"):
        check_update(big, None, {MODULE: 1e36}, torch.float32)
    check_update(big, None, {MODULE: 1e36}, torch.float64)
    half = _lora(7e4)  # beyond float16's 65504, fine in bfloat16
    with pytest.raises(NonFiniteWeightsError, match="float16"):
        check_update(half, None, {MODULE: 1e3}, torch.float16)
    check_update(half, None, {MODULE: 1e3}, torch.bfloat16)
    # the scale is folded into lora_B in the serving dtype: finite B, finite alpha, infinite product
    with pytest.raises(NonFiniteWeightsError, match="lora_B \\* scale"):
        check_update(_lora(1e20, alpha=1e20), None, {MODULE: 1.0}, torch.float32, max_ratio=math.inf)


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 166.77), (torch.bfloat16, 4.12), (torch.float16, 7.19)])
def test_merge_criterion_edges(dtype, limit):
    assert merge_ratio_limit(dtype) == pytest.approx(limit, rel=1e-3)
    assert UpdateReport({MODULE: merge_ratio_limit(dtype)}).merge_refusal(dtype) is None
    reason = UpdateReport({MODULE: merge_ratio_limit(dtype) * 1.001}).merge_refusal(dtype)
    assert reason is not None and "tolerance" in reason and MODULE in reason


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_update_norm_is_exact_and_cannot_overflow(mora_type):
    spec = MoraSpec.from_rank(40, 24, 4, mora_type)
    M = torch.randn(spec.n, spec.n, dtype=torch.float64)
    want = float(torch.linalg.vector_norm(delta_weight(M, spec, torch.float64)))
    assert update_norm(M.float(), spec) == pytest.approx(want, rel=1e-5)
    huge = torch.full((spec.n, spec.n), 3e38)  # every product would overflow float32
    assert math.isfinite(update_norm(huge, spec)) and update_norm(huge, spec) > 3e38


def _write_mora(dir: Path) -> Path:
    spec = MoraSpec.from_rank(8, 8, 2, 6)
    config = AdapterConfig(r=2, target_modules=["q_proj"], use_mora=True, mora_type=6)
    save_mora_adapter(MoraAdapter("m", config, {MODULE: torch.randn(spec.n, spec.n) * 0.1}), dir)
    return dir


def test_files_must_be_regular_and_inside(tmp_path):
    allowed = tmp_path / "acme"
    good = _write_mora(allowed / "good")
    load_adapter(good, allowed=allowed, base_shapes=SHAPES)
    other = _write_mora(tmp_path / "globex" / "secret")
    links = allowed / "links"
    links.mkdir()
    for f in other.iterdir():
        os.symlink(f, links / f.name)
    with pytest.raises(AdapterPathError, match="outside the folder"):
        load_adapter(links, allowed=allowed)
    inner = allowed / "inner"  # a symlink that stays inside is fine
    inner.mkdir()
    for f in good.iterdir():
        os.symlink(f, inner / f.name)
    load_adapter(inner, allowed=allowed)
    fifo = allowed / "fifo"
    shutil.copytree(good, fifo)
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    with pytest.raises(AdapterPathError, match="not a regular file"):
        load_adapter(fifo, allowed=allowed)
    proc = allowed / "proc"
    shutil.copytree(good, proc)
    (proc / "adapter_config.json").unlink()
    os.symlink("/proc/self/status", proc / "adapter_config.json")
    with pytest.raises(AdapterPathError) as e:
        load_adapter(proc, allowed=allowed)
    assert "Pid" not in str(e.value)


def test_header_checked_against_the_base_before_reading(tmp_path):
    d = _write_mora(tmp_path / "a")
    key = f"base_model.model.{MODULE}.lora_A.weight"
    header = json.dumps({key: {"dtype": "F32", "shape": [17, 17], "data_offsets": [0, 17 * 17 * 4]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # no data at all
    with pytest.raises(AdapterWeightsError, match="cannot belong to this module"):
        load_adapter(d, base_shapes=SHAPES)
    header = json.dumps({key: {"dtype": "I32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(AdapterWeightsError, match="not floating point"):
        load_adapter(d, base_shapes=SHAPES)


def test_json_depth_and_linear_time_regex(tmp_path):
    d = _write_mora(tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(AdapterConfigError, match="nested deeper"):
        load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 40 + "]" * 40 + "}")
    with pytest.raises(AdapterConfigError, match="nested deeper"):
        load_adapter(d)
    for bad in ({"target_modules": r"(q)\1_proj"}, {"rank_pattern": {"(?=q)": 2}}, {"layers_pattern": "(?<=x)y"}):
        with pytest.raises(ValueError, match="RE2"):
            AdapterConfig.model_validate(cfg | bad)
    config = AdapterConfig.model_validate(cfg | {"target_modules": "(a*)*b" + "x" * 10, "alpha_pattern": {"q_proj": 4.0}})
    assert not config.targets("a" * 5000)  # linear time: Python's re would not return
    assert config.alpha_for(MODULE) == 4.0 and config.alpha_for("model.layers.0.mlp.up_proj") == config.lora_alpha


def test_text_depth_equals_the_walk():
    """The bracket passes on the text give the parsed value's depth, whatever its strings
    hold (brackets, quotes, backslashes, non-ASCII) and however it is spaced."""
    from mora.files import json_depth, text_deeper_than

    rng = random.Random(0)
    tricky = ["[", "]", "{", "}", '"', "\\", '\\"[', "é[", "\u005b", "]]\"", ""]

    def value(depth: int):
        kind = rng.random()
        if depth == 0 or kind < 0.3:
            return rng.choice([rng.choice(tricky) * rng.randint(1, 3), 7, None, True, 1.5])
        items = [value(depth - 1) for _ in range(rng.randint(0, 3))]
        return items if kind < 0.65 else {rng.choice(tricky) + str(i): v for i, v in enumerate(items)}

    for _ in range(400):
        v = value(rng.randint(0, 9))
        text = json.dumps(v, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        assert json.loads(text) == v
        depth = json_depth(v)
        for limit in range(0, 11):
            assert text_deeper_than(text.encode(), limit) == (depth > limit), (text, limit)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_json_depth_bound_at_its_edge(as_bytes):
    """Depth 32 passes and 33 fails whether the text has few opening brackets (the count alone
    clears it) or many (the walk decides); brackets inside strings only count toward the walk."""
    from mora.files import MAX_JSON_DEPTH, loads_bounded

    def load(text: str):
        return loads_bounded(text.encode() if as_bytes else text, "x.json", "a", AdapterConfigError)

    def nested(depth: int) -> str:
        return "[" * depth + "]" * depth

    assert load(nested(MAX_JSON_DEPTH)) == json.loads(nested(MAX_JSON_DEPTH))  # 32 opening brackets
    wide = "[" + ", ".join([nested(MAX_JSON_DEPTH - 1)] * 3) + "]"  # 94 opening brackets, depth 32
    assert len(load(wide)) == 3
    assert load('{"s": "' + "[" * 100 + '"}') == {"s": "[" * 100}
    if not as_bytes:  # a str may hold a lone surrogate (json.loads makes one of "\\ud800")
        assert load('["\ud800"' + ", []" * 40 + "]")[0] == "\ud800"
    for deep in (nested(MAX_JSON_DEPTH + 1), "[" + ", ".join([nested(MAX_JSON_DEPTH)] * 3) + "]"):
        with pytest.raises(AdapterConfigError, match="nested deeper"):
            load(deep)


def test_ids_bounded_in_bytes():
    check_adapter_id("a" * 128)
    for bad in ("é" * 65, "a" * 129, "../x", "a/b", "ä"):
        with pytest.raises(Exception, match="bytes|ASCII|only contain"):
            check_adapter_id(bad)


def test_two_authorization_headers_are_refused():
    t = Tenant(name="a", key_sha256=hash_key("k"))
    d = TenantDirectory([t])
    assert d.authenticate([("authorization", "Bearer k")]) == t
    with pytest.raises(Unauthenticated, match="more than one"):
        d.authenticate([("authorization", "Bearer k"), ("authorization", "Bearer other")])


def test_policy_log_is_bounded():
    p = MergePolicy(window_s=1e9, merge_share=0.9, unmerge_share=0.5, min_requests=1, min_dwell_s=0)
    for i in range(MAX_EVENTS + 10):
        p.observe("a", float(i))
    assert len(p._events) == MAX_EVENTS


def test_stale_snapshot_folders(tmp_path):
    live, dead = tmp_path / "mora-snapshots-live", tmp_path / "mora-snapshots-dead"
    live.mkdir()
    dead.mkdir()
    fd = _lock_snapshot_dir(live)
    os.close(_lock_snapshot_dir(dead))  # its server died: the kernel dropped the lock
    (dead / "x.v1").mkdir()
    (dead / "x.v1" / "f").write_text("")
    os.chmod(dead / "x.v1", 0o500)
    assert clean_stale_snapshots(tmp_path) == [dead]
    assert live.is_dir() and not dead.exists()
    os.close(fd)


def test_fair_queue_takes_turns_between_tenants():
    """A tenant's queued validations never go ahead of another tenant's that arrived meanwhile: the
    other tenant waits for at most the one running (deterministic: jobs block on events)."""
    import asyncio
    import threading

    from serve.adapters.fair_queue import FairQueue

    async def main() -> tuple[list, list]:
        queue, started = FairQueue(), []
        release = {n: threading.Event() for n in ("a1", "a2", "a3", "b1")}

        def job(name: str):
            def run() -> str:
                started.append(name)
                assert release[name].wait(30)
                return name
            return run

        tasks = [asyncio.create_task(queue.run("a", job("a1")))]
        while not started:
            await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(queue.run("a", job(n))) for n in ("a2", "a3")]
        tasks.append(asyncio.create_task(queue.run("b", job("b1"))))
        await asyncio.sleep(0)
        for event in release.values():
            event.set()
        return await asyncio.gather(*tasks), started

    results, started = asyncio.run(main())
    assert results == ["a1", "a2", "a3", "b1"] and started == ["a1", "b1", "a2", "a3"]


def test_merge_gate_runs_a_merged_adapter_alone():
    """Another adapter's request (or the base model's) unmerges first; a merge is swapped in only
    with no other adapter's request in flight, else it gives up after its wait."""
    import asyncio

    from serve.adapters.merge_gate import MergeGate

    async def main() -> list[str]:
        events: list[str] = []
        gate: MergeGate

        async def unmerge() -> None:
            events.append("unmerge")
            await gate.unmerged()

        async def swap_in() -> None:
            events.append("swap")

        gate = MergeGate(unmerge)
        async with gate.admit(7):
            assert not await gate.commit(1, swap_in, wait_s=0.05)  # adapter 7's request is in flight
        assert await gate.commit(1, swap_in, wait_s=1)
        async with gate.admit(1):
            events.append("own request")  # its own requests run merged
        async with gate.admit(None):
            events.append("base request")  # after the unmerge it started
        assert gate.merged is None and gate.waits == 1
        return events

    assert asyncio.run(main()) == ["swap", "own request", "unmerge", "base request"]
