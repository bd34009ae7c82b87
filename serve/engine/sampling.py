"""Our `Sampling` (already checked) as vLLM's `SamplingParams`."""

from __future__ import annotations

from typing import Any

from serve.errors import InvalidRequest
from serve.services.requests import Constraint, ConstraintKind, Sampling

__all__ = ["sampling_params"]

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _structured(c: Constraint) -> Any:
    """vLLM's `StructuredOutputsParams` for `c` (compiled by the engine's structured-output backend)."""
    from vllm.sampling_params import StructuredOutputsParams

    if c.kind is ConstraintKind.JSON_SCHEMA:
        return StructuredOutputsParams(json=c.spec)
    if c.kind is ConstraintKind.JSON_OBJECT:
        return StructuredOutputsParams(json_object=True)
    if c.kind is ConstraintKind.REGEX:
        return StructuredOutputsParams(regex=c.spec)
    if c.kind is ConstraintKind.CHOICE:
        return StructuredOutputsParams(choice=list(c.choices))
    return StructuredOutputsParams(grammar=c.spec)


def sampling_params(sp: Sampling) -> Any:
    """vLLM `SamplingParams` for `sp` (checked and resolved by `check_sampling`); what vLLM
    still refuses is INVALID_ARGUMENT with its message."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    # logprobs=0 at least: the sampled token's log-probability, from which the server tells when a
    # request's logits became non-finite (and stops it alone; see docs/security.md).
    kw: dict[str, Any] = {"output_kind": RequestOutputKind.DELTA, "logprobs": 0 if sp.logprobs is None else sp.logprobs,
                          "max_tokens": sp.max_tokens, "ignore_eos": sp.ignore_eos, "n": sp.n,
                          "skip_special_tokens": sp.skip_special_tokens}
    kw.update({name: getattr(sp, name) for name in _OPTIONAL if getattr(sp, name) is not None})
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.min_tokens:
        kw["min_tokens"] = sp.min_tokens
    if sp.logit_bias:
        kw["logit_bias"] = dict(sp.logit_bias)
    try:
        if sp.constraint is not None:
            kw["structured_outputs"] = _structured(sp.constraint)
        return SamplingParams(**kw)
    except (ValueError, TypeError, OverflowError, VLLMClientError) as e:
        raise InvalidRequest(f"invalid sampling parameters: {e}") from None
