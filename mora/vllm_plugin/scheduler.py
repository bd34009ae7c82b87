"""Adapter-aware admission with a bound on how long any request can be passed over.

vLLM's scheduler admits waiting requests first come, first served, but skips one whose adapter
cannot get a slot (the step already holds `max_loras` other adapters) and goes on with the
requests behind it: those whose adapter is already in the step fill the batch. That keeps steps
full, and it can pass a request over for ever while the step's adapters keep receiving traffic.

`MoraScheduler` counts how many steps admitted a request that arrived after a waiting one (a
pass; by queue order, not by clock). Once the oldest waiting request has been passed over `admission_max_passes` times, the
requests behind it are held back until it is admitted: the step's adapters then drain (their
running requests finish and nothing new of them is admitted from behind it), a slot frees, and
it gets it. So a request waits at most `admission_max_passes` admissions of later requests plus
the running requests' completion. Per-tenant fairness is the server's (quotas count each tenant's
sequences before requests reach the engine) and is unchanged.

`admission_max_passes=0` is strict arrival order: no request is ever passed over. Each step
admits waiting requests in order up to the first one whose adapter cannot get a slot, and none
behind it (steps then run fewer requests: bench.scale measures both).

Enabled with `scheduler_cls="mora.vllm_plugin.scheduler.MoraScheduler"` (mora-serve does); the
bound comes from `additional_config={"mora_admission_max_passes": N}` (default `MAX_PASSES`).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

__all__ = ["MAX_PASSES", "MoraScheduler"]

log = logging.getLogger(__name__)
MAX_PASSES = 16
CONFIG_KEY = "mora_admission_max_passes"


class MoraScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extra = self.vllm_config.additional_config
        self.mora_max_passes = int(extra.get(CONFIG_KEY, MAX_PASSES)) if isinstance(extra, dict) else MAX_PASSES
        if self.mora_max_passes < 0:
            raise ValueError(f"{CONFIG_KEY} must be at least 0, got {self.mora_max_passes}")
        self.mora_passes: dict[str, int] = {}  # waiting request id -> steps that admitted a later request

    def _mora_starved(self) -> int | None:
        """The position in the waiting queue of the oldest request passed over too often."""
        for position, request in enumerate(self.waiting):
            if self.mora_passes.get(request.request_id, 0) >= self.mora_max_passes:
                return position
        return None

    def _mora_first_without_slot(self) -> int | None:
        """The position in the waiting queue of the first request whose adapter cannot get a slot
        in this step (the running requests' adapters and those admitted ahead of it fill
        `max_loras`): vLLM's own check, walked over the queue in order."""
        max_loras = self.lora_config.max_loras if self.lora_config else 0
        if not max_loras:
            return None
        loras = {r.lora_request.lora_int_id for r in self.running if r.lora_request and r.lora_request.lora_int_id > 0}
        for position, request in enumerate(self.waiting):
            lora = request.lora_request.lora_int_id if request.lora_request else 0
            if lora <= 0 or lora in loras:
                continue
            if len(loras) >= max_loras:
                return position
            loras.add(lora)
        return None

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        position = self._mora_first_without_slot() if self.mora_max_passes == 0 else self._mora_starved()
        held = []
        if position is not None:
            # First come, first served from that request on (the starved one, or in strict order the
            # first without a slot): nothing behind it is admitted.
            held = list(self.waiting)[position + 1:]
            if held:
                self.waiting.remove_requests(held)
        order = {r.request_id: i for i, r in enumerate(self.waiting)}  # the queue as this step found it
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            for request in held:  # back, in their order, behind everything that was ahead of them
                self.waiting.add_request(request)
        self._mora_count_passes(output, order)
        return output

    def _mora_count_passes(self, output: Any, order: dict[str, int]) -> None:
        """A request still waiting was passed over if this step admitted one behind it."""
        behind = [order[new.req_id] for new in output.scheduled_new_reqs if new.req_id in order]
        waiting = [r.request_id for r in self.waiting]
        if behind:
            last = max(behind)
            for request_id in waiting:
                if order.get(request_id, last) < last:
                    self.mora_passes[request_id] = self.mora_passes.get(request_id, 0) + 1
        still = set(waiting)
        for request_id in [r for r in self.mora_passes if r not in still]:
            del self.mora_passes[request_id]  # admitted, finished or aborted
