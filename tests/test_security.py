"""Tenant containment against a live server (docs/security.md): hostile tenants with
`manage_adapters` load their own adapters and send ordinary requests; nothing they do may change
another tenant's answers, reach another tenant's files, or show them what is not theirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from engine_helpers import random_lora
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file, save_file
from server_helpers import ServerProcess, metric_value, write_tenants

from serve.adapters.snapshots import clean_stale_snapshots
from serve.grpc.proto import inference_pb2 as ipb

pytestmark = pytest.mark.vllm


def _scaled(src: Path, dst: Path, factor: float, dtype: torch.dtype | None = None) -> None:
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    tensors = {k: (v.double() * factor).to(dtype or v.dtype) for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f))


@pytest.fixture(scope="module")
def env(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("security")
    root = top / "adapters"
    atlas = demo_assets / "adapters" / "atlas"
    for tenant in ("acme", "globex"):
        (root / tenant).mkdir(parents=True)
    shutil.copytree(atlas, root / "acme" / "good")
    shutil.copytree(atlas, root / "globex" / "secret")
    shutil.copytree(atlas, root / "root-level-adapter")
    # float64 beyond the float32 range: finite on disk, not in the serving dtype
    _scaled(atlas, root / "acme" / "f64", 1.0, torch.float64)
    f = root / "acme" / "f64" / "adapter_model.safetensors"
    t = load_file(str(f))
    for k in t:
        t[k][0, 0] = 1e39
    save_file(t, str(f))
    # huge but finite: loads (ratio ~350 < 1024) but may never be merged (> 166 for float32)
    _scaled(atlas, root / "acme" / "huge", 1000.0)
    _scaled(atlas, root / "acme" / "enormous", 1e5)  # ratio ~3.5e4 > 1024: refused at load
    for name, alpha in (("alpha-nan", "NaN"), ("alpha-inf", "Infinity"), ("alpha-1e30", "1e30")):
        random_lora(demo_assets / "base", root / "acme" / name, seed=3)
        cfg = root / "acme" / name / "adapter_config.json"
        cfg.write_text(cfg.read_text().replace('"lora_alpha": 16.0', f'"lora_alpha": {alpha}').replace('"lora_alpha": 16', f'"lora_alpha": {alpha}'))
    # symlinks: into another tenant's folder, and to a /proc file
    (root / "acme" / "links").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(root / "globex" / "secret" / name, root / "acme" / "links" / name)
    shutil.copytree(atlas, root / "acme" / "proc")
    (root / "acme" / "proc" / "adapter_config.json").unlink()
    os.symlink("/proc/self/maps", root / "acme" / "proc" / "adapter_config.json")
    # deeply nested JSON, a backtracking regex, a backreference RE2 refuses
    cfg = json.loads((atlas / "adapter_config.json").read_text())
    shutil.copytree(atlas, root / "acme" / "deep")
    (root / "acme" / "deep" / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 50000 + "]" * 50000 + "}")
    shutil.copytree(atlas, root / "acme" / "backtrack")
    (root / "acme" / "backtrack" / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": "(.*a)*(.*a)*(.*a)*.*_projx"}))
    shutil.copytree(atlas, root / "acme" / "backref")
    (root / "acme" / "backref" / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": r"(q)\1_proj"}))
    # a weights file whose header claims a tensor far larger than the base module (refused unread),
    # and one with 8 GiB of (sparse) trailing bytes that are never read
    shutil.copytree(atlas, root / "acme" / "claims")
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [16000, 16000], "data_offsets": [0, 1024000000]}}).encode()
    (root / "acme" / "claims" / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    shutil.copytree(atlas, root / "acme" / "tail")
    with open(root / "acme" / "tail" / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(8 << 30)
    keys = write_tenants(top / "tenants.json", {
        "acme": {"adapters": ["atlas"], "manage_adapters": True, "max_resident_adapters": 6},
        "globex": {"adapters": ["borealis"], "manage_adapters": True},
        "ops": {"role": "admin"},
    })
    snapshots = top / "snapshots"
    srv = ServerProcess(demo_assets / "base", root, top / "server.log", args=[
        "--tenants", str(top / "tenants.json"), "--no-auto-merge", "--snapshot-dir", str(snapshots),
        "--preload", "atlas=acme/good", "borealis=globex/secret", "--max-cpu-loras", "12",
    ], holdable=True)
    srv.wait_serving()
    srv.keys = keys
    yield {"server": srv, "root": root, "snapshots": snapshots}
    srv.stop()


@pytest.fixture(scope="module")
def srv(env):
    return env["server"]


def _fail(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def _answers(srv, demo_facts) -> list[list[int]]:
    """Greedy token ids of every other tenant (and the base model) for a fixed set of prompts."""
    out = []
    with srv.client(srv.keys["globex"]) as g, srv.client(srv.keys["ops"]) as ops:
        for fact in demo_facts["borealis"][:2]:
            out.append(list(g.generate(fact["prompt"], "borealis", max_tokens=24, temperature=0).token_ids))
        out.append(list(ops.generate(demo_facts["atlas"][0]["prompt"], max_tokens=24, temperature=0).token_ids))
    return out


def test_non_finite_and_oversized_adapters_are_refused(srv, demo_facts):
    before = _answers(srv, demo_facts)
    with srv.client(srv.keys["acme"]) as acme:
        for path, words in (("f64", "not finite in the serving dtype float32"), ("alpha-nan", "not finite"),
                            ("alpha-inf", "not finite"), ("alpha-1e30", "too large relative to the base layer"),
                            ("enormous", "too large relative to the base layer")):
            e = _fail(lambda path=path: acme.load_adapter(f"x-{path}", path))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.details(), (path, e.details())
    assert _answers(srv, demo_facts) == before


def test_merge_refused_when_it_would_break_other_tenants(srv, demo_facts):
    before = _answers(srv, demo_facts)
    with srv.client(srv.keys["acme"]) as acme:
        acme.load_adapter("huge", "huge")
        e = _fail(lambda: acme.merge_adapter("huge"))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be merged" in e.details() and "tolerance" in e.details()
        assert not acme.get_adapter("huge").merged
        acme.generate("hello", "huge", max_tokens=4)  # served unmerged
        # a normal adapter still merges; replacing a manually merged adapter never unmerges it
        # behind the owner's back
        acme.merge_adapter("atlas")
        e = _fail(lambda: acme.load_adapter("atlas", "good", replace=True))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "unmerge it before replacing" in e.details()
        assert acme.get_adapter("atlas").merged
        # other tenants' requests unmerge it first (a merged adapter runs alone): their answers are exact
        assert _answers(srv, demo_facts) == before
        assert not acme.get_adapter("atlas").merged
        acme.unload_adapter("huge")
    assert _answers(srv, demo_facts) == before


def test_tenant_folders_and_symlinks(srv, env):
    with srv.client(srv.keys["acme"]) as acme, srv.client(srv.keys["ops"]) as ops:
        acme.load_adapter("mine", "good")  # <root>/acme/good
        acme.unload_adapter("mine")
        for path in ("../globex/secret", "/etc", "../root-level-adapter"):
            assert _fail(lambda path=path: acme.load_adapter("stolen", path)).code() == grpc.StatusCode.PERMISSION_DENIED
        e = _fail(lambda: acme.load_adapter("stolen", "links"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the folder" in e.details()
        e = _fail(lambda: acme.load_adapter("stolen", "proc"))
        maps = Path("/proc/self/maps").read_text()[:20]
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and maps not in e.details() and "r-xp" not in e.details()
        e = _fail(lambda: acme.load_adapter("stolen", "claims"))  # refused from the header, nothing allocated
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot belong to this module" in e.details()
        acme.load_adapter("tail", "tail")  # 8 GiB file: only header and tensor bytes are read
        acme.unload_adapter("tail")
        ops.load_adapter("shared", "root-level-adapter", tenant="acme")  # admins load from the root
        ops.unload_adapter("shared")
    assert srv.health() == 1


def test_metadata_over_grpcs_soft_limit_is_not_refused_at_random(srv):
    """Between gRPC's soft (8 KiB) and hard metadata limits a call is refused at random
    (RESOURCE_EXHAUSTED, probability rising with the size); the server sets one limit, so an
    unauthenticated call with 12 KiB of metadata reaches the edge's authentication every time,
    and one over the limit is refused every time. (With the defaults, 20 such calls all reach
    it with probability ~1e-6.)"""
    request = ipb.GenerateRequest(prompt="hi", adapter_id="atlas")
    with srv.client(None) as anon:
        for _ in range(20):
            md = (("x-padding", "p" * (12 << 10)),)
            assert _fail(lambda md=md: anon.inference.Generate(request, metadata=md, timeout=30)).code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("x-padding", "p" * (20 << 10)),)
        assert _fail(lambda: anon.inference.Generate(request, metadata=md, timeout=30)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_authorization_first_and_not_found_alike(srv, demo_facts):
    with srv.client(srv.keys["acme"]) as acme, srv.client(srv.keys["globex"]) as globex:
        hidden = {
            "get": lambda c, a: c.get_adapter(a), "unload": lambda c, a: c.unload_adapter(a),
            "merge": lambda c, a: c.merge_adapter(a), "unmerge": lambda c, a: c.unmerge_adapter(a),
            "generate": lambda c, a: c.generate("hi", a, max_tokens=2),
        }
        for op, call in hidden.items():
            theirs, absent = _fail(lambda call=call: call(globex, "atlas")), _fail(lambda call=call: call(globex, "nosuch"))
            assert theirs.code() == absent.code() == grpc.StatusCode.NOT_FOUND, op
            assert theirs.details().replace("atlas", "X") == absent.details().replace("nosuch", "X"), op
            assert "acme" not in theirs.details()
        assert [a.adapter_id for a in globex.list_adapters()] == ["borealis"]
        # taking over another tenant's id, concurrently (the check is under the registry lock)
        with ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(lambda _: _fail(lambda: globex.load_adapter("atlas", "secret", replace=True)), range(24)))
        assert {e.code() for e in errors} == {grpc.StatusCode.PERMISSION_DENIED}
        assert all("acme" not in e.details() for e in errors)
        fact = demo_facts["atlas"][0]
        assert acme.generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
        # two authorization headers: refused, not last-wins
        md = (("authorization", f"Bearer {srv.keys['globex']}"), ("authorization", f"Bearer {srv.keys['acme']}"))
        e = _fail(lambda: acme.inference.Generate(ipb.GenerateRequest(prompt="hi", adapter_id="atlas"), metadata=md, timeout=30))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        # unauthenticated and unauthorized ids never reach metric labels; long input is not echoed
        bogus = "b" * 4000
        with srv.client(None) as anon:
            assert _fail(lambda: anon.generate("hi", bogus)).code() == grpc.StatusCode.UNAUTHENTICATED
        e = _fail(lambda: globex.generate("hi", bogus))
        assert len(e.details()) < 300
        e = _fail(lambda: globex.get_adapter("x" * 100_000))
        assert e.code() == grpc.StatusCode.NOT_FOUND and len(e.details()) < 300
        scrape = srv.scrape()
        assert bogus[:100] not in scrape and "nosuch" not in scrape


def test_limits(srv):
    with srv.client(srv.keys["acme"]) as acme:
        e = _fail(lambda: acme.load_adapter("é" * 128, "good"))  # 256 bytes
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in e.details()
        e = _fail(lambda: acme.load_adapter("deep", "deep"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "nested deeper" in e.details()
        e = _fail(lambda: acme.load_adapter("backref", "backref"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "RE2" in e.details()
        # RE2 runs a nested-quantifier pattern in linear time (Python's re backtracks polynomially deep)
        e = _fail(lambda: acme.load_adapter("backtrack", "backtrack"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        # a stream the client cancels is counted as CANCELLED (held at its first token: it cannot
        # finish before the cancel, whatever the machine's speed)
        srv.hold()
        try:
            stream = acme.stream("hello", "atlas", max_tokens=200, ignore_eos=True)
            next(stream)
            stream.cancel()
        finally:
            srv.release()
    deadline = time.monotonic() + 60
    while metric_value(srv.scrape(), "mora_requests_total", code="CANCELLED") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric_value(srv.scrape(), "mora_requests_total", code="CANCELLED") >= 1


def test_tokenizing_runs_off_the_event_loop(srv, demo_facts):
    """A prompt whose tokenization never ends (held by the test) must not stall anyone else."""
    hold, started = srv.hold_dir / "hold-tokenize", srv.hold_dir / "tokenizing"
    started.unlink(missing_ok=True)
    hold.touch()
    result: dict = {}
    with srv.client(srv.keys["acme"]) as acme:
        worker = threading.Thread(target=lambda: result.setdefault("r", acme.generate("hello", "atlas", max_tokens=2)))
        try:
            worker.start()
            deadline = time.monotonic() + 60
            while not started.exists():
                assert time.monotonic() < deadline and worker.is_alive(), "the request never reached tokenization"
                time.sleep(0.05)
            # The tokenizing thread stays blocked until the test lets go, so a server that tokenized
            # on its event loop could never answer this (the retries only absorb a slow machine).
            deadline = time.monotonic() + 60
            while srv.health() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "the event loop is blocked while a prompt is tokenized"
            assert worker.is_alive()
        finally:
            hold.unlink(missing_ok=True)
            worker.join(60)
    assert not worker.is_alive() and len(result["r"].token_ids) == 2


def test_sigkill_leaves_no_orphans_and_stale_snapshots_are_cleaned(env):
    """Last: kills the module's server."""
    srv = env["server"]
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    assert children
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    stale = [p for p in env["snapshots"].iterdir() if p.is_dir()]
    assert stale  # left behind by the SIGKILL
    assert sorted(clean_stale_snapshots(env["snapshots"])) == sorted(stale)
    assert not [p for p in env["snapshots"].iterdir() if p.is_dir()]
