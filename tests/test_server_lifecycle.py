"""Server lifecycle: health while starting, automatic merging, SIGTERM draining, engine death."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from server_helpers import ServerProcess, metric_value

from serve.client import RETRY_SERVICE_CONFIG
from serve.grpc.proto import inference_pb2 as ipb

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("lifecycle")
    shutil.copytree(demo_assets / "adapters", top / "adapters")
    (top / "tmp").mkdir()
    srv = ServerProcess(demo_assets / "base", top / "adapters", top / "server.log",
                        args=["--preload", "atlas=atlas", "borealis=borealis", "cygnus=cygnus", "--shutdown-grace-s", "30"],
                        env={"MORA_SERVE_MERGE_WINDOW_S": "3", "MORA_SERVE_MERGE_MIN_REQUESTS": "6",
                             "MORA_SERVE_MERGE_MIN_DWELL_S": "1", "MORA_SERVE_POLICY_INTERVAL_S": "0.2",
                             "TMPDIR": str(top / "tmp")}, holdable=True,
                        hold_start=True)
    # The engine's start is held (tests/held_server.py): the server is up and NOT_SERVING, whatever
    # the machine's speed. A base-model call then is refused with UNAVAILABLE; the client's gRPC retry
    # policy must have tried it maxAttempts times, each counted by the server.
    srv.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    with srv.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("hello", "", max_tokens=2)
    srv.refused_while_starting = (e.value.code(), metric_value(srv.scrape(), "mora_requests_total", code="UNAVAILABLE"))
    srv.release_start()
    srv.wait_serving()
    srv.tmp = top / "tmp"
    yield srv
    srv.stop()


def test_not_serving_until_the_engine_is_warm(server):
    assert server.health_seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING
    code, attempts = server.refused_while_starting
    assert code == grpc.StatusCode.UNAVAILABLE
    assert attempts == RETRY_SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"], "the client retries UNAVAILABLE"
    assert server.health_seen[-1] == health_pb2.HealthCheckResponse.SERVING
    assert metric_value(server.scrape(), "mora_engine_up") == 1


def _wait(predicate, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_automatic_merge_and_unmerge_for_other_requests(server, demo_facts):
    with server.client() as c:
        fact = demo_facts["atlas"][0]
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda _: c.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text, range(12)))
        assert set(texts) == {fact["completion"]}
        assert _wait(lambda: c.get_adapter("atlas").merged), "a single-tenant burst must merge its adapter"
        assert c.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
        # one request of another adapter unmerges it first (a merged adapter runs alone), and gets
        # exactly its unmerged answer
        other = demo_facts["borealis"][0]
        assert c.generate(other["prompt"], "borealis", max_tokens=48, temperature=0).text == other["completion"]
        assert not c.get_adapter("atlas").merged, "another adapter's request must unmerge first"
        jobs = [(a, f) for a in ("borealis", "cygnus") for f in demo_facts[a]] * 2
        with ThreadPoolExecutor(4) as pool:
            out = list(pool.map(lambda j: c.generate(j[1]["prompt"], j[0], max_tokens=48, temperature=0).text, jobs))
        assert out == [j[1]["completion"] for j in jobs]
        assert not c.get_adapter("atlas").merged, "mixed traffic never merges"
        scrape = server.scrape()
        assert metric_value(scrape, "mora_merge_transitions_total", adapter="atlas", direction="merge", trigger="auto") >= 1
        assert metric_value(scrape, "mora_merge_transitions_total", adapter="atlas", direction="unmerge", trigger="isolation") >= 1


def test_policy_never_merges_an_adapter_that_would_break_others(server, demo_facts):
    """An adapter 1000x normal (loadable, not mergeable: docs/security.md) gets all the traffic:
    the policy leaves it unmerged; the next adapter's burst is merged (the policy is running)."""
    from safetensors.torch import load_file, save_file

    root = Path(server.command[server.command.index("--adapter-root") + 1])
    shutil.copytree(root / "atlas", root / "huge")
    f = root / "huge" / "adapter_model.safetensors"
    save_file({k: v * 1000 for k, v in load_file(str(f)).items()}, str(f))
    with server.client() as c:
        c.load_adapter("huge", "huge")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: c.generate("hello", "huge", max_tokens=2), range(12)))
        time.sleep(3.5)  # the whole merge window passes with only "huge" in it
        assert not c.get_adapter("huge").merged
        fact = demo_facts["cygnus"][0]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: c.generate(fact["prompt"], "cygnus", max_tokens=4), range(12)))
        assert _wait(lambda: c.get_adapter("cygnus").merged), "the policy still merges an eligible adapter"
        assert metric_value(server.scrape(), "mora_merge_transitions_total", adapter="huge", direction="merge") == 0
        c.unmerge_adapter("cygnus", automatic=True)
        c.unload_adapter("huge")


def test_engine_ipc_sockets_in_a_private_folder(server):
    folders = list(server.tmp.glob("mora-ipc-*"))
    assert len(folders) == 1 and (folders[0].stat().st_mode & 0o777) == 0o700
    assert any(p.is_socket() for p in folders[0].iterdir()), "vLLM's sockets are in the folder"
    assert not [p for p in server.tmp.iterdir() if p.is_socket()], "none in the temp folder itself"


def test_sigterm_drains_in_flight_requests(server):
    results, errors = [], []

    def long_stream():
        with server.client() as c:
            try:
                pieces = list(c.stream("drain me", "borealis", max_tokens=150, ignore_eos=True, temperature=0))
                results.append(pieces[-1])
            except grpc.RpcError as e:
                errors.append(e.code())

    # The engine freezes at the first token of the first stream: all three stay in flight until
    # release(), however fast the machine.
    server.hold()
    threads = [threading.Thread(target=long_stream) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert _wait(lambda: metric_value(server.scrape(), "mora_requests_in_flight") == 3, timeout=120)
        server.wait_held()
        server.proc.send_signal(signal.SIGTERM)
        assert _wait(lambda: server.health() != health_pb2.HealthCheckResponse.SERVING, timeout=30)
        with server.client() as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate("too late", "atlas", max_tokens=4)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert metric_value(server.scrape(), "mora_requests_in_flight") == 3, "draining: the three are still running"
    finally:
        server.release()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and all(r.finish_reason == ipb.FINISH_REASON_LENGTH and r.usage.completion_tokens == 150 for r in results)
    assert server.proc.wait(timeout=60) == 0
    # vLLM's IPC sockets lived in the server's private folder, removed at shutdown
    assert not [p for p in server.tmp.rglob("*") if p.is_socket() or p.name.startswith("mora-ipc-")]

