"""A hostile tenant against a live server serving in bfloat16 (docs/security.md, "Guarantees at
the edge"): three victim tenants' greedy answers (their adapters and the base model) are recorded
first and compared token for token after each attack, and during merges. Pre-authentication
attacks send no key; memory bounds are the server process's RSS growth, never timings; requests
that must stay in flight are held by tests/held_server.py."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_helpers import ServerProcess, metric_value, write_tenants

from mora.checkpoint import load_adapter
from mora.containment import base_weight_norms, merge_ratio_limit
from mora.hf import module_shapes_from_config
from mora.kinds import bind_adapter, check_update
from serve.grpc.proto import inference_pb2 as ipb

pytestmark = pytest.mark.vllm
VICTIMS = {"acme": "atlas", "globex": "borealis", "initech": "cygnus"}
LABEL_LIMIT = 4
MiB = 1 << 20


def _scale_to_merge_limit(src: Path, dst: Path, base: Path, share: float) -> None:
    """`src` with its M's scaled so its largest update/base ratio is `share` of bfloat16's merge
    limit (the adapter the merge criterion lets through with the least margin)."""
    adapter = load_adapter(src)
    bound = bind_adapter(adapter, module_shapes_from_config(base))
    report = check_update(adapter, bound.specs, base_weight_norms(base, list(adapter.weights)), torch.bfloat16)
    factor = share * merge_ratio_limit(torch.bfloat16) / report.worst[1]
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    save_file({k: (v.double() * factor).to(v.dtype) for k, v in load_file(str(f)).items()}, str(f))


@pytest.fixture(scope="module")
def srv(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("hostile")
    root = top / "adapters"
    demo = demo_assets / "adapters"
    for tenant, adapter in VICTIMS.items():
        shutil.copytree(demo / adapter, root / tenant / adapter)
    mine = root / "mallory"
    mine.mkdir(parents=True)
    base = demo_assets / "base"
    _scale_to_merge_limit(demo / "atlas", mine / "edge1", base, 0.99)  # type 1
    _scale_to_merge_limit(demo / "draco", mine / "edge4", base, 0.99)  # type 4
    _scale_to_merge_limit(demo / "draco", mine / "mild4", base, 0.05)
    shutil.copytree(demo / "draco", mine / "plain")
    # another tenant's weights, hard-linked into mallory's folder (its own config beside them)
    (mine / "linked").mkdir()
    shutil.copy(demo / "borealis" / "adapter_config.json", mine / "linked" / "adapter_config.json")
    os.link(root / "globex" / "borealis" / "adapter_model.safetensors", mine / "linked" / "adapter_model.safetensors")
    # a NaN in a MoRA matrix (both stored copies), and MoRA configs with a NaN or a huge lora_alpha
    shutil.copytree(demo / "draco", mine / "nan")
    f = mine / "nan" / "adapter_model.safetensors"
    t = load_file(str(f))
    for k in t:
        t[k][0, 0] = float("nan")
    save_file(t, str(f))
    for name, alpha in (("alpha-nan", "NaN"), ("alpha-1e30", "1e30")):
        shutil.copytree(demo / "draco", mine / name)
        cfg = mine / name / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_alpha": "__A__"}).replace('"__A__"', alpha))
    keys = write_tenants(top / "tenants.json", {
        "acme": {"adapters": ["atlas", "atlas2"]},
        "globex": {"adapters": ["borealis"], "allow_base_model": False},
        "initech": {"adapters": ["cygnus"], "allow_base_model": False},
        "mallory": {"manage_adapters": True, "max_concurrent_requests": 4, "max_resident_adapters": 12},
        "ops": {"role": "admin"},
    })
    token = top / "metrics-token"
    token.write_text("scrape-secret\n")
    s = ServerProcess(base, root, top / "server.log", args=[
        "--dtype", "bfloat16", "--tenants", str(top / "tenants.json"), "--max-loras", "4", "--max-cpu-loras", "16",
        "--preload", *[f"{a}={t}/{a}" for t, a in VICTIMS.items()], "--metrics-bearer-token-file", str(token),
    ], env={"MORA_SERVE_MERGE_MIN_REQUESTS": "4", "MORA_SERVE_MERGE_WINDOW_S": "5", "MORA_SERVE_MERGE_MIN_DWELL_S": "0",
            "MORA_SERVE_POLICY_INTERVAL_S": "0.2", "MORA_SERVE_METRICS_LABEL_LIMIT": str(LABEL_LIMIT),
            "MORA_SERVE_MERGE_WAIT_S": "2"}, holdable=True)
    s.wait_serving()
    s.keys, s.root, s.token = keys, root, "scrape-secret"
    yield s
    assert s.stop() == 0


def _victim_answers(srv, demo_facts) -> dict[tuple[str, int], list[int]]:
    """Greedy token ids of each victim's adapter (two prompts) and of the base model, one request at a time."""
    out = {}
    for tenant, adapter in VICTIMS.items():
        with srv.client(srv.keys[tenant]) as c:
            for i, fact in enumerate(demo_facts[adapter][:2]):
                out[(adapter, i)] = list(c.generate(fact["prompt"], adapter, max_tokens=24, temperature=0).token_ids)
    with srv.client(srv.keys["acme"]) as c:
        out[("base", 0)] = list(c.generate(demo_facts["draco"][0]["prompt"], "", max_tokens=24, temperature=0).token_ids)
    return out


@pytest.fixture(scope="module")
def before(srv, demo_facts):
    return _victim_answers(srv, demo_facts)


def _rss(srv) -> int:
    return psutil.Process(srv.proc.pid).memory_info().rss


def _fail(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def _raw_http(port: int, head: str, body: bytes | None = None, *, body_bytes: int = 0, chunked: bool = False,
              answer_first: bool = False, timeout: float = 60) -> tuple[int, dict, int]:
    """Send a request with a raw socket: `head` (request line and headers), then `body` or
    `body_bytes` zeros (chunked if asked), stopping as soon as the server answers. Returns
    (status, JSON body, body bytes sent). `answer_first`: the server must answer from the headers
    alone; nothing of the body is sent until it has (or until `timeout`, failing the test)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = 0
    try:
        sock.sendall(head.encode("latin-1") + b"\r\n")
        if answer_first:
            assert select.select([sock], [], [], timeout)[0], "the server waited for the body before answering"
        if body is not None:
            sock.sendall(body)
            sent = len(body)
        block = b"\0" * (1 << 16)
        while sent < body_bytes:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            piece = block[: min(len(block), body_bytes - sent)]
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        if chunked and sent >= body_bytes:
            sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        header, _, rest = data.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")), None)
        while length is not None and len(rest) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        return status, json.loads(rest) if rest.strip() else {}, sent
    finally:
        sock.close()


def _post(srv, path: str, payload: bytes, *, key: str | None = None, extra: str = "") -> tuple[int, dict]:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"{auth}{extra}")
    status, body, _ = _raw_http(srv.http_port, head, payload)
    return status, body


def test_unauthenticated_requests_cost_the_server_nothing(srv, before, demo_facts):
    """n = 2^32-1 or 2,000,000 without a key, over gRPC and HTTP, and a 200 MB body without a key:
    401/UNAUTHENTICATED before anything proportional is allocated or read."""
    rss = _rss(srv)
    generate = grpc.insecure_channel(srv.target).unary_unary(
        "/mora.v1.Inference/Generate", request_serializer=ipb.GenerateRequest.SerializeToString,
        response_deserializer=ipb.GenerateResponse.FromString)
    for n in (4294967295, 2_000_000):
        request = ipb.GenerateRequest(adapter_id="atlas", prompt="hi", sampling=ipb.SamplingParams(n=n, max_tokens=4))
        assert _fail(lambda r=request: generate(r, timeout=30)).code() == grpc.StatusCode.UNAUTHENTICATED
        status, body = _post(srv, "/v1/completions", json.dumps({"model": "atlas", "prompt": "hi", "n": n}).encode())
        assert status == 401 and body["error"]["type"] == "authentication_error", body
    status, body, sent = _raw_http(srv.http_port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   f"Content-Length: {200 * MiB}\r\n", body_bytes=200 * MiB, answer_first=True)
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED" and sent == 0
    # a tenant's own oversized n is refused from the count, before any result is allocated
    with srv.client(srv.keys["mallory"]) as c:
        e = _fail(lambda: c.generate("hi", "", max_tokens=4, n=4294967295))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be between 1 and 16" in e.details()
    status, body = _post(srv, "/v1/completions", json.dumps({"model": "atlas", "prompt": "hi", "n": 4294967295}).encode(),
                         key=srv.keys["mallory"])
    assert status == 400 and "n" in body["error"]["message"]
    assert _rss(srv) - rss < 64 * MiB
    assert metric_value(srv.scrape(srv.token), "mora_unauthenticated_requests_total") >= 5
    assert _victim_answers(srv, demo_facts) == before


def test_http_bodies_are_capped_while_they_stream_in(srv):
    """A body over the cap (16 MiB) is refused with 413 as soon as the cap is crossed, in OpenAI's
    error shape: declared (Content-Length) or streamed (chunked)."""
    key = srv.keys["mallory"]
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
    rss = _rss(srv)
    status, body, sent = _raw_http(srv.http_port, head + f"Content-Length: {40 * MiB}\r\n", body_bytes=40 * MiB,
                                   answer_first=True)
    assert status == 413 and body["error"]["type"] == "invalid_request_error" and sent == 0
    status, body, sent = _raw_http(srv.http_port, head + "Transfer-Encoding: chunked\r\n", body_bytes=40 * MiB, chunked=True)
    assert status == 413 and "larger than the server's limit" in body["error"]["message"] and sent < 40 * MiB
    assert _rss(srv) - rss < 64 * MiB


def test_one_credential_per_request(srv):
    victim, mine = srv.keys["acme"], srv.keys["mallory"]
    body = json.dumps({"model": "atlas", "prompt": "hi", "max_tokens": 2}).encode()
    for extra in (f"Authorization: Bearer {victim}\r\nAuthorization: Bearer {mine}\r\n",
                  f"Authorization: Bearer {mine}\r\nAuthorization: Bearer {victim}\r\n"):
        status, answer = _post(srv, "/v1/completions", body, extra=extra)
        assert status == 401 and "more than one authorization header" in answer["error"]["message"]
    with srv.client(srv.keys["mallory"]) as c:
        c.metadata = (*c.metadata, ("authorization", f"Bearer {victim}"))
        assert _fail(lambda: c.generate("hi", "atlas", max_tokens=2)).code() == grpc.StatusCode.UNAUTHENTICATED


def test_hard_links_to_another_tenants_files_are_refused(srv, before, demo_facts):
    with srv.client(srv.keys["mallory"]) as c:
        e = _fail(lambda: c.load_adapter("stolen", "linked"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "hard links" in e.details(), e.details()
        c.load_adapter("own", "plain")  # its own files load
        c.unload_adapter("own")
    assert _victim_answers(srv, demo_facts) == before


def test_merges_never_change_other_tenants_answers(srv, before, demo_facts):
    """Adapters at 99% of bfloat16's merge limit (types 1 and 4), merged by their tenant's request
    and by traffic alone: every victim request arriving while one is merged gets exactly its
    unmerged tokens (it unmerges it first)."""
    prompt = demo_facts["atlas"][0]["prompt"]
    with srv.client(srv.keys["mallory"]) as c:
        for adapter in ("edge1", "edge4", "mild4"):
            c.load_adapter(adapter, adapter)
            for key, tokens in before.items():
                c.merge_adapter(adapter)
                assert c.get_adapter(adapter).merged
                assert _victim_answers_one(srv, demo_facts, key) == tokens, (adapter, key)
                assert not c.get_adapter(adapter).merged, "a victim's request must unmerge it first"
            c.unmerge_adapter(adapter, automatic=True)  # back to the policy
        # traffic alone: mallory's burst gets edge1 merged by the policy, a victim's request unmerges it
        for _ in range(6):
            c.generate(prompt, "edge1", max_tokens=4, temperature=0)
        deadline = time.monotonic() + 60
        while not c.get_adapter("edge1").merged and time.monotonic() < deadline:
            c.generate(prompt, "edge1", max_tokens=4, temperature=0)
        assert c.get_adapter("edge1").merged, "the policy never merged edge1"
        assert _victim_answers(srv, demo_facts) == before
        for adapter in ("edge1", "edge4", "mild4"):
            c.unload_adapter(adapter)
    s = srv.scrape(srv.token)
    assert metric_value(s, "mora_merge_transitions_total", direction="unmerge", trigger="isolation") >= 7
    assert metric_value(s, "mora_merge_transitions_total", direction="merge", trigger="auto") >= 1


def _victim_answers_one(srv, demo_facts, key: tuple[str, int]) -> list[int]:
    adapter, i = key
    tenant = "acme" if adapter == "base" else next(t for t, a in VICTIMS.items() if a == adapter)
    prompt = demo_facts["draco"][0]["prompt"] if adapter == "base" else demo_facts[adapter][i]["prompt"]
    with srv.client(srv.keys[tenant]) as c:
        return list(c.generate(prompt, "" if adapter == "base" else adapter, max_tokens=24, temperature=0).token_ids)


def test_metric_labels_are_per_tenant_and_reserved_ids_refused(srv, demo_facts):
    with srv.client(srv.keys["mallory"]) as c:
        for reserved in ("base", "unknown", "other"):
            e = _fail(lambda r=reserved: c.load_adapter(r, "plain"))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in e.details()
        churn = [f"churn{i}" for i in range(LABEL_LIMIT + 2)]
        for a in churn:  # more ids than its share
            c.load_adapter(a, "plain")
            c.generate("hi", a, max_tokens=1)
    with srv.client(srv.keys["ops"]) as ops:
        ops.load_adapter("atlas2", "acme/atlas", tenant="acme")  # a victim's new adapter, after the churn
    with srv.client(srv.keys["acme"]) as acme:
        acme.generate(demo_facts["atlas"][0]["prompt"], "atlas2", max_tokens=2)
    s = srv.scrape(srv.token)
    assert metric_value(s, "mora_requests_total", adapter="atlas2", tenant="acme", code="OK") == 1
    assert metric_value(s, "mora_requests_total", adapter="other", tenant="mallory") >= 2  # mallory's overflow only
    with srv.client(srv.keys["mallory"]) as c:
        for a in churn:
            c.unload_adapter(a)
    with srv.client(srv.keys["ops"]) as ops:
        ops.unload_adapter("atlas2")
    # the metrics port: a bearer token, checked before anything is served
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10)
    assert e.value.code == 401


def test_management_is_fair(srv, before, demo_facts):
    """A flood of loads from one tenant: two in flight (its limit), the rest RESOURCE_EXHAUSTED at
    once; an admin's load validates right after the one running; generation and an unmerge for a
    victim's request go on while the flood's validations are held."""
    hold = srv.hold_dir / "hold-validate"
    with srv.client(srv.keys["mallory"]) as c, srv.client(srv.keys["ops"]) as ops:
        c.load_adapter("edge1", "edge1")
        c.merge_adapter("edge1")
        for f in ("validating", "validated"):
            (srv.hold_dir / f).unlink(missing_ok=True)
        hold.touch()
        try:
            codes = []

            def load(i: int) -> None:
                try:
                    c.load_adapter(f"flood{i}", "plain")
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(load, 0)]
                _wait_for(lambda: (srv.hold_dir / "validating").exists())
                futures += [pool.submit(load, i) for i in range(1, 8)]
                _wait_for(lambda: codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6)
                admin = pool.submit(ops.load_adapter, "fresh", "mallory/plain", tenant="mallory")
                # generation goes on, and a victim's request unmerges edge1 without waiting for the flood
                assert _victim_answers_one(srv, demo_facts, ("atlas", 0)) == before[("atlas", 0)]
                assert not c.get_adapter("edge1").merged
                hold.unlink()
                admin.result(timeout=120)
                for f in futures:
                    f.result(timeout=120)
        finally:
            hold.unlink(missing_ok=True)
        assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 6, key=str)
        order = (srv.hold_dir / "validated").read_text().split()
        # the admin's load went right after the one running, ahead of the flood's queued one
        assert order[:2] == ["flood0", "fresh"] and len(order) == 3 and order[2].startswith("flood"), order
        for a in (*(a for a in order if a != "fresh"), "fresh", "edge1"):
            c.unload_adapter(a)


def _wait_for(predicate, timeout: float = 120) -> None:
    """An event, not a speed: the timeout only guards a broken server."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def test_quotas_count_sequences(srv):
    """mallory's quota is 4 sequences: one request with n=3 in flight leaves room for 1, not 2."""
    with srv.client(srv.keys["mallory"]) as c:
        srv.hold()
        try:
            held = c.stream("hello", "", max_tokens=200, ignore_eos=True, n=3)
            next(iter(held))
            e = _fail(lambda: c.generate("hello", "", max_tokens=2, n=2))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "each of n counts" in e.details()
            status, body = _post(srv, "/v1/completions", json.dumps({"model": "base", "prompt": "hi", "n": 2}).encode(),
                                 key=srv.keys["mallory"])
            assert status == 429 and "each of n counts" in body["error"]["message"], body
            held.cancel()
        finally:
            srv.release()
    with srv.client(srv.keys["mallory"]) as c:
        e = _fail(lambda: c.generate("hello", "", max_tokens=2, n=5))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 4" in e.details()


def test_errors_name_the_problem(srv, demo_facts):
    key = srv.keys["mallory"]
    surrogate = b'{"model": "base", "prompt": "a\\ud800b", "max_tokens": 2}'
    status, body = _post(srv, "/v1/completions", surrogate, key=key)
    assert status == 400 and "surrogate" in body["error"]["message"], body
    status, body = _post(srv, "/v1/completions", b'{"model": "x", "prompt": ', key=key)
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"} and "not valid JSON" in body["error"]["message"]
    status, body = _post(srv, "/v1/completions", b'{"model": "x", "prompt": "hi", "temperature": NaN}', key=key)
    assert status == 400 and "NaN" in body["error"]["message"], body
    status, body = _post(srv, "/v1/no-such-route", b"{}", key=key)
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    with srv.client(key) as c:
        e = _fail(lambda: c.generate("hi", "", max_tokens=2, temperature=float("nan")))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.details()
        e = _fail(lambda: c.load_adapter("nan", "nan"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in e.details() and "differs" not in e.details()
        e = _fail(lambda: c.load_adapter("alpha-nan", "alpha-nan"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in e.details()
        # MoRA ignores lora_alpha (docs/security.md): a huge finite one loads and changes nothing
        c.load_adapter("alpha-1e30", "alpha-1e30")
        c.load_adapter("plainref", "plain")
        prompt = demo_facts["draco"][0]["prompt"]
        a = c.generate(prompt, "alpha-1e30", max_tokens=12, temperature=0).token_ids
        assert a == c.generate(prompt, "plainref", max_tokens=12, temperature=0).token_ids
        c.unload_adapter("alpha-1e30")
        c.unload_adapter("plainref")
