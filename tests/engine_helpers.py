"""Tiny random models and adapters for engine tests, and the HF reference they are checked against."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mora.checkpoint import AdapterConfig, LoraAdapter, MoraAdapter, save_lora_adapter, save_mora_adapter
from mora.demo import build_tokenizer
from mora.hf import linear_module_shapes
from mora.spec import MoraSpec

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random float32 model of architecture `arch` with the demo's byte-level tokenizer.

    head_dim is 32 (vLLM's CPU attention supports 32 and up); q/k/v, gate/up and down all get
    different MoRA sizes n.
    """
    import transformers

    common = dict(
        vocab_size=320, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        tie_word_embeddings=False, initializer_range=0.08,
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        # one checkpoint module each for q/k/v and for gate/up (qkv_proj, gate_up_proj)
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[arch]
    extra = {"head_dim": 32} if arch in ("qwen3", "mistral") else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra)).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def random_mora(model_dir: Path, out: Path, *, mora_type: int, r: int = 4, seed: int = 0, scale: float = 0.05,
                targets: Sequence[str] = TARGETS, rank_pattern: dict | None = None) -> MoraAdapter:
    """A MoRA adapter with random `M`s, saved in the peft-mora layout."""
    from mora.hf import module_shapes_from_config

    config = AdapterConfig(r=r, target_modules=list(targets), use_mora=True, mora_type=mora_type,
                           rank_pattern=rank_pattern or {}, lora_alpha=16)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for module, (out_f, in_f) in module_shapes_from_config(model_dir).items():
        if config.targets(module):
            spec = MoraSpec.from_rank(in_f, out_f, config.rank_for(module), mora_type)
            weights[module] = torch.randn(spec.n, spec.n, generator=g) * scale
    adapter = MoraAdapter(out.name, config, weights)
    save_mora_adapter(adapter, out)
    return adapter


def random_lora(model_dir: Path, out: Path, *, r: int = 8, seed: int = 0, targets: Sequence[str] = ("q_proj", "v_proj")) -> LoraAdapter:
    from mora.hf import module_shapes_from_config

    config = AdapterConfig(r=r, target_modules=list(targets), lora_alpha=16)
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for module, (out_f, in_f) in module_shapes_from_config(model_dir).items():
        if config.targets(module):
            a[module] = torch.randn(r, in_f, generator=g) * 0.1
            b[module] = torch.randn(out_f, r, generator=g) * 0.1
    adapter = LoraAdapter(out.name, config, a, b)
    save_lora_adapter(adapter, out)
    return adapter


def hf_greedy_scored(model_dir: Path, adapters: dict[str, Path], jobs: Sequence[tuple[str, str | None]],
                     max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy token ids from the transformers reference (`mora.hf`) for (prompt, adapter) jobs, each
    with the per-step margin between the best and second-best logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mora.checkpoint import load_mora_adapter
    from mora.hf import MoraModel

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    mm = MoraModel(model)
    for name, path in adapters.items():
        mm.add_adapter(load_mora_adapter(path, name))
    out = []
    for prompt, name in jobs:
        mm.set_adapter(name)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id, min_new_tokens=max_tokens,
                                 output_scores=True, return_dict_in_generate=True)
        top2 = [s[0].topk(2).values for s in gen.scores]
        out.append((gen.sequences[0, ids.shape[1]:].tolist(), [float(v[0] - v[1]) for v in top2]))
    return out


def hf_greedy(model_dir: Path, adapters: dict[str, Path], jobs: Sequence[tuple[str, str | None]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids from the transformers reference (`mora.hf`) for (prompt, adapter) jobs."""
    return [tokens for tokens, _ in hf_greedy_scored(model_dir, adapters, jobs, max_tokens)]


# float32 logits from a batched engine and an unbatched reference differ by rounding (~1e-5 here);
# a greedy pick may only flip where the reference's top two logits are closer than this.
TIE_MARGIN = 1e-3


def assert_greedy_matches(got: Sequence[Sequence[int]], want: Sequence[tuple[list[int], list[float]]],
                          tie_margin: float = TIE_MARGIN) -> None:
    """Each engine output equals the reference up to its first step, where it may only diverge at a
    near-tie of the reference (everything after a legitimate flip is a different continuation)."""
    assert len(got) == len(want)
    for i, (g, (w, margins)) in enumerate(zip(got, want, strict=True)):
        g = list(g)
        assert len(g) == len(w), f"job {i}: {len(g)} tokens, reference has {len(w)}"
        first = next((k for k, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), None)
        if first is not None:
            assert margins[first] < tie_margin, (
                f"job {i}: token {first} is {g[first]}, reference {w[first]} with logit margin "
                f"{margins[first]:.2e} (not a tie); got {g}, want {w}")


def module_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    return linear_module_shapes(AutoModelForCausalLM.from_pretrained(str(model_dir)))


@contextmanager
def engine(model_dir: Path, **kwargs: object) -> Iterator[object]:
    """A real vLLM engine (CPU build) in this process, shut down afterwards; eager unless
    `enforce_eager=False` (with the plugin, vLLM's CPU build compiles LoRA models: tens of
    seconds per start, which `tests/test_gpu_contract_vllm.py` spends once)."""
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: ~5 s to start instead of ~40
    args = dict(enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=8, dtype="float32", max_model_len=256,
                kv_cache_memory_bytes=64 * 2**20, max_num_seqs=32, seed=0, enforce_eager=True,
                worker_extension_cls="mora.vllm_plugin.extension.MoraWorkerExtension")
    args.update(kwargs)
    llm = LLM(model=str(model_dir), **args)
    try:
        yield llm
    finally:
        core = llm.llm_engine.engine_core
        if hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
