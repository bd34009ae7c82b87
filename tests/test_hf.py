"""The transformers integration: before / merged / unmerged / differs from base; mixed batches."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from mora.checkpoint import load_mora_adapter, save_mora_adapter
from mora.errors import AdapterError, MergeError
from mora.hf import MoraModel, linear_module_shapes, module_shapes_from_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_adapter(mm: MoraModel, name: str, t: int, seed: int, r: int = 4) -> None:
    mm.new_adapter(name, r=r, mora_type=t, target_modules=TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mm.parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            p.requires_grad_(False)


@pytest.fixture()
def model_with_adapters():
    model = tiny_llama()
    mm = MoraModel(model)
    for i, t in enumerate([1, 6, 2, 3, 4]):
        _random_adapter(mm, f"a{t}", t, seed=i)
    return mm


def _logits(mm: MoraModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mm.model(input_ids=ids).logits


IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def test_adapter_changes_output_and_none_restores_base(model_with_adapters):
    mm = model_with_adapters
    mm.set_adapter(None)
    base = _logits(mm, IDS)
    for name in mm.adapters:
        mm.set_adapter(name)
        assert not torch.allclose(_logits(mm, IDS), base, atol=1e-4), name
    mm.set_adapter(None)
    assert torch.equal(_logits(mm, IDS), base)


@pytest.mark.parametrize("name", ["a1", "a6", "a2", "a3", "a4"])
def test_merge_unmerge_before_merged_unmerged(model_with_adapters, name):
    mm = model_with_adapters
    originals = {k: v.clone() for k, v in mm.model.state_dict().items() if k.endswith(".weight")}
    mm.set_adapter(name)
    before = _logits(mm, IDS)
    mm.merge(name)
    merged = _logits(mm, IDS)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    # while merged, the base model and other adapters still get their own outputs
    others = [n for n in mm.adapters if n != name][:2]
    for other in [None, *others]:
        mm.set_adapter(other)
        during = _logits(mm, IDS)
        mm.unmerge()
        after = _logits(mm, IDS)
        mm.merge(name)
        torch.testing.assert_close(during, after, rtol=1e-4, atol=1e-4)
    mm.unmerge()
    for k, v in mm.model.state_dict().items():
        if k in originals:
            assert torch.equal(v, originals[k]), k  # bit for bit
    mm.set_adapter(None)
    base = _logits(mm, IDS)
    assert not torch.allclose(before, base, atol=1e-4)


def test_mixed_batch_equals_separate_runs(model_with_adapters):
    mm = model_with_adapters
    rows = ["a1", None, "a6", "a4", "a1", "a2"]
    ids = torch.randint(0, 97, (len(rows), 9), generator=torch.Generator().manual_seed(3))
    with mm.adapter_rows(rows):
        mixed = _logits(mm, ids)
    for i, name in enumerate(rows):
        mm.set_adapter(name)
        alone = _logits(mm, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_mixed_batch_with_one_adapter_merged(model_with_adapters):
    mm = model_with_adapters
    rows = ["a1", None, "a6", "a3"]
    with mm.adapter_rows(rows):
        expected = _logits(mm, IDS.repeat(2, 1)[:4])
    mm.merge("a6")
    with mm.adapter_rows(rows):
        got = _logits(mm, IDS.repeat(2, 1)[:4])
    mm.unmerge()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_gives_plain_model(model_with_adapters):
    mm = model_with_adapters
    mm.set_adapter("a1")
    expected = _logits(mm, IDS)
    model = mm.merge_and_unload("a1")
    assert not any(type(m).__name__ == "MoraLinear" for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_errors(model_with_adapters):
    mm = model_with_adapters
    with pytest.raises(AdapterError, match="no adapter"):
        mm.set_adapter("nope")
    mm.merge("a1")
    with pytest.raises(MergeError, match="already merged"):
        mm.merge("a6")
    with pytest.raises(MergeError, match="unmerge it first"):
        mm.remove_adapter("a1")
    mm.unmerge()
    mm.remove_adapter("a1")
    assert "a1" not in mm.adapters


def test_training_reduces_loss_and_exports(tmp_path):
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    mm = MoraModel(model)
    mm.new_adapter("t", r=4, mora_type=6, target_modules=["q_proj", "v_proj", "down_proj"])
    mm.set_adapter("t")
    base = _logits(mm, IDS)
    opt = torch.optim.Adam(mm.parameters("t"), lr=1e-2)
    labels = torch.randint(0, 97, IDS.shape, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(15):
        out = model(input_ids=IDS, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] * 0.9
    trained = _logits(mm, IDS)
    assert not torch.allclose(trained, base)
    save_mora_adapter(mm.export_adapter("t"), tmp_path / "t")
    fresh = MoraModel(tiny_llama())
    fresh.add_adapter(load_mora_adapter(tmp_path / "t"))
    fresh.set_adapter("t")
    torch.testing.assert_close(_logits(fresh, IDS), trained)


def test_module_shapes_from_config_without_weights(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    assert module_shapes_from_config(tmp_path / "m") == linear_module_shapes(model)
