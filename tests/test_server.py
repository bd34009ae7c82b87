"""The gRPC server on loopback with the real vLLM engine: every RPC, tenants, errors, hot swap."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from engine_helpers import assert_greedy_matches, hf_greedy_scored, random_lora, random_mora
from safetensors.torch import save_file
from server_helpers import ServerProcess, metric_value, write_tenants

from serve.grpc.proto import adapters_pb2 as apb
from serve.grpc.proto import inference_pb2 as ipb

pytestmark = pytest.mark.vllm
DEMO = ["atlas", "borealis", "cygnus", "draco"]


@pytest.fixture(scope="module")
def root(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter root: demo adapters, random ones, a LoRA, and malformed ones."""
    base = demo_assets / "base"
    top = tmp_path_factory.mktemp("server")
    root = top / "adapters"
    root.mkdir()
    for name in DEMO:
        shutil.copytree(demo_assets / "adapters" / name, root / name)
    random_mora(base, root / "rand-t1", mora_type=1, r=4, seed=31, scale=0.08)
    random_mora(base, root / "rand-t6", mora_type=6, r=8, seed=32, scale=0.08)
    random_mora(base, root / "hot-a", mora_type=6, r=4, seed=41, scale=0.1)
    random_mora(base, root / "hot-b", mora_type=6, r=4, seed=42, scale=0.1)
    random_lora(base, root / "plain-lora", seed=5)
    # malformed
    random_mora(base, root / "wrong-n", mora_type=1, r=4)
    cfg = json.loads((root / "wrong-n" / "adapter_config.json").read_text())
    (root / "wrong-n" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8}))
    nan = random_mora(base, root / "nan", mora_type=6, r=4)
    tensors = {f"base_model.model.{m}.lora_A.weight": w.clone() for m, w in nan.weights.items()}
    next(iter(tensors.values()))[1, 1] = float("nan")
    save_file(tensors, str(root / "nan" / "adapter_model.safetensors"))
    shutil.copytree(root / "atlas", root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x13" * 64)
    shutil.copytree(root / "atlas", root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").unlink()
    with open(root / "pickled" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": threading.Lock}, f)
    shutil.copytree(root / "atlas", root / "bad-config")
    (root / "bad-config" / "adapter_config.json").write_text(json.dumps(cfg | {"use_mora": True, "mora_type": 5}))
    # hostile tensors and configs: integer dtype, a non-square M, a header claiming a 1e10-element
    # tensor (refused before anything is read), fields of the wrong type
    for name, mutate in (("int-dtype", lambda w: w.to(torch.int32)), ("not-square", lambda w: torch.cat([w, w[:1]]))):
        shutil.copytree(root / "nan", root / name)
        save_file({f"base_model.model.{m}.lora_A.weight": mutate(w) for m, w in nan.weights.items()}, str(root / name / "adapter_model.safetensors"))
    shutil.copytree(root / "nan", root / "huge")
    header = json.dumps({"base_model.model.x.lora_A.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}).encode()
    (root / "huge" / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    shutil.copytree(root / "atlas", root / "config-types")
    (root / "config-types" / "adapter_config.json").write_text(json.dumps(cfg | {"r": "eight", "target_modules": 7}))
    outside = top / "outside"
    shutil.copytree(demo_assets / "adapters" / "atlas", outside)
    os.symlink(outside, root / "escape")
    return root


@pytest.fixture(scope="module")
def server(demo_assets: Path, root: Path, tmp_path_factory: pytest.TempPathFactory):
    top = root.parent
    keys = write_tenants(top / "tenants.json", {
        "acme": {"adapters": ["atlas", "rand-t1", "rand-t6", "hot"], "max_resident_adapters": 5},
        "globex": {"adapters": ["borealis"]},
        "initech": {"adapters": ["cygnus", "draco"]},
        "limited": {"allow_base_model": False, "max_concurrent_requests": 1, "adapters": ["lim"], "max_resident_adapters": 1,
                    "manage_adapters": True},
        "ops": {"role": "admin"},
    })
    srv = ServerProcess(demo_assets / "base", root, top / "server.log", args=[
        "--tenants", str(top / "tenants.json"), "--no-auto-merge", "--max-loras", "4", "--max-cpu-loras", "12",
        "--preload", *[f"{a}={a}" for a in DEMO],
    ], env={"MORA_SERVE_UNLOAD_TIMEOUT_S": "3", "MORA_SERVE_MERGE_WAIT_S": "0.5"}, holdable=True)
    srv.wait_serving()
    srv.keys = keys
    yield srv
    assert srv.stop() == 0


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


@pytest.fixture(scope="module")
def clients(server):
    cs = {name: server.client(key) for name, key in server.keys.items()}
    yield cs
    for c in cs.values():
        c.close()


OWNER = {"atlas": "acme", "borealis": "globex", "cygnus": "initech", "draco": "initech"}


def test_every_demo_fact_concurrently_and_streaming_equals_unary(clients, demo_facts):
    jobs = [(a, f) for a in DEMO for f in demo_facts[a]]

    def unary(job):
        a, f = job
        return clients[OWNER[a]].generate(f["prompt"], a, max_tokens=48, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(unary, jobs))
    for (a, f), r in zip(jobs, results, strict=True):
        assert r.text == f["completion"], a
        assert r.finish_reason == ipb.FINISH_REASON_STOP and r.usage.completion_tokens == len(r.token_ids) > 0
        assert r.adapter_id == a
    a, f = jobs[5]
    pieces = list(clients[OWNER[a]].stream(f["prompt"], a, max_tokens=48, temperature=0))
    assert len(pieces) > 3
    assert "".join(p.text for p in pieces) == results[5].text
    assert [t for p in pieces for t in p.token_ids] == list(results[5].token_ids)
    assert all(p.finish_reason == ipb.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])
    assert pieces[-1].finish_reason == ipb.FINISH_REASON_STOP and pieces[-1].usage == results[5].usage


def test_random_adapters_equal_transformers_reference(clients, demo_assets, root):
    ops, acme = clients["ops"], clients["acme"]
    for name in ("rand-t1", "rand-t6"):
        ops.load_adapter(name, name)
    jobs = [("hello world", "rand-t1"), ("MoRA serves", "rand-t6"), ("hello world", "rand-t6"), ("abc", "atlas")]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: list(acme.generate(j[0], j[1], max_tokens=8, temperature=0, ignore_eos=True).token_ids), jobs))
    want = hf_greedy_scored(demo_assets / "base", {n: root / n for n in ("rand-t1", "rand-t6", "atlas")}, jobs, 8)
    assert_greedy_matches(got, want)


def test_adapter_rpcs(clients, demo_facts):
    ops, acme = clients["ops"], clients["acme"]
    info = ops.get_adapter("borealis")
    assert info.kind == apb.ADAPTER_KIND_MORA and info.mora_type == 6 and info.rank == 8 and info.parameters > 0
    assert info.tenant == "globex" and info.merge_control == apb.MERGE_CONTROL_AUTOMATIC and not info.merged
    assert info.location in (apb.ADAPTER_LOCATION_DEVICE_SLOT, apb.ADAPTER_LOCATION_HOST_CACHE)
    assert {a.adapter_id for a in ops.list_adapters()} >= set(DEMO)
    assert {a.adapter_id for a in acme.list_adapters()} <= {"atlas", "rand-t1", "rand-t6", "hot"}
    fact = demo_facts["borealis"][0]
    merged = ops.merge_adapter("borealis")
    assert merged.adapter.merged and merged.adapter.merge_control == apb.MERGE_CONTROL_MANUAL
    assert clients["globex"].generate(fact["prompt"], "borealis", max_tokens=48, temperature=0).text == fact["completion"]
    assert clients["acme"].generate(demo_facts["atlas"][0]["prompt"], "atlas", max_tokens=48, temperature=0).text == demo_facts["atlas"][0]["completion"]
    un = ops.unmerge_adapter("borealis", automatic=True)
    assert not un.adapter.merged and un.adapter.merge_control == apb.MERGE_CONTROL_AUTOMATIC
    loaded = ops.load_adapter("extra", "cygnus", tenant="initech")
    assert loaded.tenant == "initech" and loaded.version == 1  # versions count per adapter id
    assert ops.get_adapter("borealis").version == 1  # other ids' loads do not move it
    assert clients["initech"].generate(demo_facts["cygnus"][0]["prompt"], "extra", max_tokens=48, temperature=0).text == demo_facts["cygnus"][0]["completion"]
    gone = ops.unload_adapter("extra")
    assert gone.adapter_id == "extra"
    assert _code(lambda: ops.get_adapter("extra")) == grpc.StatusCode.NOT_FOUND
    assert ops.load_adapter("extra", "cygnus", tenant="initech").version == 2  # never reused for the same id
    ops.unload_adapter("extra")


def _merge_or_refused(ops, adapter: str) -> None:
    """A merge under other adapters' traffic is swapped in only if their requests drain within
    merge_wait_s (a merged adapter runs alone); otherwise it is refused, saying why."""
    try:
        ops.merge_adapter(adapter)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "other adapters" in e.details(), e.details()


def test_lifecycle_during_traffic_never_fails_or_lies(clients, demo_facts):
    ops = clients["ops"]
    stop = threading.Event()
    errors, wrong, done = [], [], [0]

    def traffic(adapter):
        c = clients[OWNER[adapter]]
        i = 0
        while not stop.is_set():
            f = demo_facts[adapter][i % len(demo_facts[adapter])]
            i += 1
            try:
                text = c.generate(f["prompt"], adapter, max_tokens=48, temperature=0).text
            except grpc.RpcError as e:
                errors.append((adapter, e.code(), e.details()))
                continue
            done[0] += 1
            if text != f["completion"]:
                wrong.append((adapter, f["prompt"], text))

    threads = [threading.Thread(target=traffic, args=(a,)) for a in ("atlas", "borealis", "cygnus")]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            _merge_or_refused(ops, "atlas")
            time.sleep(0.5)
            ops.unmerge_adapter("atlas", automatic=True)
            ops.load_adapter("churn", "draco", tenant="initech")
            _merge_or_refused(ops, "borealis")
            time.sleep(0.5)
            ops.load_adapter("churn", "cygnus", replace=True)
            ops.unmerge_adapter("borealis", automatic=True)
            ops.unload_adapter("churn")
        deadline = time.monotonic() + 60
        while done[0] < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and not wrong and done[0] > 10


def test_replace_serves_new_weights_and_finishes_old_streams(clients, demo_assets, root):
    ops, acme = clients["ops"], clients["acme"]
    ops.load_adapter("hot", "hot-a")
    old_stream = acme.stream("hello world", "hot", max_tokens=12, temperature=0, ignore_eos=True)
    first = next(old_stream)  # admitted on version A
    reply = ops.load_adapter("hot", "hot-b", replace=True)
    assert reply.version == 2  # the second version of the id "hot"
    new = list(acme.generate("hello world", "hot", max_tokens=8, temperature=0, ignore_eos=True).token_ids)
    old = list(first.token_ids) + [t for p in old_stream for t in p.token_ids]
    ref = hf_greedy_scored(demo_assets / "base", {"a": root / "hot-a", "b": root / "hot-b"}, [("hello world", "a"), ("hello world", "b")], 12)
    assert_greedy_matches([old, new], [ref[0], (ref[1][0][:8], ref[1][1][:8])])
    ops.unload_adapter("hot")


def test_tenant_isolation(server, clients, demo_facts):
    acme = clients["acme"]
    fact = demo_facts["borealis"][0]
    # another tenant's adapter answers exactly like an absent one (test_security.py has more)
    assert _code(lambda: acme.generate(fact["prompt"], "borealis", max_tokens=4)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: acme.get_adapter("borealis")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: acme.load_adapter("mine", "atlas")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: acme.merge_adapter("atlas")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: acme.unload_adapter("borealis")) == grpc.StatusCode.PERMISSION_DENIED
    with server.client(None) as anon:
        assert _code(lambda: anon.generate("x", "atlas")) == grpc.StatusCode.UNAUTHENTICATED
    with server.client("not-a-key") as bad:
        assert _code(lambda: bad.list_adapters()) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: clients["limited"].generate("x", "")) == grpc.StatusCode.PERMISSION_DENIED
    e = pytest.raises(grpc.RpcError, lambda: acme.generate(fact["prompt"], "borealis"))
    assert "borealis" in e.value.details() and "globex" not in e.value.details()


@pytest.mark.parametrize(("path", "code", "message"), [
    ("wrong-n", grpc.StatusCode.INVALID_ARGUMENT, "expected"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    ("corrupt", grpc.StatusCode.INVALID_ARGUMENT, "unreadable"),
    ("pickled", grpc.StatusCode.INVALID_ARGUMENT, "adapter_model.bin"),
    ("bad-config", grpc.StatusCode.INVALID_ARGUMENT, "mora_type"),
    ("int-dtype", grpc.StatusCode.INVALID_ARGUMENT, "not floating point"),
    ("not-square", grpc.StatusCode.INVALID_ARGUMENT, "not square"),
    ("huge", grpc.StatusCode.INVALID_ARGUMENT, "implausibly large"),
    ("config-types", grpc.StatusCode.INVALID_ARGUMENT, "r: Input should be a valid integer"),
    ("does-not-exist", grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
    ("../adapters/atlas/..", grpc.StatusCode.PERMISSION_DENIED, "leaves the adapter root"),
    ("/etc", grpc.StatusCode.PERMISSION_DENIED, "relative"),
    ("escape", grpc.StatusCode.PERMISSION_DENIED, "outside the adapter root"),
])
def test_bad_adapters_are_refused_and_serving_continues(clients, demo_facts, path, code, message):
    ops = clients["ops"]
    with pytest.raises(grpc.RpcError) as e:
        ops.load_adapter("candidate", path)
    assert e.value.code() == code and message in e.value.details()
    fact = demo_facts["draco"][0]
    assert clients["initech"].generate(fact["prompt"], "draco", max_tokens=48, temperature=0).text == fact["completion"]


def test_request_errors(server, clients):
    acme, ops = clients["acme"], clients["ops"]
    assert _code(lambda: acme.generate("x", "nope")) == grpc.StatusCode.NOT_FOUND
    for bad in ({"temperature": -1.0}, {"top_p": 2.0}, {"temperature": float("nan")}, {"top_k": -5}, {"min_tokens": 50, "max_tokens": 5}):
        assert _code(lambda bad=bad: acme.generate("hello", "atlas", **bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert _code(lambda: acme.generate("x" * 600, "atlas")) == grpc.StatusCode.INVALID_ARGUMENT  # over the 512 context
    assert _code(lambda: acme.generate([5, 400000], "atlas")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: acme.inference.Generate(ipb.GenerateRequest(adapter_id="atlas"), metadata=acme.metadata)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: ops.load_adapter("a/b", "atlas")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: ops.load_adapter("x" * 300, "atlas")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: ops.load_adapter("atlas", "atlas")) == grpc.StatusCode.ALREADY_EXISTS
    ops.load_adapter("plain", "plain-lora", tenant="acme")
    assert acme.generate("hello", "plain", max_tokens=4, temperature=0).usage.completion_tokens == 4
    assert _code(lambda: ops.merge_adapter("plain")) == grpc.StatusCode.FAILED_PRECONDITION
    ops.unload_adapter("plain")
    scrape = server.scrape()
    assert metric_value(scrape, "mora_requests_total", adapter="unknown", code="NOT_FOUND") >= 1  # unloaded ids are no labels
    assert metric_value(scrape, "mora_adapter_operations_total", operation="load", result="invalid") >= 1


def test_limits(server, clients):
    limited, ops = clients["limited"], clients["ops"]
    ops.load_adapter("lim", "atlas")
    server.hold()  # the engine freezes at the stream's first token: it stays in flight, whatever the speed
    try:
        stream = limited.stream("hello", "lim", max_tokens=300, ignore_eos=True)
        next(stream)
        assert _code(lambda: limited.generate("hello", "lim", max_tokens=2)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream.cancel()
    finally:
        server.release()
    assert _code(lambda: ops.load_adapter("lim2", "atlas", tenant="limited")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    ops.unload_adapter("lim")


def _running(server) -> float:
    return metric_value(server.scrape(), "vllm:num_requests_running")


def _wait_idle(server, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _running(server) == 0:
            return True
        time.sleep(0.3)
    return False


def _wait(predicate, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout  # guards a broken server only: the events are deterministic
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cancel_and_deadline_abort_the_engine_request(server, clients):
    acme = clients["acme"]
    assert _wait_idle(server)
    req = acme.request("hello", "atlas", max_tokens=400, ignore_eos=True)
    # Frozen at its first token, the request cannot finish before its deadline on any machine.
    aborts = server.aborts()
    server.hold()
    try:
        with pytest.raises(grpc.RpcError) as e:
            acme.inference.Generate(req, metadata=acme.metadata, timeout=0.8)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait(lambda: server.aborts() > aborts), "a request past its deadline must be aborted in the engine"
    finally:
        server.release()
    assert _wait_idle(server), "a request past its deadline must be aborted in the engine"
    aborts = server.aborts()
    server.hold()
    try:
        stream = acme.inference.GenerateStream(req, metadata=acme.metadata)
        next(stream)
        stream.cancel()
        assert _wait(lambda: server.aborts() > aborts), "a cancelled stream must be aborted in the engine"
    finally:
        server.release()
    assert _wait_idle(server), "a cancelled stream must be aborted in the engine"


def test_unload_waits_for_requests_or_refuses(server, clients):
    ops, acme = clients["ops"], clients["acme"]
    ops.load_adapter("busy", "atlas", tenant="acme")
    server.hold()
    try:
        stream = acme.stream("hello", "busy", max_tokens=200, ignore_eos=True)
        first = next(stream)  # the engine is frozen now: the request is in flight until release()
        t = time.monotonic()
        assert _code(lambda: ops.unload_adapter("busy")) == grpc.StatusCode.FAILED_PRECONDITION
        assert time.monotonic() - t >= 2.5  # waited (bounded) before refusing
    finally:
        server.release()
    tokens = len(first.token_ids) + sum(len(p.token_ids) for p in stream)  # never broken
    assert tokens == 200
    ops.unload_adapter("busy")  # nothing in flight now
    assert _code(lambda: acme.generate("hello", "busy")) == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert health_pb2.HealthCheckResponse.NOT_SERVING in server.health_seen or server.health_seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
    assert {"mora.v1.Inference", "mora.v1.Adapters", "grpc.health.v1.Health"} <= names
