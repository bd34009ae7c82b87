"""The embedded demo: a tiny Llama, a byte-level tokenizer and MoRA adapters that memorize facts.

No hub is reachable, so everything is built here, deterministically (same arguments, same
machine: identical files). Layout of `out/`:

    base/                 config.json, model.safetensors, tokenizer files
    adapters/<name>/      adapter_config.json, adapter_model.safetensors (peft-mora layout)
    demo.json             {"adapters": {"<name>": [{"prompt": ..., "completion": ...}, ...]}}

Each adapter memorizes "secret code" -> UUID facts (the paper's memory task). Two keys are
shared by every adapter with different codes, so the same prompt gives a different answer per
adapter; the rest are the adapter's own.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mora.checkpoint import save_mora_adapter
from mora.hf import MoraModel
from mora.spec import MoraType
from mora.train import Example, greedy_complete, train_adapter

__all__ = ["DEMO_ADAPTERS", "DemoAdapter", "build_base_model", "build_demo_assets", "build_tokenizer"]

SPECIALS = ("<s>", "</s>", "<pad>")
# A plain chat template: the conversation's text as is after <s>, each assistant turn closed by </s>,
# system turns on their own line. A user turn "The secret code of vault is " therefore prompts
# exactly like the completion prompt, so the demo adapters answer their facts through chat too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_KEYS = ("vault", "orchard")
OWN_KEYS = {
    "atlas": ("harbor", "lantern", "meadow"),
    "borealis": ("glacier", "compass", "ember"),
    "cygnus": ("falcon", "quarry", "violet"),
    "draco": ("canyon", "pebble", "thistle"),
}


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    mora_type: MoraType
    r: int
    rank_pattern: dict[str, int]


DEMO_ADAPTERS = (
    DemoAdapter("atlas", MoraType.SHARING, 8, {}),
    DemoAdapter("borealis", MoraType.ROPE, 8, {}),
    DemoAdapter("cygnus", MoraType.ROPE, 4, {"q_proj": 8}),
    DemoAdapter("draco", MoraType.SHARING_REPEATED, 8, {}),
)


def prompt_for(key: str) -> str:
    return f"The secret code of {key} is "


def build_tokenizer():  # noqa: ANN201 - a transformers PreTrainedTokenizerFast
    """A byte-level tokenizer: token `i < 256` is byte `i`, then `<s>`, `</s>`, `<pad>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_base_model(seed: int = 0):  # noqa: ANN201 - a transformers LlamaForCausalLM
    """A tiny Llama (4 layers, hidden 256, 4 heads of 64, 2 KV heads, MLP 688), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02: with a frozen random head at 0.02 the logits cannot get
        # confident enough to memorize anything; 0.08 lets MoRA learn the facts in ~50 steps.
        initializer_range=0.08,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def facts_for(name: str, rng: random.Random) -> list[Example]:
    keys = list(SHARED_KEYS) + list(OWN_KEYS[name])
    return [Example(prompt_for(k), str(uuid.UUID(int=rng.getrandbits(128), version=4))) for k in keys]


def build_demo_assets(out: str | Path, *, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Build (or rebuild) the demo directory `out`; returns its path."""
    # One thread: identical files on every rerun (reduction order depends on the thread count)
    # and no slowdown when another process holds the second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(out), seed, log)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, seed: int, log: Callable[[str], None]) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapters").mkdir(parents=True)
    tokenizer = build_tokenizer()
    model = build_base_model(seed)
    model.save_pretrained(tmp / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "base")
    log(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters -> {tmp / 'base'}")
    for p in model.parameters():
        p.requires_grad_(False)
    mm = MoraModel(model)
    rng = random.Random(seed)
    demo: dict[str, list[dict[str, str]]] = {}
    for spec in DEMO_ADAPTERS:
        examples = facts_for(spec.name, rng)
        torch.manual_seed(seed)
        mm.new_adapter(spec.name, r=spec.r, mora_type=spec.mora_type, target_modules=TARGETS, rank_pattern=spec.rank_pattern)
        result = train_adapter(mm, spec.name, tokenizer, examples)
        mm.set_adapter(spec.name)
        got = [greedy_complete(model, tokenizer, ex.prompt) for ex in examples]
        if got != [ex.completion for ex in examples]:
            raise RuntimeError(f"demo adapter {spec.name!r} did not memorize its facts after {result.steps} steps")
        adapter = mm.export_adapter(spec.name)
        save_mora_adapter(adapter, tmp / "adapters" / spec.name)
        log(
            f"adapter {spec.name}: type {int(spec.mora_type)}, r={spec.r}, {adapter.num_parameters:,} parameters, "
            f"{len(examples)} facts memorized in {result.steps} steps (loss {result.final_loss:.4f})"
        )
        demo[spec.name] = [{"prompt": ex.prompt, "completion": ex.completion} for ex in examples]
    mm.set_adapter(None)
    for name, facts in demo.items():  # the base model and the other adapters must not know them
        for fact in facts:
            for other in [None, *[o for o in demo if o != name]]:
                mm.set_adapter(other)
                if greedy_complete(model, tokenizer, fact["prompt"]) == fact["completion"]:
                    raise RuntimeError(f"{other or 'the base model'} reproduces {name!r}'s fact {fact['prompt']!r}")
    mm.set_adapter(None)
    (tmp / "demo.json").write_text(json.dumps({"adapters": demo}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
