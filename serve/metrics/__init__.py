"""Prometheus metrics of the server, exported with vLLM's own on `--metrics-port` at `/metrics`.

Names follow Prometheus conventions (base units, `_seconds`, `_total`, `_bytes`). The labels
`adapter` and `tenant` are capped, so a flood of adapter ids cannot blow up the series count:
each tenant has its own share of `metrics_label_limit` adapter label values (its adapters beyond
that are reported as `other`), so one tenant's churn never folds another tenant's adapters into
`other`; tenant names come from the tenants file, capped the same way. The values `base` (the
base model), `unknown` (an id the caller may not use or that is not loaded) and `other` mean
those things only: adapter ids cannot take them (`RESERVED_ADAPTER_LABELS`).

Histogram buckets are chosen for LLM serving, from sub-millisecond token gaps to minutes-long
generations:

* request duration: 5 ms .. 1 h (end to end, including queueing; every outcome, by status code, so
  that failures and cancellations are seen with their latency too);
* time to first token: 1 ms .. 10 min (prefill plus queueing: long prompts behind a full batch);
* inter-token latency: 0.5 ms .. 10 s, one observation per generated token after the first (the gap
  a streaming client sees; vLLM's `vllm:inter_token_latency_seconds`);
* time per output token: 0.5 ms .. 10 s, one observation per request, (last token - first token) /
  (tokens - 1) (vLLM's `vllm:request_time_per_output_token_seconds`);
* queue wait: 0.5 ms .. 60 s;
* adapter operations: 1 ms .. 2 min (a merge of a large model takes seconds);
* adapter loads between tiers: 0.1 ms (host -> device copy) .. 60 s (a large snapshot from disk).

vLLM's metrics (`vllm:*`, e.g. `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` and `vllm:lora_requests_info` with `running_lora_adapters`,
`waiting_lora_adapters` and `max_lora`, which LoRA-aware Kubernetes routers read) live in the
same default registry and are exported unchanged.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from mora.vllm_plugin.worker_api import TierReport
from serve.metrics.server import MetricsServer

__all__ = ["RESERVED_ADAPTER_LABELS", "AdapterLabels", "LabelLimiter", "ServerMetrics"]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 300, 600, 1200, 1800, 3600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, 600)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.25, 2.5, 5, 10)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OPERATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RESIDENCY_STATES = ("device_slot", "host_cache", "disk_only", "merged")
OTHER = "other"
BASE = "base"
UNKNOWN = "unknown"
RESERVED_ADAPTER_LABELS = frozenset({OTHER, BASE, UNKNOWN})  # adapter ids may not take these values


class LabelLimiter:
    """Caps the distinct values of one label; later ones map to `other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class AdapterLabels:
    """Adapter label values, capped per owning tenant: each owner's adapters share `limit` values
    (later ones map to `other`), whoever sends their requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, adapter_id: str, owner: str | None) -> str:
        with self._lock:
            seen = self._seen.setdefault(owner or "", set())
            if adapter_id in seen:
                return adapter_id
            if len(seen) < self.limit:
                seen.add(adapter_id)
                return adapter_id
        return OTHER


class ServerMetrics:
    """All metrics the server records."""

    def __init__(self, label_limit: int = 100, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.adapter_label = AdapterLabels(label_limit)
        self.tenant_label = LabelLimiter(label_limit)
        per_request = ["adapter", "tenant"]
        r = registry
        self.requests = Counter("mora_requests", "Generate requests by final status code.", [*per_request, "method", "code"], registry=r)
        self.request_duration = Histogram("mora_request_duration_seconds", "End-to-end latency of a generate request, by final status code.", [*per_request, "code"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("mora_time_to_first_token_seconds", "Time from arrival to the first generated token.", per_request, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mora_inter_token_latency_seconds", "Gap between consecutive output tokens (one observation per token).", per_request, buckets=TPOT_BUCKETS, registry=r)
        self.tpot = Histogram("mora_time_per_output_token_seconds", "Mean decode time per output token of one request (one observation per request).", per_request, buckets=TPOT_BUCKETS, registry=r)
        self.queue_wait = Histogram("mora_queue_wait_seconds", "Time a request waited in the engine queue before its first schedule.", per_request, buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mora_prompt_tokens", "Prompt tokens processed.", per_request, registry=r)
        self.generation_tokens = Counter("mora_generation_tokens", "Tokens generated.", per_request, registry=r)
        self.in_flight = Gauge("mora_requests_in_flight", "Generate requests admitted and not finished.", registry=r)
        self.unauthenticated = Counter("mora_unauthenticated_requests", "Calls refused before their request was read: no "
                                       "valid credential (no tenant or adapter label: nothing unauthenticated becomes one).",
                                       ["transport"], registry=r)
        self.operations = Counter("mora_adapter_operations", "Adapter lifecycle operations by result.", ["operation", "result"], registry=r)
        self.operation_duration = Histogram("mora_adapter_operation_duration_seconds", "Duration of adapter lifecycle operations.", ["operation"], buckets=OPERATION_BUCKETS, registry=r)
        self.merge_transitions = Counter("mora_merge_transitions", "Merges and unmerges, by adapter and what triggered them.", ["adapter", "direction", "trigger"], registry=r)
        self.residency = Gauge("mora_adapter_residency", "1 for the state each loaded adapter is in now.", ["adapter", "state"], registry=r)
        self.adapters_loaded = Gauge("mora_adapters_loaded", "Adapters the server serves.", registry=r)
        self.slots_in_use = Gauge("mora_adapter_slots_in_use", "Engine adapter slots holding an adapter.", registry=r)
        self.slots_capacity = Gauge("mora_adapter_slots_capacity", "Engine adapter slots (max_loras).", registry=r)
        self.merge_backup_bytes = Gauge("mora_merge_backup_bytes", "Host memory kept to unmerge the merged adapter exactly.", registry=r)
        self.engine_up = Gauge("mora_engine_up", "1 while the engine serves, 0 while starting or after it died.", registry=r)
        self._residency_series: set[str] = set()
        # tiers: snapshot on disk -> vLLM's host cache -> device slot
        self.adapter_load = Histogram("mora_adapter_load_seconds", "Time to bring an adapter up one tier, by the tier it came from "
                                      "(source: validated from the adapter folder on first use; disk: snapshot read into the host "
                                      "cache; host: host cache copied into a device slot).", ["tier"], buckets=LOAD_BUCKETS, registry=r)
        self.cache_hits = Counter("mora_adapter_cache_hits", "Adapter look-ups of engine steps found in the cache.", ["cache"], registry=r)
        self.cache_misses = Counter("mora_adapter_cache_misses", "Adapter look-ups of engine steps that had to load the adapter.", ["cache"], registry=r)
        self.evictions = Counter("mora_adapter_evictions", "Adapters evicted from a cache (they stay on disk).", ["cache"], registry=r)
        self.merge_stall = Gauge("mora_merge_step_stall_seconds", "Longest time one call of the last merge or unmerge kept "
                                 "the engine from stepping (merged weights are prepared beside the steps, swapped in between two).", registry=r)
        self.page_ins = Gauge("mora_adapter_page_ins", "Adapters of a tenant being read from disk (state=reading) or "
                              "waiting for one of the tenant's page_ins_per_tenant turns (state=waiting).", ["tenant", "state"], registry=r)
        self.snapshot_bytes = Gauge("mora_adapter_snapshot_bytes", "Disk used by validated adapter snapshots.", registry=r)
        self.gc_frozen = Gauge("mora_gc_frozen_objects", "Objects of the server process that start-up moved out of the "
                               "cyclic GC's reach (gc.freeze), so that no full collection rescans them.", registry=r)
        self.gc_frozen.set_function(gc.get_freeze_count)
        self._tier_counts: dict[str, int] = {}

    def record_tiers(self, stats: TierReport) -> None:
        """The engine's cumulative cache counters (exported as deltas) and its recent load durations."""
        for name, value in stats.counts.items():
            delta = int(value) - self._tier_counts.get(name, 0)
            self._tier_counts[name] = int(value)
            if delta <= 0:
                continue
            cache, _, what = name.partition("_")
            metric = {"hits": self.cache_hits, "misses": self.cache_misses, "evictions": self.evictions}.get(what)
            if metric is not None:
                metric.labels(cache).inc(delta)
        for tier, seconds in stats.loads:
            self.adapter_load.labels(str(tier)).observe(float(seconds))

    def labels(self, adapter_id: str | None, tenant: str, owner: str | None = None) -> tuple[str, str]:
        """(adapter, tenant) label values of a request by `tenant` for `adapter_id` (None: the base
        model; UNKNOWN: an id it may not use), owned by `owner`."""
        if adapter_id is None:
            adapter = BASE
        elif adapter_id == UNKNOWN:
            adapter = UNKNOWN
        else:
            adapter = self.adapter_label(adapter_id, owner)
        return adapter, self.tenant_label(tenant)

    def record_operation(self, operation: str, result: str, seconds: float, *, trigger: str | None = None, adapter: str | None = None,
                         owner: str | None = None, stall: float | None = None) -> None:
        self.operations.labels(operation, result).inc()
        if stall is not None:
            self.merge_stall.set(stall)
        if operation == "lazy_load" and result == "ok":
            self.adapter_load.labels("source").observe(seconds)
        self.operation_duration.labels(operation).observe(seconds)
        if operation in ("merge", "unmerge") and result == "ok" and adapter is not None:
            self.merge_transitions.labels(self.adapter_label(adapter, owner), operation, trigger or "manual").inc()

    def set_page_ins(self, counts: dict[str, list[int]]) -> None:
        """`{tenant: [reading, waiting]}` from the registry."""
        for tenant, (reading, waiting) in counts.items():
            self.page_ins.labels(tenant, "reading").set(reading)
            self.page_ins.labels(tenant, "waiting").set(waiting)

    def set_residency(self, states: dict[str, tuple[str, str | None]]) -> None:
        """`{adapter id: (state, owner)}` for every loaded adapter; removed adapters lose their series."""
        current = {self.adapter_label(a, owner): s for a, (s, owner) in states.items()}
        for adapter in self._residency_series - set(current):
            for state in RESIDENCY_STATES:
                self.residency.remove(adapter, state)
        for adapter, state in current.items():
            for s in RESIDENCY_STATES:
                self.residency.labels(adapter, s).set(1 if s == state else 0)
        self._residency_series = set(current)

    def serve(self, port: int, host: str, **access: Any) -> MetricsServer:
        """Serve `/metrics` on `host:port`; `access`: MetricsServer's token and TLS options."""
        server = MetricsServer(self.registry, host, port, **access)
        server.start()
        return server
