"""Shared fixtures: the reference vectors, a tiny random Llama, and the demo assets (built once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Vendored from the authors' reference implementation: see tests/data/mora-reference/README.md
# (split by case into shards under 5 MiB; together they hold all 75 cases in order).
REFERENCE = REPO / "tests" / "data" / "mora-reference"
REFERENCE_SHARDS = ("vectors-0.safetensors", "vectors-1.safetensors")


@pytest.fixture(scope="session")
def reference_cases() -> list[dict]:
    """The 75 cases produced by the authors' reference implementation."""
    from safetensors import safe_open

    index: list[dict] = []
    for shard in REFERENCE_SHARDS:
        path = REFERENCE / shard
        if not path.is_file():
            pytest.fail(f"reference vectors missing at {path}")
        with safe_open(str(path), framework="pt") as f:
            cases = json.loads(f.metadata()["index"])
            for case in cases:
                for key in ("M", "x", "y", "delta_weight"):
                    name = f"{case['case']}.{key}"
                    if key != "delta_weight" or case["has_delta_weight"]:
                        case[key] = f.get_tensor(name)
            index.extend(cases)
    return index


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo directory, built once per test session by the same code as `mora demo-assets`."""
    from mora.demo import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo") / "assets", log=lambda _: None)


@pytest.fixture(scope="session")
def demo_facts(demo_assets: Path) -> dict[str, list[dict[str, str]]]:
    return json.loads((demo_assets / "demo.json").read_text())["adapters"]


def tiny_llama(seed: int = 0, *, hidden: int = 64, layers: int = 2, inter: int = 96, heads: int = 4, kv: int = 2):
    """A very small random Llama for fast unit tests (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64, initializer_range=0.08,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    # Tests compare small tensors; one thread keeps them quick and unaffected by a busy core.
    torch.set_num_threads(1)
