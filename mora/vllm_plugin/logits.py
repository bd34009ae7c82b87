"""vLLM's LoRA logits processor, without its LoRA add in steps that hold no stock LoRA token.

With LoRA enabled vLLM replaces the model's logits processor by `LogitsProcessorWithLoRA`,
whose `_get_logits` adds `hidden @ lora_a @ lora_b` of each token's slot to the logits in
every step (on the CPU: two batched products over every token, whatever the step holds).
MoRA adapters never have lm_head weights, and their tokens are hidden from vLLM's mapping; a
merged adapter's tokens and base tokens map to no slot. For a step without stock LoRA tokens
that add is `+ 0` on every logit: this subclass then returns the plain logits processor's
logits instead (same head, same gather, same vocabulary slice: the same bits but the sign of
a zero), so merged single-tenant traffic runs no adapter machinery, here either.

The logits are computed outside vLLM's compiled forward and CUDA graphs, so the host branch
on the step's kind is safe in every mode.
"""

from __future__ import annotations

import torch
from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

from mora.kernels import StepKind
from mora.vllm_plugin.runtime import MoraRuntime

__all__ = ["MoraLogitsProcessorWithLoRA", "mora_logits_processor"]


class MoraLogitsProcessorWithLoRA(LogitsProcessorWithLoRA):
    """`LogitsProcessorWithLoRA` that skips its LoRA add where the step holds no LoRA token."""

    mora_runtime: MoraRuntime | None = None  # set by the model manager (`attach`)

    def attach(self, runtime: MoraRuntime) -> None:
        # The plain processor's logits equal the LoRA one's before its add only without the
        # LoRA path's vocabulary reindexing and with one vocabulary size: else stay stock.
        base = self.base_layer
        if self.sharded_to_full_mapping_gpu is None and base.vocab_size == base.org_vocab_size:
            self.mora_runtime = runtime

    def _get_logits(self, hidden_states: torch.Tensor, lm_head, embedding_bias: torch.Tensor | None = None,  # noqa: ANN001
                    skip_gather: bool = False) -> torch.Tensor | None:
        rt = self.mora_runtime
        if rt is None or skip_gather or StepKind.LORA in rt.kind:  # skip_gather: vLLM's own error
            return super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
        actual = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
        return self.base_layer._get_logits(hidden_states, actual, embedding_bias, skip_gather)


def mora_logits_processor(layer, lm_head, max_loras: int, lora_config, model_config=None) -> MoraLogitsProcessorWithLoRA:  # noqa: ANN001
    """`vllm.lora.utils.from_layer_logits_processor`, building the MoRA subclass."""
    ret = MoraLogitsProcessorWithLoRA(layer, lm_head.embedding_dim, lm_head.weight.dtype, lm_head.weight.device,
                                      lm_head.get_sharded_to_full_mapping())
    ret.create_lora_weights(max_loras, lora_config, model_config)
    return ret
