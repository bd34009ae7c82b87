"""Llama, Qwen2 (qkv bias), Qwen3 (q/k norms) and Mistral: MoRA in vLLM equals the transformers reference."""

from __future__ import annotations

import pytest
from engine_helpers import TARGETS, engine, hf_greedy, random_mora, tiny_model

pytestmark = pytest.mark.vllm
MAX_TOKENS = 6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_architecture(arch, tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model = tiny_model(tmp_path / arch, arch, seed=7)
    adapters = {}
    for i, t in enumerate([1, 6, 3]):
        path = tmp_path / f"{arch}-t{t}"
        random_mora(model, path, mora_type=t, r=4, seed=20 + i, scale=0.1,
                    targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if t != 3 else ["v_proj", "down_proj"])
        adapters[path.name] = path
    jobs = [(p, n) for n in adapters for p in ("hello world", "abc")] + [("hello world", None)]
    expected = hf_greedy(model, adapters, jobs, MAX_TOKENS)
    with engine(model, max_loras=4) as llm:
        reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(adapters.items())}
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([p for p, _ in jobs], params, lora_request=[reqs[n] if n else None for _, n in jobs], use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == expected
        digest = llm.collective_rpc("mora_weight_digest")[0]
        llm.collective_rpc("mora_merge", args=(reqs[next(iter(adapters))].lora_int_id,))
        merged = [list(o.outputs[0].token_ids) for o in llm.generate([p for p, _ in jobs], params, lora_request=[reqs[n] if n else None for _, n in jobs], use_tqdm=False)]
        assert merged == expected
        llm.collective_rpc("mora_unmerge")
        assert llm.collective_rpc("mora_weight_digest")[0] == digest


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_tensor_parallel_2(arch, tmp_path, monkeypatch):
    """Two tensor-parallel CPU workers (column shards of q/k/v and gate/up, row shards of o and
    down): mixed unmerged adapters of types 1, 6 and 3 equal the transformers reference (the
    single-process result), so do the same requests with one of them merged on both ranks, and
    unmerge restores each rank's shard bit for bit. Phi-3 packs q/k/v and gate/up in one
    checkpoint module each: each rank holds its shard of every part of one adapter's module."""
    import os

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs, one per tensor-parallel worker")
    # vLLM's automatic thread binding wants one NUMA node per worker; bind one CPU each instead.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    model = tiny_model(tmp_path / arch, arch, seed=7)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if arch == "phi3" else TARGETS
    adapters = {}
    for i, t in enumerate([1, 6, 3]):
        path = tmp_path / f"tp-t{t}"
        random_mora(model, path, mora_type=t, r=4, seed=20 + i, scale=0.1, targets=targets)
        adapters[path.name] = path
    jobs = [(p, n) for n in adapters for p in ("hello world", "abc")] + [("hello world", None)]
    expected = hf_greedy(model, adapters, jobs, MAX_TOKENS)
    with engine(model, max_loras=4, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(adapters.items())}
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

        def generate() -> list[list[int]]:
            outs = llm.generate([p for p, _ in jobs], params, lora_request=[reqs[n] if n else None for _, n in jobs], use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        assert generate() == expected
        digests = llm.collective_rpc("mora_weight_digest")
        assert len(digests) == 2 and digests[0] != digests[1]  # each rank holds its own shard
        statuses = llm.collective_rpc("mora_merge", args=(reqs["tp-t6"].lora_int_id,))
        assert len(statuses) == 2
        assert generate() == expected
        llm.collective_rpc("mora_unmerge")
        assert llm.collective_rpc("mora_weight_digest") == digests
