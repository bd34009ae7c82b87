"""A compiled CPU engine's second start loads its compile cache instead of compiling again.

vLLM 0.32's CPU build compiles with the plain Inductor backend, whose AOT artifact it cannot
load back (`'function' object has no attribute 'finalize_loading'`): with its AOT compile on
(vLLM's default on torch >= 2.10), every restart of `mora-serve` compiled the model anew. The
plugin makes the older cache the CPU default (graphs.py); this test starts the same compiled
engine twice on one cache and reads Inductor's own counters, not the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm]
REPO = Path(__file__).resolve().parent.parent

_START = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from torch._dynamo.utils import counters

    model, adapter = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, enable_lora=True, max_loras=2, max_lora_rank=8, dtype="bfloat16", max_model_len=128,
              kv_cache_memory_bytes=32 << 20, max_num_seqs=4, seed=0, enforce_eager=False)
    out = llm.generate(["prompt 1 hello", "prompt 2 hi"], SamplingParams(max_tokens=5, temperature=0),
                       lora_request=LoRARequest("a", 1, adapter))
    print("RESULT" + json.dumps({
        "mode": llm.llm_engine.vllm_config.compilation_config.mode.name,
        "aot": os.environ.get("VLLM_USE_AOT_COMPILE"),
        "tokens": [list(o.outputs[0].token_ids) for o in out],
        "inductor": dict(counters["inductor"]),
    }), flush=True)
""")


def _start(tmp_path: Path, model: Path, adapter: Path) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cache"))
    for name in ("VLLM_PLUGINS", "VLLM_USE_AOT_COMPILE", "VLLM_CPU_CI_ENV", "VLLM_DISABLE_COMPILE_CACHE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", _START, str(model), str(adapter)], capture_output=True, text=True,
                          env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT"):]), proc.stdout + proc.stderr  # vLLM logs to stdout


def test_a_compiled_cpu_engine_restarts_from_its_compile_cache(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import random_mora, tiny_model

    model = tiny_model(tmp_path / "llama")
    adapter = tmp_path / "mora"
    random_mora(model, adapter, mora_type=6, r=4, seed=5, scale=0.08)

    first, _ = _start(tmp_path, model, adapter)
    assert first["mode"] == "DYNAMO_TRACE_ONCE", first
    assert first["inductor"].get("fxgraph_cache_hit", 0) == 0, first["inductor"]  # a cold cache

    second, log = _start(tmp_path, model, adapter)
    assert "Compiling model again" not in log, log[-4000:]
    assert second["inductor"].get("fxgraph_cache_hit", 0) > 0, second["inductor"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second["inductor"]  # nothing compiled again
    assert second["tokens"] == first["tokens"]
