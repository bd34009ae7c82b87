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


# --- `mora-serve`: flags generated from ServerSettings -----------------------------------------

def _serve_help() -> str:
    from serve.config import build_parser

    return " ".join(build_parser().format_help().split())  # one line: argparse wraps help text


def _settings(argv: list[str], config=None):
    from serve.config import load_settings, parse_args

    cli, path = parse_args(["--model", "/m", "--adapter-root", "/r", *argv] + (["--config", str(config)] if config else []))
    return load_settings(cli, path)


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("MORA_SERVE_")]:
        monkeypatch.delenv(k)
    return monkeypatch


def test_serve_help_lists_every_setting_with_env_var_and_default():
    from serve.config import ENV_PREFIX, ServerSettings, build_parser

    text = _serve_help()
    dests = {a.dest: a for a in build_parser()._actions}
    for name, field in ServerSettings.model_fields.items():
        assert name in dests, f"{name}: no flag"
        action = dests[name]
        flag = action.option_strings[0]
        assert flag in text and ENV_PREFIX + name.upper() in action.help, name
        assert field.description and field.description in " ".join(action.help.split()), f"{name}: no help text"
        assert ("required" if field.is_required() else "default:") in action.help, name
    # booleans: both spellings, and the default that the setting really has
    assert "--auto-merge, --no-auto-merge" in text and "--enforce-eager, --no-enforce-eager" in text
    assert "(default: true; env MORA_SERVE_AUTO_MERGE)" in " ".join(dests["auto_merge"].help.split())
    assert "(default: false; env MORA_SERVE_ENFORCE_EAGER)" in " ".join(dests["enforce_eager"].help.split())
    assert "(default: True)" not in text


def test_serve_booleans_both_ways(clean_env):
    assert _settings(["--no-auto-merge"]).auto_merge is False
    assert _settings(["--auto-merge"]).auto_merge is True
    assert _settings([]).auto_merge is True
    assert _settings(["--enforce-eager"]).enforce_eager is True
    clean_env.setenv("MORA_SERVE_AUTO_MERGE", "false")
    assert _settings([]).auto_merge is False
    assert _settings(["--auto-merge"]).auto_merge is True  # flags win over the environment


def test_serve_repeated_list_flags_accumulate(clean_env):
    s = _settings(["--preload", "a=x", "--preload", "b=y"])
    assert s.preload_map == {"a": "x", "b": "y"}
    s = _settings(["--preload", "a=x", "b=y", "--port", "7", "--preload", "c=z"])
    assert s.preload_map == {"a": "x", "b": "y", "c": "z"} and s.port == 7
    s = _settings(["--sources", "one=p/1", "--sources", "two=p/2", "three=p/3"])
    assert s.sources == {"one": "p/1", "two": "p/2", "three": "p/3"}


@pytest.mark.parametrize("argv, problem", [
    (["--preload", "a=x", "--preload", "broken"], "'broken': expected ID=PATH"),
    (["--preload", "a=x", "=y"], "expected ID=PATH"),
    (["--preload", "a=x", "--preload", "a=y"], "preloaded twice"),
    (["--sources", "s=1", "nokey"], "'nokey': expected KEY=VALUE"),
    (["--sources", "s=1", "--sources", "s=2"], "given twice"),
    (["--port", "http"], "port"),
])
def test_serve_malformed_items_are_errors(clean_env, argv, problem):
    with pytest.raises(ValueError, match=problem):
        _settings(argv)


def test_serve_env_and_config_file_for_lists_and_dicts(clean_env, tmp_path):
    clean_env.setenv("MORA_SERVE_PRELOAD", "a=x, b=y")
    clean_env.setenv("MORA_SERVE_SOURCES", '{"s": "p/s"}')
    s = _settings([])
    assert s.preload_map == {"a": "x", "b": "y"} and s.sources == {"s": "p/s"}
    clean_env.setenv("MORA_SERVE_SOURCES", "s=p/s,t=p/t")
    assert _settings([]).sources == {"s": "p/s", "t": "p/t"}
    clean_env.setenv("MORA_SERVE_PRELOAD", '["a=x"]')
    assert _settings([]).preload == ["a=x"]
    for bad in ("a=x,,b=y", "[not json", "a"):
        clean_env.setenv("MORA_SERVE_PRELOAD", bad)
        with pytest.raises(ValueError, match="preload"):
            _settings([])
    clean_env.delenv("MORA_SERVE_PRELOAD")
    clean_env.delenv("MORA_SERVE_SOURCES")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preload: [a=x, b=y]\nsources: {s: p/s}\nauto-merge: false\nmax_loras: 2\n")
    s = _settings([], config=cfg)
    assert (s.preload, s.sources, s.auto_merge, s.max_loras) == (["a=x", "b=y"], {"s": "p/s"}, False, 2)
    cfg.write_text("preload: [a=x]\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        _settings([], config=cfg)


def test_serve_main_rejects_a_malformed_preload_before_starting(capsys, tmp_path):
    from serve.server import main as serve_main

    rc = serve_main(["--model", str(tmp_path), "--adapter-root", str(tmp_path), "--preload", "good=x", "--preload", "bad"])
    assert rc == 2 and "'bad': expected ID=PATH" in capsys.readouterr().err


def test_serve_refuses_bad_preloads_before_starting_the_engine(demo_assets, tmp_path):
    """Every bad preload (id, path, config, shapes) is named, and the engine never starts."""
    import shutil
    import subprocess
    import sys


    root = tmp_path / "adapters"
    shutil.copytree(demo_assets / "adapters" / "atlas", root / "atlas")
    shutil.copytree(demo_assets / "adapters" / "atlas", root / "broken")
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"], "use_mora": True, "mora_type": 5}))
    # shapes that do not match the base model: one M with an extra row
    from safetensors.torch import load_file, save_file

    shutil.copytree(demo_assets / "adapters" / "atlas", root / "misfit")
    weights = load_file(str(root / "misfit" / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.cat([weights[name], weights[name][:1]])
    save_file(weights, str(root / "misfit" / "adapter_model.safetensors"))
    argv = ["--model", str(demo_assets / "base"), "--adapter-root", str(root), "--port", "0", "--metrics-port", "0",
            "--preload", "good=atlas", "bad/id=atlas", "escape=../outside", "missing=nowhere", "broken=broken", "misfit=misfit"]
    proc = subprocess.run([sys.executable, "-m", "serve.server", *argv], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log
    for item in ("bad/id=atlas", "escape=../outside", "missing=nowhere", "broken=broken", "misfit=misfit"):
        assert f"preload {item}:" in log, (item, log)
    assert "preload good=atlas" not in log
    assert "mora_type" in log and "leaves the adapter root" in log and "does not exist" in log
    assert "engine ready" not in log and "vllm" not in log.lower().replace("vllm's", ""), "the engine must not start"


def test_byo_walkthrough_commands_parse():
    """docs/byo.md: its mora-serve command is valid for the generated CLI and covers what it promises."""
    import re
    import shlex
    from pathlib import Path

    from serve.config import load_settings, parse_args

    doc = (Path(__file__).resolve().parent.parent / "docs" / "byo.md").read_text()
    cmd = re.search(r"\.venv/bin/mora-serve (.*?)\n```", doc, re.S).group(1).replace("\\\n", " ")
    cli, config = parse_args(shlex.split(cmd))
    s = load_settings(cli, config)
    assert s.preload_map == {"support": "support-v3"} and s.dtype == "bfloat16" and s.max_lora_rank == 16
    for topic in ("config.json", "peft", "mora inspect", "grpcurl", "curl", "MoraClient", "max_lora_rank", "dtype"):
        assert topic in doc, topic
