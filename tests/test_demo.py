"""The embedded demo: trained adapters reproduce their facts; nobody else does; builds are identical."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mora.checkpoint import load_mora_adapter
from mora.demo import build_demo_assets
from mora.hf import MoraModel
from mora.spec import MoraType
from mora.train import greedy_complete


@pytest.fixture(scope="module")
def demo_model(demo_assets: Path):
    model = AutoModelForCausalLM.from_pretrained(str(demo_assets / "base"))
    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets / "base"))
    mm = MoraModel(model)
    for d in sorted((demo_assets / "adapters").iterdir()):
        mm.add_adapter(load_mora_adapter(d))
    return mm, tokenizer


def test_layout_and_types(demo_assets, demo_facts):
    assert (demo_assets / "base" / "config.json").is_file()
    assert (demo_assets / "base" / "tokenizer.json").is_file()
    types = {int(load_mora_adapter(demo_assets / "adapters" / n).mora_type) for n in demo_facts}
    assert len(demo_facts) >= 3 and {MoraType.SHARING, MoraType.ROPE} <= types


def test_byte_level_tokenizer_round_trips(demo_assets):
    tok = AutoTokenizer.from_pretrained(str(demo_assets / "base"))
    text = "Grüße, 世界! \t{}"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_each_adapter_reproduces_its_facts_and_only_its_own(demo_model, demo_facts):
    mm, tok = demo_model
    for name, facts in demo_facts.items():
        for fact in facts:
            mm.set_adapter(name)
            assert greedy_complete(mm.model, tok, fact["prompt"]) == fact["completion"], (name, fact)
            for other in [None, *[o for o in demo_facts if o != name]]:
                mm.set_adapter(other)
                assert greedy_complete(mm.model, tok, fact["prompt"]) != fact["completion"], (other, name, fact)
    mm.set_adapter(None)


def test_shared_prompts_get_different_answers(demo_facts):
    by_prompt: dict[str, set[str]] = {}
    for facts in demo_facts.values():
        for f in facts:
            by_prompt.setdefault(f["prompt"], set()).add(f["completion"])
    shared = [p for p, answers in by_prompt.items() if len(answers) > 1]
    assert shared and all(len(by_prompt[p]) == len(demo_facts) for p in shared)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rebuild_is_identical(demo_assets, tmp_path):
    threads = torch.get_num_threads()
    again = build_demo_assets(tmp_path / "again", log=lambda _: None)
    assert torch.get_num_threads() == threads
    assert _digest(again) == _digest(demo_assets)


def test_chat_template_prompts_like_the_completion_prompt(demo_assets, demo_facts):
    tok = AutoTokenizer.from_pretrained(str(demo_assets / "base"))
    fact = demo_facts["atlas"][0]
    chat = tok.apply_chat_template([{"role": "user", "content": fact["prompt"]}], add_generation_prompt=True, tokenize=True)
    assert chat["input_ids"] == tok(fact["prompt"])["input_ids"]
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "again"}]
    assert tok.apply_chat_template(turns, tokenize=False) == "<s>Be brief.\nhi" + "yo</s>" + "again"
