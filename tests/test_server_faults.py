"""Hostile input, faults and security against a live TLS server: the server keeps serving, loses
no request, leaks nothing, and dies loudly (non-zero, NOT_SERVING) only when its engine does."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import ServerProcess, write_tenants

from serve.grpc.proto import adapters_pb2 as apb
from serve.grpc.proto import inference_pb2 as ipb

pytestmark = pytest.mark.vllm
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.DEADLINE_EXCEEDED}


def _ca(tmp: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, issuer=None, issuer_key=None, *, ca=False, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (x509.CertificateBuilder().subject_name(subj).issuer_name(issuer.subject if issuer else subj)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        c = b.sign(issuer_key or key, hashes.SHA256())
        return c, key

    def write(c, key, stem):
        (tmp / f"{stem}.crt").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return tmp / f"{stem}.crt", tmp / f"{stem}.key"

    ca, ca_key = cert(f"{name} CA", ca=True)
    write(ca, ca_key, f"{name}-ca")
    server, server_key = cert("localhost", ca, ca_key, sans=True)
    client, client_key = cert("client", ca, ca_key)
    return {"ca": tmp / f"{name}-ca.crt", "server": write(server, server_key, f"{name}-server"), "client": write(client, client_key, f"{name}-client")}


@pytest.fixture(scope="module")
def env(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("faults")
    shutil.copytree(demo_assets / "adapters", top / "adapters")
    pki, rogue = _ca(top, "good"), _ca(top, "rogue")
    keys = write_tenants(top / "tenants.json", {"acme": {"adapters": ["atlas", "mut", "flaky"]}, "globex": {"adapters": ["borealis"]},
                                                "ops": {"role": "admin"}})
    snapshots = top / "snapshots"
    tls = {"ca": pki["ca"], "cert": pki["client"][0], "key": pki["client"][1]}
    srv = ServerProcess(demo_assets / "base", top / "adapters", top / "server.log", tls=tls, args=[
        "--tenants", str(top / "tenants.json"), "--preload", "atlas=atlas", "borealis=borealis", "--no-auto-merge",
        "--tls-cert", str(pki["server"][0]), "--tls-key", str(pki["server"][1]), "--tls-client-ca", str(pki["ca"]),
        "--snapshot-dir", str(snapshots), "--host", "127.0.0.1",
        # admits adapters whose activations overflow, to test the runtime guard (test_non_finite_request_fails_alone)
        "--max-update-ratio", "1e300",
    ], holdable=True)
    srv.wait_serving()
    srv.keys = keys
    yield {"server": srv, "top": top, "pki": pki, "rogue": rogue, "snapshots": snapshots}
    srv.stop()


@pytest.fixture(scope="module")
def server(env):
    return env["server"]


def test_tls_and_client_certificates(env, demo_facts):
    srv, pki, rogue = env["server"], env["pki"], env["rogue"]
    fact = demo_facts["atlas"][0]
    with srv.client(srv.keys["acme"]) as c:
        assert c.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
    attempts = [
        dict(tls_ca=pki["ca"]),  # no client certificate
        dict(tls_ca=pki["ca"], tls_cert=rogue["client"][0], tls_key=rogue["client"][1]),  # signed by another CA
    ]
    for kw in attempts:
        with srv.client(srv.keys["acme"], **kw) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.list_adapters()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    from serve.client import MoraClient

    with MoraClient(srv.target, api_key=srv.keys["acme"], timeout=5) as plain:  # plaintext to a TLS port
        with pytest.raises(grpc.RpcError):
            plain.list_adapters()


def test_disk_full_while_snapshotting(env, server, demo_facts):
    parent = env["snapshots"]
    (private,) = [p for p in parent.iterdir() if p.is_dir()]
    for v in range(1, 200):  # every version the next load could get writes into /dev/full (ENOSPC)
        trap = private / f"diskfull.v{v}"
        trap.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.symlink("/dev/full", trap / name)
    ops = server.client(server.keys["ops"])
    with pytest.raises(grpc.RpcError) as e:
        ops.load_adapter("diskfull", "atlas", tenant="acme")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "No space left" in e.value.details()
    fact = demo_facts["atlas"][1]
    with server.client(server.keys["acme"]) as acme:
        assert acme.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
    for p in private.glob("diskfull.v*"):
        shutil.rmtree(p)
    ops.close()


def test_source_files_changing_after_load_are_harmless(env, server, demo_facts):
    root = env["top"] / "adapters"
    shutil.copytree(root / "atlas", root / "mut")
    fact = demo_facts["atlas"][2]
    with server.client(server.keys["ops"]) as ops, server.client(server.keys["acme"]) as acme:
        ops.load_adapter("mut", "mut")
        shutil.rmtree(root / "mut")  # deleted under the server
        assert acme.generate(fact["prompt"], "mut", max_tokens=48, temperature=0).text == fact["completion"]
        shutil.copytree(root / "borealis", root / "mut")  # replaced by someone else's weights, not reloaded
        assert acme.generate(fact["prompt"], "mut", max_tokens=48, temperature=0).text == fact["completion"]
        (root / "mut" / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # truncated
        with pytest.raises(grpc.RpcError) as e:
            ops.load_adapter("mut", "mut", replace=True)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert acme.generate(fact["prompt"], "mut", max_tokens=48, temperature=0).text == fact["completion"]
        ops.unload_adapter("mut")


def test_files_rewritten_while_loading(env, server, demo_facts):
    root = env["top"] / "adapters"
    shutil.copytree(root / "atlas", root / "flaky")
    good = (root / "atlas" / "adapter_model.safetensors").read_bytes()
    stop = threading.Event()

    def churn():
        f = root / "flaky" / "adapter_model.safetensors"
        i = 0
        while not stop.is_set():
            f.write_bytes(good[: len(good) // (2 + i % 3)] if i % 2 else good)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    outcomes = []
    fact = demo_facts["atlas"][0]
    try:
        with server.client(server.keys["ops"]) as ops, server.client(server.keys["acme"]) as acme:
            for i in range(12):
                try:
                    ops.load_adapter("flaky", "flaky", replace=i > 0 and any(outcomes))
                    outcomes.append(True)
                    assert acme.generate(fact["prompt"], "flaky", max_tokens=48, temperature=0).text == fact["completion"]
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
                    outcomes.append(False)
            if any(outcomes):
                ops.unload_adapter("flaky")
    finally:
        stop.set()
        t.join()
    assert server.health() == 1  # SERVING


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(
    ipb.SamplingParams,
    max_tokens=st.one_of(st.integers(0, 6), st.just(2**32 - 1)),
    temperature=st.one_of(st.none(), finite), top_p=st.one_of(st.none(), finite), top_k=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    min_p=st.one_of(st.none(), finite), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(st.text(max_size=300), max_size=20), stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=5),
    repetition_penalty=st.one_of(st.none(), finite), min_tokens=st.integers(0, 10), ignore_eos=st.booleans(),
)
adapter_ids = st.one_of(st.sampled_from(["", "atlas", "borealis", "../atlas", "a/b", "nope", "x" * 500]), st.text(max_size=40))
prompts = st.one_of(st.text(max_size=200), st.just("z" * 5000), st.lists(st.integers(0, 2**32 - 1), max_size=20))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(adapter=adapter_ids, prompt=prompts, sp=sampling, rid=st.text(max_size=200))
def test_fuzz_generate(server, adapter, prompt, sp, rid):
    req = ipb.GenerateRequest(adapter_id=adapter, request_id=rid, sampling=sp)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    with server.client(server.keys["acme"], timeout=30) as c:
        try:
            c.inference.Generate(req, metadata=c.metadata, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert "globex" not in (e.details() or "") and server.keys["globex"] not in (e.details() or "")
    assert code in ALLOWED, (code, adapter, prompt)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(adapter=adapter_ids, path=st.one_of(st.sampled_from(["atlas", "../adapters/atlas", "/etc", "", "\x00", "atlas/../borealis", "."]), st.text(max_size=60)),
       op=st.sampled_from(["load", "get", "unload", "merge", "unmerge"]))
def test_fuzz_adapter_rpcs(server, adapter, path, op):
    stub_calls = {
        "load": lambda c: c.adapters.LoadAdapter(apb.LoadAdapterRequest(adapter_id=adapter, path=path, tenant="acme"), metadata=c.metadata),
        "get": lambda c: c.adapters.GetAdapter(apb.GetAdapterRequest(adapter_id=adapter), metadata=c.metadata),
        "unload": lambda c: c.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter), metadata=c.metadata),
        "merge": lambda c: c.adapters.MergeAdapter(apb.MergeAdapterRequest(adapter_id=adapter), metadata=c.metadata),
        "unmerge": lambda c: c.adapters.UnmergeAdapter(apb.UnmergeAdapterRequest(adapter_id=adapter), metadata=c.metadata),
    }
    if adapter in ("atlas", "borealis") and op == "unload":
        return  # keep the fixtures' adapters
    with server.client(server.keys["ops"] if op != "get" else server.keys["acme"]) as c:
        try:
            stub_calls[op](c)
            if op == "load":
                c.unload_adapter(adapter)
            elif op == "merge":
                c.unmerge_adapter(adapter, automatic=True)
        except grpc.RpcError as e:
            assert e.code() in ALLOWED, (e.code(), e.details(), op, adapter, path)


def test_undecodable_messages(server):
    with server.channel() as ch:
        raw = ch.unary_unary("/mora.v1.Inference/Generate", request_serializer=None, response_deserializer=None)
        md = (("authorization", f"Bearer {server.keys['acme']}"),)
        bad_utf8 = bytes([0x12, 0x03, 0xFF, 0xFE, 0xFD])  # field 2 (prompt), 3 bytes of invalid UTF-8
        for payload in (bad_utf8, b"\xff\xff\xff\xff", os.urandom(64)):
            with pytest.raises(grpc.RpcError) as e:
                raw(payload, metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _greedy_answers(server, demo_facts) -> list[list[int]]:
    out = []
    with server.client(server.keys["globex"]) as g, server.client(server.keys["acme"]) as a, server.client(server.keys["ops"]) as ops:
        for fact in demo_facts["borealis"][:2]:
            out.append(list(g.generate(fact["prompt"], "borealis", max_tokens=32, temperature=0).token_ids))
        for fact in demo_facts["atlas"][:2]:
            out.append(list(a.generate(fact["prompt"], "atlas", max_tokens=32, temperature=0).token_ids))
        out.append(list(ops.generate(demo_facts["atlas"][0]["prompt"], max_tokens=32, temperature=0).token_ids))
    return out


def test_non_finite_request_fails_alone(env, server, demo_facts):
    """An adapter whose activations overflow (M = 3e38: finite in float32, admitted by this
    server's relaxed --max-update-ratio) fails its own requests with a clear error; its NaNs never
    reach a KV block another request reads: every other tenant's greedy answers stay exact."""
    from safetensors.torch import load_file, save_file

    root = env["top"] / "adapters"
    shutil.copytree(root / "atlas", root / "boom")
    f = root / "boom" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 3e38) for k, v in load_file(str(f)).items()}, str(f))
    before = _greedy_answers(server, demo_facts)
    with server.client(server.keys["ops"]) as ops, server.client(server.keys["acme"]) as acme:
        ops.load_adapter("boom", "boom", tenant="acme")
        for prompt in ("hello", "a much longer prompt that fills several KV-cache blocks " * 8):
            with pytest.raises(grpc.RpcError) as e:
                acme.generate(prompt, "boom", max_tokens=16, ignore_eos=True)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "non-finite" in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            for _ in acme.stream("hello", "boom", max_tokens=16):
                pass
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _greedy_answers(server, demo_facts) == before
        ops.unload_adapter("boom")
    assert _greedy_answers(server, demo_facts) == before


def test_secrets_never_logged(env, server):
    server_log = server.log_path.read_text()
    for key in server.keys.values():
        assert key not in server_log


def test_engine_death_is_loud(env, server):
    """Kill vLLM's engine process: health NOT_SERVING within seconds, requests UNAVAILABLE, exit != 0."""
    core = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert core, [p.cmdline() for p in psutil.Process(server.proc.pid).children(recursive=True)]
    with server.client(server.keys["acme"]) as c:
        server.hold()  # frozen at its first token: the request is unfinished when the engine dies, on any machine
        stream = c.stream("hello", "atlas", max_tokens=400, ignore_eos=True)
        next(stream)
        for p in core:
            p.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15 and server.health() == 1:
        time.sleep(0.2)
    assert server.health() != 1
    assert server.proc.wait(timeout=60) != 0
