"""MoRA adapters served by the real vLLM engine (CPU build): unmerged, merged, LoRA beside MoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import (
    assert_greedy_matches,
    engine,
    hf_greedy,
    hf_greedy_scored,
    random_lora,
    random_mora,
)

import mora.vllm_plugin.merging

pytestmark = pytest.mark.vllm
MAX_TOKENS = 8
TYPES = [1, 2, 3, 4, 6]


@pytest.fixture(scope="module")
def random_adapters(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-adapters")
    out = {}
    for i, t in enumerate(TYPES):
        path = root / f"rand-t{t}"
        random_mora(demo_assets / "base", path, mora_type=t, r=4 + 2 * (i % 2), seed=10 + i, scale=0.08)
        out[path.name] = path
    return out


@pytest.fixture(scope="module")
def llm(demo_assets: Path):
    with engine(demo_assets / "base", max_loras=4, max_cpu_loras=16) as llm:
        yield llm


def _request(name: str, lora_id: int, path: Path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, str(path))


def _greedy(max_tokens: int = MAX_TOKENS, stop_at_eos: bool = False):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=not stop_at_eos)


@pytest.fixture(scope="module")
def demo_requests(llm, demo_facts, demo_assets):
    reqs = {name: _request(name, i + 1, demo_assets / "adapters" / name) for i, name in enumerate(demo_facts)}
    for r in reqs.values():
        assert llm.llm_engine.add_lora(r)
    return reqs


def _texts(outs) -> list[str]:
    return [o.outputs[0].text for o in outs]


def test_demo_adapters_in_one_mixed_batch(llm, demo_facts, demo_requests):
    prompts, loras, expected = [], [], []
    for name, facts in demo_facts.items():
        for f in facts:
            prompts.append(f["prompt"])
            loras.append(demo_requests[name])
            expected.append(f["completion"])
    base_prompts = [f["prompt"] for f in next(iter(demo_facts.values()))]
    outs = llm.generate(prompts + base_prompts, _greedy(48, stop_at_eos=True), lora_request=loras + [None] * len(base_prompts), use_tqdm=False)
    got = _texts(outs)
    assert got[: len(expected)] == expected
    assert not set(got[len(expected):]) & set(expected), "the base model must not know the facts"


def test_random_adapters_of_every_type_match_transformers_reference(llm, demo_assets, random_adapters):
    prompts = ["The secret code of vault is ", "hello world", "MoRA: high-rank updating", "z"]
    jobs = [(p, name) for name in random_adapters for p in prompts[:2]] + [(p, None) for p in prompts[2:]]
    # register them with distinct ids; the scheduler batches at most max_loras distinct adapters per step
    reqs = {name: _request(name, 100 + i, path) for i, (name, path) in enumerate(random_adapters.items())}
    for r in reqs.values():
        assert llm.llm_engine.add_lora(r)
    outs = llm.generate([p for p, _ in jobs], _greedy(), lora_request=[reqs[n] if n else None for _, n in jobs], use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert_greedy_matches(got, hf_greedy_scored(demo_assets / "base", random_adapters, jobs, MAX_TOKENS))
    base = [g for g, (_, n) in zip(got, jobs, strict=True) if n is None]
    assert all(g not in base for g, (_, n) in zip(got, jobs, strict=True) if n is not None), "adapters must change the output"


def _digest(llm) -> dict:
    return llm.collective_rpc("mora_weight_digest")[0]


@pytest.mark.parametrize("background", [False, True], ids=["in-step", "prepared-beside-steps"])
def test_merge_on_demand(llm, demo_facts, demo_requests, demo_assets, background, monkeypatch):
    names = list(demo_facts)
    target = names[1]  # a type-6 adapter
    jobs = [(f["prompt"], n) for n in names for f in demo_facts[n][:2]] + [(demo_facts[target][0]["prompt"], None)]
    params = _greedy(48, stop_at_eos=True)
    loras = [demo_requests[n] if n else None for _, n in jobs]
    before = _texts(llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False))
    digest = _digest(llm)
    if background:
        # One layer per call (a zero time slice), with full generations between calls: their
        # answers stay exact throughout (packed layers are prepared aside and swapped in together
        # by the last call; dense ones would be merged in place, each marked merged).
        monkeypatch.setattr(mora.vllm_plugin.merging, "MERGE_SLICE_S", 0.0)
        status = llm.collective_rpc("mora_merge", args=(demo_requests[target].lora_int_id, True))[0]
        assert status["state"] == "preparing" and status["layers_prepared"] == 0 and status["layers"] > 1
        calls = 0
        while status.get("state") == "preparing":
            assert status["layers_prepared"] == calls
            assert _texts(llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False)) == before
            with pytest.raises(Exception, match="being prepared"):
                llm.collective_rpc("mora_merge", args=(demo_requests[target].lora_int_id,))  # no second path meanwhile
            status = llm.collective_rpc("mora_merge", args=(demo_requests[target].lora_int_id, True))[0]
            calls += 1
        assert calls > 1
    else:
        status = llm.collective_rpc("mora_merge", args=(demo_requests[target].lora_int_id,))[0]
    assert status["merged_id"] == demo_requests[target].lora_int_id and status["layers"] > 0
    assert demo_requests[target].lora_int_id in status["pinned"]
    assert _digest(llm) != digest, "merging must change the base weights"
    during = _texts(llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False))
    assert during == before  # merged adapter, other adapters and the base model all unchanged
    only = _texts(llm.generate([f["prompt"] for f in demo_facts[target]], params, lora_request=demo_requests[target], use_tqdm=False))
    assert only == [f["completion"] for f in demo_facts[target]]
    with pytest.raises(Exception, match="merged"):
        llm.llm_engine.remove_lora(demo_requests[target].lora_int_id)
    status = llm.collective_rpc("mora_unmerge")[0]
    assert status["merged_id"] is None and demo_requests[target].lora_int_id not in status["pinned"]
    assert _digest(llm) == digest, "unmerge must restore every base weight bit for bit"
    after = _texts(llm.generate([p for p, _ in jobs], params, lora_request=loras, use_tqdm=False))
    assert after == before


def test_merge_refused_beyond_its_memory_budget(llm, demo_requests):
    """A merge whose prepared weights need more memory than allowed is refused with the figures,
    and leaves nothing behind (not merged, not pinned)."""
    lora_id = demo_requests["atlas"].lora_int_id
    with pytest.raises(Exception, match=r"needs \d+ bytes beside the serving weights .*; merge_memory_bytes allows 1"):
        llm.collective_rpc("mora_merge", args=(lora_id, True, 1))
    status = llm.collective_rpc("mora_status")[0]
    assert status["merged_id"] is None and lora_id not in status["pinned"]


def test_lora_beside_mora_matches_stock_vllm(llm, demo_assets, demo_requests, demo_facts, tmp_path):
    lora_dir = tmp_path / "plain-lora"
    random_lora(demo_assets / "base", lora_dir, seed=3)
    prompts = ["hello world", "The secret code of vault is "]
    script = textwrap.dedent(f"""
        import json, os
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
            llm = LLM(model={str(demo_assets / "base")!r}, enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32",
                      max_model_len=256, kv_cache_memory_bytes=64 * 2**20, seed=0)
            req = LoRARequest("plain", 1, {str(lora_dir)!r})
            outs = [llm.generate([p], SamplingParams(temperature=0, max_tokens={MAX_TOKENS}, ignore_eos=True), lora_request=req, use_tqdm=False)[0]
                    for p in {prompts!r}]
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    env = dict(os.environ, VLLM_PLUGINS="lora_filesystem_resolver", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    stock = json.loads(line[0][len("RESULT"):])
    req = _request("plain", 50, lora_dir)
    mixed_prompts = prompts + [demo_facts["atlas"][0]["prompt"], "hello world"]
    loras = [req, req, demo_requests["atlas"], None]
    outs = llm.generate(mixed_prompts, _greedy(), lora_request=loras, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs[:2]] == stock
    base = llm.generate(["hello world"], _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    assert list(outs[3].outputs[0].token_ids) == list(base), "a base request batched with LoRA must stay base"


def test_malformed_adapters_fail_cleanly_and_engine_keeps_serving(llm, demo_assets, tmp_path, demo_requests, demo_facts):
    from safetensors.torch import save_file

    good = demo_assets / "adapters" / "atlas"
    cases = {}
    wrong_n = tmp_path / "wrong-n"
    random_mora(demo_assets / "base", wrong_n, mora_type=1, r=4)
    cfg = json.loads((wrong_n / "adapter_config.json").read_text())
    cfg["r"] = 8  # the stored matrices were trained at r=4
    (wrong_n / "adapter_config.json").write_text(json.dumps(cfg))
    cases[wrong_n] = "expected"
    nan = tmp_path / "nan"
    adapter = random_mora(demo_assets / "base", nan, mora_type=6, r=4)
    tensors = {f"base_model.model.{m}.lora_A.weight": w.clone() for m, w in adapter.weights.items()}
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    cases[nan] = "non-finite"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 80)
    cases[corrupt] = "adapter_model.safetensors (is unreadable|header is not valid JSON)"  # header-first reading
    big = tmp_path / "too-high-rank"
    random_mora(demo_assets / "base", big, mora_type=1, r=16)
    cases[big] = "max_lora_rank"
    for i, (path, message) in enumerate(cases.items()):
        with pytest.raises(Exception, match=message):
            llm.llm_engine.add_lora(_request(path.name, 900 + i, path))
        assert 900 + i not in llm.llm_engine.list_loras()
    fact = demo_facts["atlas"][0]
    out = llm.generate([fact["prompt"]], _greedy(48, stop_at_eos=True), lora_request=demo_requests["atlas"], use_tqdm=False)
    assert out[0].outputs[0].text == fact["completion"]


def test_adapters_added_and_removed_at_runtime(llm, demo_assets, tmp_path):
    path = tmp_path / "hot"
    random_mora(demo_assets / "base", path, mora_type=6, r=4, seed=1, scale=0.1)
    req = _request("hot", 777, path)
    assert llm.llm_engine.add_lora(req)
    assert 777 in llm.llm_engine.list_loras()
    first = llm.generate(["hello world"], _greedy(), lora_request=req, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.llm_engine.remove_lora(777)
    assert 777 not in llm.llm_engine.list_loras()
    random_mora(demo_assets / "base", path, mora_type=6, r=4, seed=2, scale=0.1)  # new weights, same id
    assert llm.llm_engine.add_lora(req)
    second = llm.generate(["hello world"], _greedy(), lora_request=req, use_tqdm=False)[0].outputs[0].token_ids
    assert list(first) != list(second)
    assert list(second) == hf_greedy(demo_assets / "base", {"hot": path}, [("hello world", "hot")], MAX_TOKENS)[0]
    assert llm.llm_engine.remove_lora(777)
    status = llm.collective_rpc("mora_status")[0]
    assert 777 not in status["registered"]


def test_merged_adapter_needs_no_slot(llm, demo_requests, demo_facts, random_adapters):
    """While one adapter is merged, batches may still use all max_loras slots for other adapters
    (the merged one's update lives in a reserved row, not in a pinned slot)."""
    others = [_request(name, 300 + i, path) for i, (name, path) in enumerate(random_adapters.items())][:4]
    prompts = ["hello world"] * 4 + [demo_facts["atlas"][0]["prompt"], "hello world"]
    loras = [*others, demo_requests["atlas"], None]
    before = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy(), lora_request=loras, use_tqdm=False)]
    llm.collective_rpc("mora_merge", args=(demo_requests["atlas"].lora_int_id,))
    try:
        for _ in range(2):  # the 4 others fill every slot; atlas gets evicted from its slot and comes back
            only_others = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:4], _greedy(), lora_request=others, use_tqdm=False)]
            assert only_others == before[:4]
            during = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy(), lora_request=loras, use_tqdm=False)]
            assert during == before
    finally:
        llm.collective_rpc("mora_unmerge")


def test_two_versions_of_one_adapter_in_one_batch(llm, demo_assets, tmp_path):
    """A hot reload keeps the adapter's name with a new id; both versions may share a batch."""
    a, b = tmp_path / "ver-a", tmp_path / "ver-b"
    random_mora(demo_assets / "base", a, mora_type=6, r=4, seed=61, scale=0.1)
    random_mora(demo_assets / "base", b, mora_type=1, r=4, seed=62, scale=0.1)
    old, new = _request("same-name", 611, a), _request("same-name", 612, b)
    assert llm.llm_engine.add_lora(old) and llm.llm_engine.add_lora(new)
    together = llm.generate(["hello world", "hello world"], _greedy(), lora_request=[old, new], use_tqdm=False)
    alone = [llm.generate(["hello world"], _greedy(), lora_request=r, use_tqdm=False)[0] for r in (old, new)]
    assert [list(o.outputs[0].token_ids) for o in together] == [list(o.outputs[0].token_ids) for o in alone]
    assert together[0].outputs[0].token_ids != together[1].outputs[0].token_ids


def test_compact_slots_gives_each_kind_consecutive_slots():
    """The slot plan behind `mora_compact` (no engine): kinds end up in consecutive movable
    slots, plain LoRA slots stay put, and a compact layout needs no move."""
    import random

    from mora.vllm_plugin.models import FIXED, compact_slots

    rng = random.Random(0)
    for _ in range(200):
        kinds = [rng.choice([None, None, "a", "b", "c", FIXED]) for _ in range(16)]
        moves = compact_slots(kinds)
        after = list(kinds)
        for old in moves:
            after[old] = None
        for old, new in moves.items():
            assert kinds[new] is None or new in moves, "a move may only land on a free or vacated slot"
            after[new] = kinds[old]
        assert [k for k in after if k is FIXED] == [k for k in kinds if k is FIXED]
        assert all(after[i] is FIXED for i, k in enumerate(kinds) if k is FIXED)
        assert sorted(map(str, after)) == sorted(map(str, kinds))
        movable = [k for k in after if k is not FIXED]
        held = [k for k in movable if k is not None]
        assert movable[: len(held)] == held  # packed from the lowest movable slot
        for kind in "abc":
            run = [i for i, k in enumerate(held) if k == kind]
            assert run == list(range(run[0], run[0] + len(run))) if run else True
        assert compact_slots(after) == {}
    # vLLM's LRU order after churn: two kinds interleaved, a LoRA adapter in slot 0
    kinds = [FIXED, "a", "b", "a", "a", "b", None, "b"]
    assert compact_slots(kinds) == {3: 2, 4: 3, 2: 4, 7: 6}


def test_runtime_reuses_a_steps_metadata_only_for_the_same_mapping():
    """Decode steps with the same token -> slot mapping share one `BatchMeta` (and the CPU
    backend's plans on it); vLLM rewrites its mapping buffer in place, so a changed mapping in
    the same buffer, a different length or a merge must each give fresh metadata."""
    import torch

    from mora.vllm_plugin.runtime import MoraRuntime

    rt = MoraRuntime(4, "cpu")
    buf = torch.tensor([0, 1, 1, -1, 2])
    first = rt.prepare(buf)
    assert rt.prepare(buf.clone()) is first
    buf[3] = 3  # vLLM's persistent buffer, rewritten for the next step
    second = rt.prepare(buf)
    assert second is not first and second.slot.tolist() == [0, 1, 1, 3, 2]
    assert first.slot.tolist() == [0, 1, 1, -1, 2]  # the metadata kept its own copy
    assert rt.prepare(buf[:4]) is not second
    again = rt.prepare(buf)
    rt.set_merged(4)  # a merge starts: the reserved row (4 of 4 slots) holds it
    fresh = rt.prepare(buf)
    assert fresh is not again and fresh.merged_slot == -1
    assert rt.meta_for(5, 4).merged_slot == 4  # a layer holding it merged gets its own metadata


def test_stage_local_keeps_this_pipeline_stages_modules(tmp_path):
    """Under pipeline parallelism a stage validates only the modules of its own layers; a
    module of a layer no stage holds is still there to fail validation."""
    import dataclasses

    from engine_helpers import module_shapes, tiny_model

    from mora.errors import UnexpectedModuleError
    from mora.validate import bind_mora
    from mora.vllm_plugin.models import stage_local

    model = tiny_model(tmp_path / "llama")
    adapter = random_mora(model, tmp_path / "a", mora_type=6)
    assert stage_local(adapter, ()) is adapter
    first = stage_local(adapter, ("model.layers.1.",))
    assert first.weights and all(m.startswith("model.layers.0.") for m in first.weights)
    assert set(first.weights) | set(stage_local(adapter, ("model.layers.0.",)).weights) == set(adapter.weights)
    shapes = {m: s for m, s in module_shapes(model).items() if m.startswith("model.layers.0.")}
    assert set(bind_mora(first, shapes).specs) == set(first.weights)
    stray = dataclasses.replace(adapter, weights={**adapter.weights, "model.layers.10.mlp.up_proj": next(iter(adapter.weights.values()))})
    with pytest.raises(UnexpectedModuleError, match="layers.10"):
        bind_mora(stage_local(stray, ("model.layers.1.",)), shapes)



@pytest.mark.gpu_contract
def test_padded_forward_through_the_vllm_wrappers(llm, demo_requests):
    """vLLM prepares a step with its unpadded token count and may run the forward on more rows:
    the real wrappers must still apply each token's adapter to the real rows and leave the
    padding rows exactly as the base layer computed them (they used to fall back to base)."""
    ids = [r.lora_int_id for r in demo_requests.values()]

    def probe(worker) -> list[tuple[str, float, bool, bool]]:
        import torch

        from mora.kernels import mora_apply_slices, prepare_batch

        manager = worker.model_runner.lora_manager._adapter_manager
        for lora_id in ids:
            manager.activate_adapter(lora_id)
        slots = [manager.lora_index_to_id.index(i) for i in ids]
        rt = manager.mora_runtime
        saved = rt.meta
        g = torch.Generator().manual_seed(0)
        n, T = 7, 16
        token_slots = torch.tensor([slots[i % len(slots)] if i % 4 else -1 for i in range(n)])
        out = []
        try:
            for name, layer in manager.mora_layers()[:4]:
                rt.prepare(token_slots)
                x = torch.randn(T, layer.input_size, generator=g)
                with torch.no_grad():
                    got = layer.apply(x)
                    base = layer.base_layer.quant_method.apply(layer.base_layer, x)
                    want = base.clone()
                    meta = prepare_batch(token_slots, rt.max_slots)
                    mora_apply_slices(want[:n], x[:n], layer.mora_tables, meta, layer._mora_offsets, backend="reference")
                err = (got[:n] - want[:n]).abs().max().item() / max(1.0, want.abs().max().item())
                out.append((name, err, torch.equal(got[n:], base[n:]), not torch.equal(got[:n], base[:n])))
        finally:
            rt.meta = saved
        return out

    results = llm.collective_rpc(probe)[0]
    assert len(results) == 4
    for name, err, pad_untouched, adapted in results:
        assert err <= 2e-5, f"{name}: error {err}"
        assert pad_untouched, f"{name}: padding rows changed"
        assert adapted, f"{name}: the adapters were not applied to the real rows"


@pytest.mark.gpu_contract
def test_dual_stream_path_keeps_the_mora_update(llm, demo_requests):
    """vLLM's dual-stream LoRA path (`_apply_async_impl`, VLLM_LORA_ENABLE_DUAL_STREAM) would
    bypass `_apply_lora_to_output`: the wrappers route it to the synchronous path, so a layer
    called that way still applies each token's MoRA adapter."""
    ids = [r.lora_int_id for r in demo_requests.values()]

    def probe(worker) -> list[tuple[str, bool, bool]]:
        import torch

        manager = worker.model_runner.lora_manager._adapter_manager
        for lora_id in ids:
            manager.activate_adapter(lora_id)
        rt = manager.mora_runtime
        saved = rt.meta
        token_slots = torch.tensor([manager.lora_index_to_id.index(i) for i in ids] + [-1])
        out = []
        try:
            rt.prepare(token_slots)
            for name, layer in manager.mora_layers()[:4]:
                x = torch.randn(len(token_slots), layer.input_size)
                with torch.no_grad():
                    sync = layer._apply_sync(x)
                    dual = layer._apply_async_impl(x)
                    base = layer.base_layer.quant_method.apply(layer.base_layer, x)
                out.append((name, torch.equal(dual, sync), not torch.equal(dual[:-1], base[:-1])))
        finally:
            rt.meta = saved
        return out

    for name, same, adapted in llm.collective_rpc(probe)[0]:
        assert same and adapted, name


def test_a_slot_reused_by_a_narrower_lora_drops_the_wider_ones_weights(llm, demo_assets, random_adapters, tmp_path):
    """vLLM resets the modules of a slot that an incoming adapter does not target; the layers
    skip the resets of rows that hold nothing (a MoRA adapter's stock rows), never of rows a LoRA
    adapter wrote. LoRA `wide` (q_proj and v_proj) takes a slot, three MoRA adapters take the
    other three, then `narrow` (q_proj only) takes wide's slot: it must answer as `narrow+0v`,
    the same weights with explicit zeros for v_proj, which overwrite whatever a slot held."""
    import torch

    from mora.checkpoint import AdapterConfig, LoraAdapter, save_lora_adapter

    base = demo_assets / "base"
    wide = random_lora(base, tmp_path / "wide", seed=21, targets=("q_proj", "v_proj"))
    narrow = random_lora(base, tmp_path / "narrow", seed=22, targets=("q_proj",))
    wide_v = [m for m in wide.lora_a if m not in narrow.lora_a]

    def with_v(name: str, v_of: Callable[[torch.Tensor], torch.Tensor]) -> None:  # narrow's q_proj, and v_proj as given
        config = AdapterConfig(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16)
        save_lora_adapter(LoraAdapter(name, config, {**narrow.lora_a, **{m: v_of(wide.lora_a[m]) for m in wide_v}},
                                      {**narrow.lora_b, **{m: v_of(wide.lora_b[m]) for m in wide_v}}), tmp_path / name)

    with_v("narrow+0v", torch.zeros_like)
    with_v("narrow+wide-v", lambda t: t)  # what `narrow` would answer with wide's v_proj left in its slot
    prompts = ["hello world", "The secret code of vault is "]

    def run(name: str, lora_id: int, path: Path) -> list[list[int]]:
        outs = llm.generate(prompts, _greedy(), lora_request=_request(name, lora_id, path), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # Ids no other test of this module uses; last in the module, as it fills the engine's slots
    # and host cache with its own adapters (removed at the end).
    want = run("narrow+0v", 1901, tmp_path / "narrow+0v")
    assert run("narrow+wide-v", 1902, tmp_path / "narrow+wide-v") != want, "wide's v_proj must change the answers"
    run("wide", 1903, tmp_path / "wide")
    for i, name in enumerate(list(random_adapters)[:3]):  # the other max_loras - 1 slots; wide is now the oldest
        run(name, 1904 + i, random_adapters[name])
    assert run("narrow", 1907, tmp_path / "narrow") == want
    for lora_id in range(1901, 1908):
        llm.llm_engine.remove_lora(lora_id)


def test_lora_logits_add_runs_only_in_steps_with_lora_tokens(llm, demo_assets, demo_requests, demo_facts, tmp_path):
    """vLLM's LoRA logits processor adds every token's lm_head LoRA in every step. MoRA adapters
    have none, and a merged adapter's or a base token maps to no slot: a step without stock
    LoRA tokens skips that add (mora/vllm_plugin/logits.py), so merged traffic runs no adapter
    machinery; a step with them still runs it (its outputs: test_lora_beside_mora_matches_stock_vllm)."""
    lora_dir = tmp_path / "plain-lora"
    random_lora(demo_assets / "base", lora_dir, seed=5)
    lora = _request("plain-logits", 60, lora_dir)
    atlas = demo_requests["atlas"]
    prompt = demo_facts["atlas"][0]["prompt"]

    def count(worker, start: bool) -> int:
        from mora.vllm_plugin.logits import MoraLogitsProcessorWithLoRA

        model = worker.model_runner.model
        (lp,) = [m for m in model.modules() if isinstance(m, MoraLogitsProcessorWithLoRA)]
        assert lp.mora_runtime is not None, "the logits processor is not attached to the MoRA runtime"
        pw = lp.punica_wrapper
        if start:
            calls = pw.mora_logits_calls = []
            stock = type(pw).add_lora_logits
            pw.add_lora_logits = lambda *a, **k: (calls.append(1), stock(pw, *a, **k))[1]
            return 0
        n = len(pw.mora_logits_calls)
        del pw.add_lora_logits, pw.mora_logits_calls
        return n

    def calls_during(prompts: list[str], loras: list) -> tuple[int, list[list[int]]]:
        llm.collective_rpc(count, args=(True,))
        try:
            outs = llm.generate(prompts, _greedy(), lora_request=loras, use_tqdm=False)
        finally:
            n = llm.collective_rpc(count, args=(False,))[0]
        return n, [list(o.outputs[0].token_ids) for o in outs]

    base_alone = llm.generate(["hello world"], _greedy(), use_tqdm=False)[0].outputs[0].token_ids
    assert calls_during(["hello world", prompt], [None, atlas])[0] == 0, "a base + MoRA step ran the LoRA logits add"
    llm.collective_rpc("mora_merge", args=(atlas.lora_int_id,))
    try:
        n, merged = calls_during([prompt, "hello world"], [atlas, None])
        assert n == 0, "a merged adapter's steps ran the LoRA logits add"
    finally:
        llm.collective_rpc("mora_unmerge")
    assert merged[1] == list(base_alone)
    n, mixed = calls_during(["hello world", "hello world"], [lora, None])
    assert n >= MAX_TOKENS, "steps with LoRA tokens must run the LoRA logits add"
    assert mixed[1] == list(base_alone), "a base request batched with LoRA must stay base"
