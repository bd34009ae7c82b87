"""Prometheus metrics of a live server: exact counts per adapter, codes, lifecycle, cardinality cap,
and every metric the dashboard and alerts use really exists."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from server_helpers import ServerProcess, metric_value

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parent.parent
LIMIT = 4


@pytest.fixture(scope="module")
def server(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("metrics")
    shutil.copytree(demo_assets / "adapters", top / "adapters")
    srv = ServerProcess(demo_assets / "base", top / "adapters", top / "server.log", args=[
        "--preload", "atlas=atlas", "borealis=borealis", "cygnus=cygnus", "draco=draco", "--no-auto-merge", "--max-cpu-loras", "12",
    ], env={"MORA_SERVE_METRICS_LABEL_LIMIT": str(LIMIT)})
    srv.wait_serving()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def traffic(server, demo_facts):
    """A known mix of requests, sent once; returns what was sent."""
    sent = {"atlas": [], "borealis": []}
    with server.client() as c:
        with ThreadPoolExecutor(4) as pool:
            sent["atlas"] = list(pool.map(lambda f: c.generate(f["prompt"], "atlas", max_tokens=48, temperature=0), demo_facts["atlas"][:3]))
        for f in demo_facts["borealis"][:2]:
            pieces = list(c.stream(f["prompt"], "borealis", max_tokens=48, temperature=0))
            sent["borealis"].append(pieces[-1])
        c.generate("hello", "", max_tokens=3)
        for bad in (lambda: c.generate("x", "nope"), lambda: c.generate("x", "atlas", temperature=-2.0)):
            with pytest.raises(grpc.RpcError):
                bad()
        for i in range(3):  # more adapters than the label cap
            c.load_adapter(f"copy{i}", "cygnus")
            c.generate("hello", f"copy{i}", max_tokens=2)
        c.merge_adapter("atlas")
        c.unmerge_adapter("atlas", automatic=True)
    return sent


def test_counts_per_adapter_equal_what_was_sent(server, traffic):
    s = server.scrape()
    assert metric_value(s, "mora_requests_total", adapter="atlas", method="Generate", code="OK") == 3
    assert metric_value(s, "mora_requests_total", adapter="borealis", method="GenerateStream", code="OK") == 2
    assert metric_value(s, "mora_requests_total", adapter="atlas", code="INVALID_ARGUMENT") == 1
    for adapter, n in (("atlas", 3), ("borealis", 2)):
        assert metric_value(s, "mora_request_duration_seconds_count", adapter=adapter, code="OK") == n, adapter
        for hist in ("mora_time_to_first_token_seconds", "mora_queue_wait_seconds"):
            assert metric_value(s, f"{hist}_count", adapter=adapter) == n, (hist, adapter)
        gen = sum(r.usage.completion_tokens for r in traffic[adapter])
        prompt = sum(r.usage.prompt_tokens for r in traffic[adapter])
        assert metric_value(s, "mora_generation_tokens_total", adapter=adapter) == gen
        assert metric_value(s, "mora_prompt_tokens_total", adapter=adapter) == prompt
        # inter-token latency: one per token after each request's first; time per output token: one per request
        assert metric_value(s, "mora_inter_token_latency_seconds_count", adapter=adapter) == gen - n
        assert metric_value(s, "mora_time_per_output_token_seconds_count", adapter=adapter) == n
    # an id the caller may not use, or that is not loaded, is counted as `unknown`: never its own label
    assert metric_value(s, "mora_requests_total", code="NOT_FOUND", adapter="unknown") == 1
    assert 'adapter="nope"' not in s
    # end-to-end latency for every outcome, labelled by its code, as many as the requests counted
    assert metric_value(s, "mora_request_duration_seconds_count", adapter="atlas", code="INVALID_ARGUMENT") == 1
    for line in s.splitlines():
        m = re.match(r'mora_requests_total\{([^}]*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            assert metric_value(s, "mora_request_duration_seconds_count", adapter=labels["adapter"], tenant=labels["tenant"],
                                code=labels["code"]) >= float(m.group(2)) > 0, labels


def test_buckets_reach_long_requests_and_model_name_is_a_name(server, traffic):
    s = server.scrape()

    def top(name: str) -> float:
        return max(float(v) for v in re.findall(rf'^{name}_bucket{{[^}}]*le="([0-9.e+]+)"', s, flags=re.M))

    assert top("mora_time_to_first_token_seconds") >= 600  # long prompts behind a full batch
    assert top("mora_request_duration_seconds") >= 3600  # long generations
    assert top("mora_inter_token_latency_seconds") >= 10
    names = set(re.findall(r'^vllm:[a-z_:]+\{[^}]*model_name="([^"]*)"', s, flags=re.M))
    assert names == {"base"}, names  # the served name (the model directory's name), never its path


def test_lifecycle_is_counted(server, traffic):
    s = server.scrape()
    assert metric_value(s, "mora_adapter_operations_total", operation="load", result="ok") == 4 + 3
    assert metric_value(s, "mora_adapter_operations_total", operation="merge", result="ok") == 1
    assert metric_value(s, "mora_adapter_operations_total", operation="unmerge", result="ok") == 1
    assert metric_value(s, "mora_merge_transitions_total", adapter="atlas", direction="merge", trigger="manual") == 1
    assert metric_value(s, "mora_adapter_operation_duration_seconds_count", operation="load") == 7
    assert metric_value(s, "mora_adapters_loaded") == 7
    assert metric_value(s, "mora_adapter_slots_capacity") == 4
    assert 0 < metric_value(s, "mora_adapter_slots_in_use") <= 4
    assert metric_value(s, "mora_engine_up") == 1


def test_cardinality_cap(server, traffic):
    s = server.scrape()
    adapters = set(re.findall(r'^mora_[a-z_]+\{[^}]*adapter="([^"]+)"', s, flags=re.M))
    assert "other" in adapters
    # one owner here (an open server): one share of LIMIT values; base/unknown/other are reserved series
    assert len(adapters - {"other", "base", "unknown"}) <= LIMIT


def test_start_up_heap_is_frozen(server, traffic):
    """What start-up built (torch, vLLM, the engine client) is out of the cyclic GC's reach:
    left in, every full collection rescanned ~700k objects, a ~0.5 s stall of the event loop
    that serves every tenant, and more often the more adapters traffic touches."""
    assert metric_value(server.scrape(), "mora_gc_frozen_objects") > 100_000


def test_router_metric_is_exported(server, traffic):
    s = server.scrape()
    lines = [ln for ln in s.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert lines and all('max_lora="4"' in ln and "running_lora_adapters=" in ln and "waiting_lora_adapters=" in ln for ln in lines)


def _names(expr: str) -> set[str]:
    words = set(re.findall(r"(?<![\w:\"$])((?:mora_|vllm:|process_)[A-Za-z0-9_:]+)", expr))
    return words


def _exported(scrape: str) -> set[str]:
    names = set()
    for line in scrape.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_and_alerts_use_only_exported_metrics(server, traffic):
    exported = _exported(server.scrape())
    dashboard = json.loads((REPO / "deploy" / "monitoring" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    rules = yaml.safe_load((REPO / "deploy" / "monitoring" / "prometheus-rules.yaml").read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    used = set().union(*(_names(e) for e in exprs))
    assert len(used) >= 12
    missing = sorted(u for u in used if u not in exported)
    assert not missing, f"dashboard/alerts use metrics the server does not export: {missing}"
