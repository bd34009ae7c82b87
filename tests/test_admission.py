"""Adapter-aware admission with a bound (mora/vllm_plugin/scheduler.py), in a real vLLM engine.

One adapter slot; a request for adapter B waits behind requests for adapter A, with more A
requests behind it. vLLM's scheduler admits the A requests behind B while A holds the slot,
passing B over until every A request is done; `MoraScheduler` holds the requests behind B back
once B has been passed over `mora_admission_max_passes` times, or at once with 0 (strict
arrival order). The order is counted in engine
steps (admissions), never in time: the same on any machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import engine

pytestmark = pytest.mark.vllm
SCHEDULER = "mora.vllm_plugin.scheduler.MoraScheduler"


def _first_scheduled(llm, adapters: Path) -> tuple[float, list[float]]:
    """B's first-scheduled time and the A requests' (arrival order: A x3, B, A x6)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    requests = {name: LoRARequest(name, i + 1, str(adapters / name)) for i, name in enumerate(("atlas", "borealis"))}
    order = ["atlas"] * 3 + ["borealis"] + ["atlas"] * 6
    # Staggered lengths: the second A request is short, so A requests start a third of a length
    # apart; when one finishes another is still running, and adapter A keeps the one slot for as
    # long as A traffic lasts.
    lengths = [12, 4, 12, 4, 12, 12, 12, 12, 12, 12]
    params = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0) for n in lengths]
    outs = llm.generate(["hello world"] * len(order), params, lora_request=[requests[a] for a in order],
                        use_tqdm=False)
    times = [o.metrics.scheduled_ts for o in outs]
    return times[3], [t for i, t in enumerate(times) if i != 3]


@pytest.mark.parametrize("passes", [None, 2, 0], ids=["vllm-default", "mora-scheduler", "strict-order"])
def test_a_request_is_passed_over_a_bounded_number_of_times(demo_assets: Path, passes: int | None):
    extra = {} if passes is None else {"scheduler_cls": SCHEDULER, "additional_config": {"mora_admission_max_passes": passes}}
    with engine(demo_assets / "base", max_loras=1, max_num_seqs=2, disable_log_stats=False, **extra) as llm:
        b, a = _first_scheduled(llm, demo_assets / "adapters")
    # The first two A requests share the first step in every mode: strict order holds back only
    # what is behind a request without a slot, not everything behind the head of the queue.
    assert a[0] == a[1], a
    later_a = a[3:]  # the six A requests that arrived after B
    if passes is None:
        # vLLM alone: every A request behind B goes first (the starvation this bounds)
        assert all(t < b for t in later_a), (b, later_a)
    elif passes:
        # passed over twice, then the requests behind it wait: B runs before most of them
        assert sum(t < b for t in later_a) <= 2, (b, later_a)
    else:
        # strict arrival order: B is never passed over
        assert all(t >= b for t in later_a), (b, later_a)
