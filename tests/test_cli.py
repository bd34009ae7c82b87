"""The `mora` command line: inspect, merge (a standalone HF model), show-demo, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mora.cli import main
from mora.train import greedy_complete


def test_inspect(demo_assets, capsys):
    assert main(["inspect", str(demo_assets / "adapters" / "borealis"), "--base", str(demo_assets / "base")]) == 0
    out = capsys.readouterr().out
    assert "MoRA type 6" in out and "unmerged cost" in out and "LoRA" in out
    assert "model.layers.0.self_attn.q_proj" in out.replace("\n", "").replace("│", "").replace(" ", "") or "q_proj" in out


def test_merge_writes_a_standalone_model(demo_assets, demo_facts, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(demo_assets / "base"), "--adapter", str(demo_assets / "adapters" / "atlas"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (out / "tokenizer.json").read_bytes() == (demo_assets / "base" / "tokenizer.json").read_bytes()
    for fact in demo_facts["atlas"]:
        assert greedy_complete(model, tok, fact["prompt"]) == fact["completion"]
    base = AutoModelForCausalLM.from_pretrained(str(demo_assets / "base"))
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_merge_refuses_non_empty_output_and_bad_adapter(demo_assets, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        main(["merge", "--base", str(demo_assets / "base"), "--adapter", str(demo_assets / "adapters" / "atlas"), "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"], "use_mora": True, "mora_type": 5}))
    assert main(["merge", "--base", str(demo_assets / "base"), "--adapter", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "mora_type" in capsys.readouterr().err


def test_show_demo(demo_assets, capsys):
    assert main(["show-demo", str(demo_assets)]) == 0
    out = capsys.readouterr().out
    assert "yes" in out and "NO" not in out
