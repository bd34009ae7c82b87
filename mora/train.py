"""Training MoRA adapters on prompt -> completion pairs (the paper's memorization task).

Small and deterministic by design: it trains the demo adapters and the test fixtures. The base
model stays frozen; only the adapter's `M` matrices get gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mora.hf import MoraModel

__all__ = ["Example", "TrainResult", "encode_examples", "greedy_complete", "train_adapter"]


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    memorized: bool


def encode_examples(tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """`(input_ids, attention_mask, labels)`, right-padded; labels cover completion + EOS only."""
    rows, label_rows = [], []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        label_rows.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return ids, mask, labels


@torch.no_grad()
def greedy_complete(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:  # noqa: ANN001
    """Greedy decoding until EOS, without the prompt and EOS."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def train_adapter(
    mm: MoraModel,
    name: str,
    tokenizer,  # noqa: ANN001
    examples: Sequence[Example],
    *,
    max_steps: int = 600,
    lr: float = 3e-3,
    check_every: int = 10,
    target_loss: float = 0.005,
) -> TrainResult:
    """Adam on adapter `name` until every example's completion is the greedy argmax (checked
    with teacher forcing every `check_every` steps) with a loss under `target_loss` (a margin
    that survives other kernels' rounding), or `max_steps` is reached."""
    ids, mask, labels = encode_examples(tokenizer, examples)
    params = mm.parameters(name)
    opt = torch.optim.Adam(params, lr=lr)
    mm.set_adapter(name)
    model = mm.model
    model.train()
    loss_value = float("nan")
    memorized = False
    step = 0
    for step in range(1, max_steps + 1):
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if step % check_every == 0:
            with torch.no_grad():
                pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
                sel = target != -100
                memorized = bool((pred[sel] == target[sel]).all())
            if memorized and loss_value < target_loss:
                break
    model.eval()
    return TrainResult(step, loss_value, memorized)
