"""Automatic merge policy (dLoRA-style): merge the adapter that carries nearly all traffic,
unmerge when traffic mixes, with hysteresis and a minimum dwell time so it does not flap.

Pure decision logic over a sliding window of request arrivals; the server runs it on a timer
and carries out its decisions. Adapters under manual control are left alone.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Decision", "MergePolicy"]

BASE = ""  # requests for the base model count as traffic too
MAX_EVENTS = 1 << 16


@dataclass(frozen=True)
class Decision:
    action: str  # "merge" or "unmerge"
    adapter_id: str
    share: float
    requests: int
    reason: str


class MergePolicy:
    """Decide merges from the adapter share of requests over the last `window_s` seconds.

    * merge `a` when nothing is merged, `a` is eligible, at least `min_requests` arrived in the
      window and `a`'s share is >= `merge_share`;
    * unmerge `m` when its share falls below `unmerge_share` (< `merge_share`: hysteresis) with
      at least `min_requests` in the window (a trickle of other requests costs little while
      merged; real mixed traffic does);
    * no transition within `min_dwell_s` of the previous one; an idle window changes nothing.
    """

    def __init__(self, *, window_s: float, merge_share: float, unmerge_share: float, min_requests: int, min_dwell_s: float) -> None:
        if not 0 <= unmerge_share < merge_share <= 1:
            raise ValueError("need 0 <= unmerge_share < merge_share <= 1")
        self.window_s = window_s
        self.merge_share = merge_share
        self.unmerge_share = unmerge_share
        self.min_requests = min_requests
        self.min_dwell_s = min_dwell_s
        # Bounded: the shares of the last MAX_EVENTS requests are as good a signal as the window's.
        self._events: deque[tuple[float, str]] = deque(maxlen=MAX_EVENTS)
        self._last_transition = float("-inf")

    def observe(self, adapter_id: str | None, now: float) -> None:
        self._events.append((now, adapter_id or BASE))
        while self._events and self._events[0][0] < now - self.window_s:  # expire as we go, too
            self._events.popleft()

    def transitioned(self, now: float) -> None:
        """A merge or unmerge happened at `now` (the policy's own, or not: an unmerge for another
        adapter's request); the dwell time counts from the latest."""
        self._last_transition = max(self._last_transition, now)

    def shares(self, now: float) -> tuple[Counter[str], int]:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        counts = Counter(a for _, a in self._events)
        return counts, sum(counts.values())

    def decide(self, now: float, merged: str | None, eligible: Callable[[str], bool], manual: Iterable[str] = ()) -> Decision | None:
        counts, total = self.shares(now)
        if now - self._last_transition < self.min_dwell_s or total == 0:
            return None
        if merged is not None:
            if merged in set(manual) or total < self.min_requests:
                return None
            share = counts.get(merged, 0) / total
            if share < self.unmerge_share:
                return Decision("unmerge", merged, share, total, f"traffic mixed: {share:.0%} < {self.unmerge_share:.0%}")
            return None
        if total < self.min_requests:
            return None
        top, n = counts.most_common(1)[0]
        share = n / total
        if top != BASE and share >= self.merge_share and eligible(top):
            return Decision("merge", top, share, total, f"{share:.0%} of {total} requests >= {self.merge_share:.0%}")
        return None
