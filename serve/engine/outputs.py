"""What the engine face hands the services: vLLM's request outputs as our own types.

The services never see a vLLM object: `Engine.generate` translates each of vLLM's
`RequestOutput`s (deltas) into an `EngineOutput` here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Alternative", "EngineOutput", "SequenceDelta"]


@dataclass(frozen=True)
class Alternative:
    """One token's log-probability at one step (the sampled token or one of the top k)."""

    logprob: float
    rank: int | None  # 1 = most likely; None: not ranked (the sampled token outside the top k)
    text: str | None  # decoded by the engine, if it did


@dataclass(frozen=True)
class SequenceDelta:
    """New output of one of a request's `n` sequences."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, Alternative], ...] | None  # one {token id: Alternative} per new token
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass(frozen=True)
class EngineOutput:
    sequences: tuple[SequenceDelta, ...]
    finished: bool
    queue_wait: float | None  # seconds from queued to first scheduled, once known
