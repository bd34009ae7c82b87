"""Checkpoint I/O in the reference's peft 0.9 layout, and every validation error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mora.checkpoint import (
    AdapterConfig,
    LoraAdapter,
    MoraAdapter,
    load_adapter,
    load_mora_adapter,
    save_lora_adapter,
    save_mora_adapter,
)
from mora.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterWeightsError,
    MissingModuleError,
    NonFiniteWeightsError,
    NotMoraAdapterError,
    ShapeMismatchError,
    TiedWeightMismatchError,
    UnexpectedModuleError,
    UnsupportedMoraTypeError,
    UntrainableShapeError,
)
from mora.kinds import bind_adapter
from mora.spec import mora_size
from mora.validate import bind_lora, bind_mora

# Two layers of a small Llama: q/k/v/o + MLP, as `linear_module_shapes` reports them.
BASE = {}
for i in range(2):
    BASE |= {
        f"model.layers.{i}.self_attn.q_proj": (64, 64), f"model.layers.{i}.self_attn.k_proj": (32, 64),
        f"model.layers.{i}.self_attn.v_proj": (32, 64), f"model.layers.{i}.self_attn.o_proj": (64, 64),
        f"model.layers.{i}.mlp.gate_proj": (96, 64), f"model.layers.{i}.mlp.up_proj": (96, 64),
        f"model.layers.{i}.mlp.down_proj": (64, 96),
    }
BASE["lm_head"] = (97, 64)

# What peft 0.9 (the MoRA fork) writes: every LoraConfig field, plus use_mora / mora_type.
REFERENCE_CONFIG = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-llama", "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_dropout": 0.05,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
    "r": 4, "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"],
    "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False, "use_mora": True, "mora_type": 6,
}


def reference_checkpoint(path: Path, config: dict | None = None, *, tie: bool = True, fmt: str = "safetensors") -> dict:
    """An adapter laid out exactly as the reference saves it, written without our own code."""
    config = dict(REFERENCE_CONFIG if config is None else config)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for module, (out_f, in_f) in BASE.items():
        if not any(module.endswith("." + t) for t in config["target_modules"]):
            continue
        r = config.get("rank_pattern", {}).get(module.rsplit(".", 1)[-1], config["r"])
        n = mora_size(in_f, out_f, r, config.get("mora_type", 1))
        M = torch.randn(n, n, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = M
        if tie:
            tensors[f"base_model.model.{module}.lora_B.weight"] = M.clone()
    if fmt == "safetensors":
        save_file(tensors, str(path / "adapter_model.safetensors"))
    else:
        torch.save(tensors, str(path / "adapter_model.bin"))
    return tensors


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tie", [True, False])
def test_loads_reference_layout(tmp_path, fmt, tie):
    tensors = reference_checkpoint(tmp_path / "a", tie=tie, fmt=fmt)
    adapter = load_mora_adapter(tmp_path / "a")
    assert adapter.name == "a" and int(adapter.mora_type) == 6
    assert len(adapter.weights) == 4  # q and v of two layers
    for module, M in adapter.weights.items():
        assert torch.equal(M, tensors[f"base_model.model.{module}.lora_A.weight"])
    bound = bind_mora(adapter, BASE)
    assert bound.specs["model.layers.0.self_attn.q_proj"].n == mora_size(64, 64, 4, 6)


def test_round_trip_is_byte_compatible_with_reference(tmp_path):
    reference_checkpoint(tmp_path / "ref")
    adapter = load_mora_adapter(tmp_path / "ref")
    save_mora_adapter(adapter, tmp_path / "ours")
    again = load_mora_adapter(tmp_path / "ours")
    assert {k: v.tolist() for k, v in again.weights.items()} == {k: v.tolist() for k, v in adapter.weights.items()}
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in REFERENCE_CONFIG.items():  # every peft field survives, in the same JSON form
        assert written[key] == value, key
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tmp_path / "ref" / "adapter_model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # lora_A and the lora_B copy, same names


def test_save_bin_format(tmp_path):
    reference_checkpoint(tmp_path / "ref")
    adapter = load_mora_adapter(tmp_path / "ref")
    save_mora_adapter(adapter, tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert load_mora_adapter(tmp_path / "bin").weights.keys() == adapter.weights.keys()


def test_mora_type_defaults_to_one(tmp_path):
    cfg = dict(REFERENCE_CONFIG)
    del cfg["mora_type"]
    reference_checkpoint(tmp_path / "a", cfg)
    assert int(load_mora_adapter(tmp_path / "a").mora_type) == 1


def test_rank_pattern(tmp_path):
    cfg = dict(REFERENCE_CONFIG, rank_pattern={"v_proj": 8})
    reference_checkpoint(tmp_path / "a", cfg)
    bound = bind_mora(load_mora_adapter(tmp_path / "a"), BASE)
    assert bound.specs["model.layers.1.self_attn.v_proj"].n == mora_size(64, 32, 8, 6)
    assert bound.specs["model.layers.1.self_attn.q_proj"].n == mora_size(64, 64, 4, 6)


def test_layers_to_transform():
    cfg = AdapterConfig.model_validate(dict(REFERENCE_CONFIG, layers_to_transform=[1]))
    assert cfg.targets("model.layers.1.self_attn.q_proj")
    assert not cfg.targets("model.layers.0.self_attn.q_proj")
    regex = AdapterConfig.model_validate(dict(REFERENCE_CONFIG, target_modules=r".*\.0\.mlp\.(up|down)_proj"))
    assert regex.targets("model.layers.0.mlp.up_proj") and not regex.targets("model.layers.1.mlp.up_proj")


def test_targeted_modules_kept_per_selection():
    """The modules a config targets are kept per (selection, base model): configs bound one
    after another, each differing in one selection field or in the base, get their own."""
    from mora.validate import _targeted

    smaller = {k: v for k, v in BASE.items() if ".1." not in k}
    variants = [
        {}, {"target_modules": ["q_proj"]}, {"target_modules": ["v_proj", "q_proj"]},
        {"layers_to_transform": [1]}, {"layers_to_transform": 0}, {"layers_to_transform": [0], "layers_pattern": "layers"},
        {"target_modules": r".*\.0\.mlp\.(up|down)_proj"}, {"target_modules": r".*\.1\.mlp\.(up|down)_proj"},
    ]
    for _ in range(2):  # the second round is served from what the first kept
        for base in (BASE, smaller):
            for v in variants:
                cfg = AdapterConfig.model_validate(dict(REFERENCE_CONFIG, **v))
                assert _targeted(cfg, base) == {m for m in base if cfg.targets(m)}, v


def test_plain_lora_is_recognised(tmp_path):
    path = tmp_path / "lora"
    a = {"model.layers.0.self_attn.q_proj": torch.randn(4, 64)}
    b = {"model.layers.0.self_attn.q_proj": torch.randn(64, 4)}
    cfg = AdapterConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0])
    save_lora_adapter(LoraAdapter("lora", cfg, a, b), path)
    loaded = load_adapter(path)
    assert isinstance(loaded, LoraAdapter)
    bind_lora(loaded, BASE)
    with pytest.raises(NotMoraAdapterError, match="use_mora"):
        load_mora_adapter(path)


# --- every validation error names the adapter, the module and expected vs found -------------


def _write_tensors(path: Path, tensors: dict, config: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or REFERENCE_CONFIG))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_lora_b_copy_must_equal_lora_a(tmp_path):
    t = reference_checkpoint(tmp_path / "x")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    t[key] = t[key] + 1e-3
    _write_tensors(tmp_path / "x", t)
    with pytest.raises(TiedWeightMismatchError) as e:
        load_adapter(tmp_path / "x")
    assert "'x'" in str(e.value) and "model.layers.0.self_attn.q_proj" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("at", [(3, 4), (0, 0), (-1, -1)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(tmp_path, bad, at, dtype):
    """Any non-finite value, in any storage dtype, wherever it sits (the check reduces to the
    least and greatest values, which a NaN must reach from the first or the last element as
    from the middle)."""
    t = {k: v.to(dtype) for k, v in reference_checkpoint(tmp_path / "x", tie=False).items()}
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    t[key][at] = bad
    _write_tensors(tmp_path / "x", t)
    with pytest.raises(NonFiniteWeightsError, match=r"v_proj.*1 non-finite"):
        load_adapter(tmp_path / "x")


@pytest.mark.parametrize("t", [5, 0, 7, "one"])
def test_unknown_type(tmp_path, t):
    reference_checkpoint(tmp_path / "x", dict(REFERENCE_CONFIG, mora_type=1))
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(dict(REFERENCE_CONFIG, mora_type=t)))
    with pytest.raises((UnsupportedMoraTypeError, AdapterConfigError)) as e:
        load_adapter(tmp_path / "x")
    assert "mora_type" in str(e.value)


def test_wrong_n_names_expected_and_found(tmp_path):
    t = reference_checkpoint(tmp_path / "x", tie=False)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    cfg = dict(REFERENCE_CONFIG, target_modules=["q_proj", "v_proj", "down_proj"])
    t = {k: v for k, v in t.items()}
    n = mora_size(96, 64, 4, 6)
    t[key] = torch.randn(n + 2, n + 2)
    t[key.replace("layers.0", "layers.1")] = torch.randn(n, n)
    _write_tensors(tmp_path / "x", t, cfg)
    with pytest.raises(ShapeMismatchError) as e:
        bind_mora(load_mora_adapter(tmp_path / "x"), BASE)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and f"expected [{n}, {n}]" in msg and f"found [{n + 2}, {n + 2}]" in msg


def test_missing_target_module(tmp_path):
    t = reference_checkpoint(tmp_path / "x")
    t = {k: v for k, v in t.items() if "layers.1.self_attn.q_proj" not in k}
    _write_tensors(tmp_path / "x", t)
    with pytest.raises(MissingModuleError, match="layers.1.self_attn.q_proj"):
        bind_mora(load_mora_adapter(tmp_path / "x"), BASE)


def test_unexpected_module(tmp_path):
    t = reference_checkpoint(tmp_path / "x")
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.randn(22, 22)
    _write_tensors(tmp_path / "x", t)
    with pytest.raises(UnexpectedModuleError, match="layers.7"):
        bind_mora(load_mora_adapter(tmp_path / "x"), BASE)
    t = reference_checkpoint(tmp_path / "y")
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.randn(22, 22)
    _write_tensors(tmp_path / "y", t)
    with pytest.raises(UnexpectedModuleError, match="target_modules"):
        bind_mora(load_mora_adapter(tmp_path / "y"), BASE)


def test_untrainable_shape(tmp_path):
    base = {"model.layers.0.self_attn.q_proj": (200, 8)}  # in_f=8, r=4: n=29, pad=21 > 8
    cfg = dict(REFERENCE_CONFIG, mora_type=1, target_modules=["q_proj"])
    n = mora_size(8, 200, 4, 1)
    _write_tensors(tmp_path / "x", {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(n, n)}, cfg)
    with pytest.raises(UntrainableShapeError, match="q_proj"):
        bind_mora(load_mora_adapter(tmp_path / "x"), base)


def test_non_square_and_non_float(tmp_path):
    _write_tensors(tmp_path / "x", {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(3, 4)})
    with pytest.raises(AdapterWeightsError, match="not square"):
        load_adapter(tmp_path / "x")
    _write_tensors(tmp_path / "y", {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(3, 3, dtype=torch.int32)})
    with pytest.raises(AdapterWeightsError, match="floating point"):
        load_adapter(tmp_path / "y")
    _write_tensors(tmp_path / "z", {"something.else": torch.ones(3, 3)})
    with pytest.raises(AdapterWeightsError, match="unexpected tensor key"):
        load_adapter(tmp_path / "z")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps(dict(REFERENCE_CONFIG, r="four")),
                                     json.dumps(dict(REFERENCE_CONFIG, r=0)), json.dumps(dict(REFERENCE_CONFIG, use_mora="yes")),
                                     json.dumps(dict(REFERENCE_CONFIG, peft_type="IA3")), json.dumps(dict(REFERENCE_CONFIG, use_dora=True))])
def test_bad_configs(tmp_path, content):
    reference_checkpoint(tmp_path / "x")
    (tmp_path / "x" / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterConfigError) as e:
        load_adapter(tmp_path / "x")
    assert "'x'" in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterNotFoundError):
        load_adapter(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(REFERENCE_CONFIG))
    with pytest.raises(AdapterNotFoundError, match="adapter_model"):
        load_adapter(tmp_path / "x")


def test_truncated_safetensors(tmp_path):
    reference_checkpoint(tmp_path / "x")
    f = tmp_path / "x" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterWeightsError, match="unreadable"):
        load_adapter(tmp_path / "x")


@pytest.mark.parametrize("first_read", ["whole file", "header only", "part of the header"])
def test_safetensors_read_in_one_or_more_reads(tmp_path, monkeypatch, first_read):
    """A file up to SMALL_READ_BYTES is read in one go; a larger one header first, then data.
    Every way the first read can end gives the same tensors, and truncation is caught in each."""
    import mora.files as files

    reference_checkpoint(tmp_path / "x")
    f = tmp_path / "x" / "adapter_model.safetensors"
    raw = f.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    want = load_adapter(tmp_path / "x").weights
    limit = {"whole file": 1 << 20, "header only": header_end + 4, "part of the header": 12}[first_read]
    monkeypatch.setattr(files, "SMALL_READ_BYTES", limit)
    got = load_adapter(tmp_path / "x").weights
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    f.write_bytes(raw[:-100])
    with pytest.raises(AdapterWeightsError, match="truncated"):
        load_adapter(tmp_path / "x")


class _Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/mora_pwned', 'w').write('x')",))


def test_pickle_payload_is_never_executed(tmp_path):
    target = Path("/tmp/mora_pwned")
    target.unlink(missing_ok=True)
    reference_checkpoint(tmp_path / "x", fmt="bin")
    with open(tmp_path / "x" / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.a.lora_A.weight": _Evil()}, f)
    with pytest.raises(AdapterWeightsError):
        load_adapter(tmp_path / "x")
    assert not target.exists()


def test_implausibly_large_tensor_refused_before_reading(tmp_path, monkeypatch):
    import mora.checkpoint as ck

    monkeypatch.setattr(ck, "MAX_TENSOR_ELEMENTS", 100)
    reference_checkpoint(tmp_path / "x")
    with pytest.raises(AdapterWeightsError, match="implausibly large"):
        load_adapter(tmp_path / "x")


def test_snapshot_is_independent_of_files(tmp_path):
    reference_checkpoint(tmp_path / "x")
    adapter = load_mora_adapter(tmp_path / "x")
    before = {k: v.clone() for k, v in adapter.weights.items()}
    reference_checkpoint(tmp_path / "x", dict(REFERENCE_CONFIG, r=8))  # replaced on disk
    assert all(torch.equal(before[k], v) for k, v in adapter.weights.items())


def test_bind_adapter_dispatches(tmp_path):
    reference_checkpoint(tmp_path / "x")
    assert isinstance(bind_adapter(load_adapter(tmp_path / "x"), BASE).adapter, MoraAdapter)


def test_lora_shape_errors():
    cfg = AdapterConfig(r=4, target_modules=["q_proj"], layers_to_transform=0)
    bad = LoraAdapter("l", cfg, {"model.layers.0.self_attn.q_proj": torch.randn(4, 63)}, {"model.layers.0.self_attn.q_proj": torch.randn(64, 4)})
    with pytest.raises(ShapeMismatchError, match=r"lora_A.*expected \[4, 64\], found \[4, 63\]"):
        bind_lora(bad, BASE)
