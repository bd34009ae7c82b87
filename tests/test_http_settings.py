"""Settings of the HTTP API and the vLLM engine passthrough, checked before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from serve.config import load_settings, parse_args


def _settings(*flags: str, config=None):
    cli, config_file = parse_args(["--model", "m", "--adapter-root", "a", *flags, *(["--config", str(config)] if config else [])])
    return load_settings(cli, config_file)


def test_engine_args_pass_through_with_vllm_types(tmp_path):
    s = _settings("--engine-arg", "enable_prefix_caching=true", "--engine-arg", "max_num_batched_tokens=2048",
                  "--engine-arg", "served_model_name=demo", "--engine-arg", "gpu_memory_utilization=0.5")
    assert s.engine == {"enable_prefix_caching": True, "max_num_batched_tokens": 2048, "served_model_name": "demo",
                        "gpu_memory_utilization": 0.5}
    assert s.http_port == 8000 and _settings("--http-port", "0").http_port == 0
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"engine": {"seed": 3, "max-num-batched-tokens": "4096"}}))
    assert _settings(config=config).engine == {"seed": 3, "max_num_batched_tokens": 4096}


@pytest.mark.parametrize("arg, message", [
    ("enable_prefix_cachng=true", "'enable_prefix_cachng' is not a vLLM engine argument (did you mean enable_prefix_caching"),
    ("max_loras=8", "'max_loras' is managed by mora-serve: use --max-loras"),
    ("kv_cache_memory_bytes=1", "use --kv-cache-bytes"),
    ("max_num_batched_tokens=lots", "'max_num_batched_tokens': 'lots' does not fit vLLM's type"),
    ("enable_prefix_caching=[1]", "'enable_prefix_caching'"),
])
def test_bad_engine_args_are_named(arg, message):
    with pytest.raises(ValueError) as e:
        _settings("--engine-arg", arg)
    assert message in str(e.value)


def test_server_refuses_unknown_engine_args_before_starting_the_engine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve.server", "--model", str(tmp_path), "--adapter-root", str(tmp_path),
                           "--engine-arg", "no_such_setting=1", "--engine-arg", "seed=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "'no_such_setting' is not a vLLM engine argument" in proc.stderr and "'seed' is" not in proc.stderr
