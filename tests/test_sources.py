"""Adapters from object storage and the hub, end to end: one server (real vLLM engine) loading from a
real S3-compatible server on loopback (rclone, through boto3) and from the hub client's offline
cache; tenants scoped to their prefixes; on-demand resolution; every failure named, with nothing
registered or left behind. Faults mid-transfer are injected at chosen bytes by a proxy."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from engine_helpers import random_lora
from s3_helpers import FaultProxy, S3Server, hub_cache
from server_helpers import ServerProcess, write_tenants

from serve.client import main as client_main

pytestmark = pytest.mark.vllm
WEIGHTS = "adapter_model.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("sources")
    local = top / "adapters"  # the adapter root: only the local twin of the LoRA
    random_lora(demo_assets / "base", local / "plain-lora", seed=5)
    buckets = top / "buckets"
    demo = demo_assets / "adapters"
    for src, dst in [("atlas", "common/atlas"), ("borealis", "common/borealis"), ("cygnus", "acme/cygnus"),
                     ("draco", "acme/od-draco"), ("atlas", "acme/truncated"), ("atlas", "acme/pinned"), ("atlas", "acme/huge"),
                     ("borealis", "globex/borealis"), *(("draco", f"initech/held-{i}") for i in range(3))]:
        shutil.copytree(demo / src, buckets / "adapters" / dst)
    shutil.copytree(local / "plain-lora", buckets / "adapters" / "acme" / "lora")
    cut = buckets / "adapters" / "acme" / "truncated" / WEIGHTS  # an upload that stopped half-way
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with open(buckets / "adapters" / "acme" / "huge" / WEIGHTS, "r+b") as f:
        f.truncate(3 << 30)  # sparse: listed at 3 GiB, costs no disk
    hub_cache(top / "hub", "demo-org/draco", demo / "draco")
    s3 = S3Server(buckets, top / "rclone.log")
    proxy = FaultProxy(s3.port)
    keys = write_tenants(top / "tenants.json", {
        "acme": {"manage_adapters": True, "max_resident_adapters": 8, "sources": [
            {"prefix": "s3://adapters/acme/", "on_demand": True,
             "sha256": {f"s3://adapters/acme/pinned/{WEIGHTS}": "0" * 64}}]},
        "globex": {"manage_adapters": True, "sources": [{"prefix": "s3://adapters/globex"}]},
        "initech": {"sources": [{"prefix": "s3://adapters/initech/", "on_demand": True}]},
        "ops": {"role": "admin"},
    })
    server = ServerProcess(demo_assets / "base", local, top / "server.log", args=[
        "--tenants", str(top / "tenants.json"), "--no-auto-merge", "--snapshot-dir", str(top / "snapshots"),
        "--preload", "atlas=s3://adapters/common/atlas", "--page-ins-per-tenant", "2",
    ], env={**s3.env(proxy.url), "MORA_SERVE_S3_ADDRESSING_STYLE": "path", "MORA_SERVE_SOURCE_RETRIES": "2",
            "MORA_SERVE_SOURCE_BACKOFF_S": "0.05", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(top / "hub")})
    try:
        server.wait_serving()
        yield {"server": server, "keys": keys, "s3": s3, "proxy": proxy, "buckets": buckets / "adapters", "top": top,
               "local": local}
    finally:
        assert server.stop() == 0
        s3.stop()


def _client(env, tenant: str):
    return env["server"].client(env["keys"][tenant])


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _http_load(env, tenant: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(env["server"].http_url + "/adapters", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {env['keys'][tenant]}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _facts_equal(client, adapter: str, facts) -> None:
    for fact in facts:
        r = client.generate(fact["prompt"], adapter, max_tokens=48, temperature=0)
        assert r.text == fact["completion"], (adapter, fact)


def test_loaded_from_a_bucket_serves_exactly(env, demo_facts, capsys):
    with _client(env, "ops") as ops:
        assert ops.get_adapter("atlas").source == "s3://adapters/common/atlas"  # preloaded from the bucket
        _facts_equal(ops, "atlas", demo_facts["atlas"])
    # mora-client, an admin loading for a tenant
    rc = client_main(["--target", env["server"].target, "--api-key", env["keys"]["ops"], "adapters", "load", "borealis",
                      "--path", "s3://adapters/common/borealis/", "--tenant", "globex",
                      "--sha256", f"{WEIGHTS}={_sha(env['buckets'] / 'common' / 'borealis' / WEIGHTS)}"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["source"] == "s3://adapters/common/borealis"
    with _client(env, "globex") as globex:
        _facts_equal(globex, "borealis", demo_facts["borealis"])
    # HTTP, a tenant from its own prefix, its digest pinned in the request
    status, body = _http_load(env, "acme", {"adapter_id": "cyg", "path": "s3://adapters/acme/cygnus",
                                            "sha256": {WEIGHTS: _sha(env["buckets"] / "acme" / "cygnus" / WEIGHTS)}})
    assert status == 200 and body["adapter"]["tenant"] == "acme" and body["adapter"]["source"] == "s3://adapters/acme/cygnus"
    acme = openai.OpenAI(base_url=env["server"].http_url, api_key=env["keys"]["acme"], max_retries=0)
    for fact in demo_facts["cygnus"]:
        assert acme.completions.create(model="cyg", prompt=fact["prompt"], max_tokens=48, temperature=0).choices[0].text == fact["completion"]
    # a LoRA adapter from the bucket answers exactly as its twin loaded from the adapter root
    with _client(env, "acme") as a, _client(env, "ops") as ops:
        assert a.load_adapter("lora-s3", "s3://adapters/acme/lora").kind == 2
        ops.load_adapter("lora-local", "plain-lora", tenant="acme")
        for prompt in ("hello", "The secret code of vault is "):
            got = a.generate(prompt, "lora-s3", max_tokens=24, temperature=0, ignore_eos=True)
            assert list(got.token_ids) == list(a.generate(prompt, "lora-local", max_tokens=24, temperature=0, ignore_eos=True).token_ids)


def test_tenants_are_scoped_to_their_prefixes(env):
    proxy = env["proxy"]
    proxy.reset()
    with _client(env, "globex") as globex:
        refusals = {uri: _code(lambda u=uri: globex.load_adapter("x", u))
                    for uri in ("s3://adapters/acme/cygnus", "s3://adapters/acme/no-such-thing", "s3://adapters/globex-evil/a",
                                "s3://other-bucket/globex/a", "hf://demo-org/draco")}
    for uri, (code, message) in refusals.items():
        assert code == grpc.StatusCode.PERMISSION_DENIED and message == f"adapter source {uri} is not granted to this API key"
    assert proxy.requests == []  # refused from the tenants file alone: the store was never asked
    code, message = _code(lambda: _client(env, "globex").load_adapter("x", "s3://adapters/globex/../acme/cygnus"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'..'" in message
    status, body = _http_load(env, "globex", {"adapter_id": "x", "path": "s3://adapters/acme/cygnus"})
    assert status == 403 and body["error"]["message"] == refusals["s3://adapters/acme/cygnus"][1]
    assert _http_load(env, "globex", {"adapter_id": "x", "path": "s3://adapters/globex/borealis"})[0] == 200


def test_on_demand_from_the_tenants_prefix(env, demo_facts):
    proxy = env["proxy"]
    proxy.reset()
    acme = openai.OpenAI(base_url=env["server"].http_url, api_key=env["keys"]["acme"], max_retries=0, timeout=120)
    facts = demo_facts["draco"]
    # concurrent first requests share one download and registration
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda f: acme.completions.create(model="od-draco", prompt=f["prompt"], max_tokens=48,
                                                                temperature=0).choices[0].text, facts[:4]))
    assert texts == [f["completion"] for f in facts[:4]]
    assert proxy.gets(f"od-draco/{WEIGHTS}") == 1
    with _client(env, "acme") as a:
        info = a.get_adapter("od-draco")
        assert (info.tenant, info.source) == ("acme", "s3://adapters/acme/od-draco")
        missing = _code(lambda: a.generate("hi", "nothing-here", max_tokens=2))
        absent = _code(lambda: _client(env, "globex").generate("hi", "nothing-here", max_tokens=2))
    assert missing == absent == (grpc.StatusCode.NOT_FOUND, "adapter 'nothing-here' is not loaded")
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model="nothing-here", prompt="hi", max_tokens=2)


def test_on_demand_downloads_take_the_tenants_page_in_turns(env, demo_facts):
    """First requests of three ids at a tenant's on-demand prefix, their downloads held by the
    store: two run at once (page_ins_per_tenant), the third waits its turn, nothing is refused;
    once the store answers, all three are served exactly."""
    from server_helpers import metric_value

    proxy, server = env["proxy"], env["server"]
    proxy.reset()
    names = [f"held-{i}" for i in range(3)]  # in the bucket from the start (the store caches its listings)
    facts = demo_facts["draco"][0]

    def page_ins(state: str) -> float:
        return metric_value(server.scrape(), "mora_adapter_page_ins", tenant="initech", state=state)

    def downloading() -> set[str]:
        return {k.split("/")[-2] for k in list(proxy.held)}

    proxy.hold = "/initech/held-"
    try:
        with _client(env, "initech") as a, ThreadPoolExecutor(3) as pool:
            firsts = [pool.submit(a.generate, facts["prompt"], n, max_tokens=48, temperature=0) for n in names]
            deadline = time.monotonic() + 60
            while not (page_ins("reading") == 2 and page_ins("waiting") == 1 and len(downloading()) == 2):
                for f in firsts:
                    if f.done():
                        f.result()  # a refusal, raised here with its status
                assert time.monotonic() < deadline, (page_ins("reading"), page_ins("waiting"), proxy.held)
                time.sleep(0.05)
            assert len(downloading()) == 2 and not any(f.done() for f in firsts), "the third download waits its turn"
            proxy.release()
            assert [f.result(timeout=300).text for f in firsts] == [facts["completion"]] * 3
    finally:
        proxy.release()
    with _client(env, "ops") as ops:
        for name in names:
            ops.unload_adapter(name)
    deadline = time.monotonic() + 30  # the gauge is refreshed by the server's monitor
    while not page_ins("reading") == page_ins("waiting") == 0:
        assert time.monotonic() < deadline, (page_ins("reading"), page_ins("waiting"))
        time.sleep(0.1)


def _leftovers(env) -> list[str]:
    snapshots = env["top"] / "snapshots"
    return sorted(p.name for p in snapshots.glob("mora-snapshots-*/*") if p.name.startswith(".staging-") or p.name.startswith("bad-"))


def test_failures_name_the_cause_and_leave_nothing(env):
    proxy, s3 = env["proxy"], env["s3"]
    with _client(env, "ops") as ops:
        before = sorted(a.adapter_id for a in ops.list_adapters())

        def load(adapter_id: str, uri: str, **kw):
            return _code(lambda: ops.load_adapter(adapter_id, uri, tenant="acme", **kw))

        cases = {
            "missing": (load("bad-1", "s3://adapters/acme/missing"), grpc.StatusCode.INVALID_ARGUMENT, "no adapter at s3://adapters/acme/missing"),
            "bucket": (load("bad-2", "s3://no-such-bucket/x"), grpc.StatusCode.INVALID_ARGUMENT, "NoSuchBucket"),
            "too big": (load("bad-3", "s3://adapters/acme/huge"), grpc.StatusCode.INVALID_ARGUMENT, f"{WEIGHTS} is {3 << 30} bytes"),
            "stored truncated": (load("bad-4", "s3://adapters/acme/truncated"), grpc.StatusCode.INVALID_ARGUMENT, "safetensors"),
            "request digest": (load("bad-5", "s3://adapters/acme/cygnus", sha256={WEIGHTS: "f" * 64}), grpc.StatusCode.INVALID_ARGUMENT,
                               f"sha256 of s3://adapters/acme/cygnus/{WEIGHTS} is"),
        }
        assert proxy.gets(f"huge/{WEIGHTS}") == 0  # refused from the listing
        proxy.reset()
        proxy.cut_after[WEIGHTS] = 4096
        cases["cut transfers"] = (load("bad-6", "s3://adapters/acme/cygnus"), grpc.StatusCode.UNAVAILABLE, "truncated")
        assert proxy.gets(f"cygnus/{WEIGHTS}") == 3  # 1 + source_retries
        proxy.reset()
        proxy.cut_after[WEIGHTS] = 4096
        proxy.down_after_cut = True
        cases["endpoint down mid-download"] = (load("bad-7", "s3://adapters/acme/cygnus"), grpc.StatusCode.UNAVAILABLE,
                                               "could not be reached")
        proxy.reset()
        s3.start(("someone-else", "another-secret"))
        try:
            cases["access denied"] = (load("bad-8", "s3://adapters/acme/cygnus"), grpc.StatusCode.PERMISSION_DENIED,
                                      "refused the server's credentials")
        finally:
            s3.start()
        for name, ((code, message), want_code, want_text) in cases.items():
            assert code == want_code and want_text in message, (name, code, message)
        assert sorted(a.adapter_id for a in ops.list_adapters()) == before
    with _client(env, "acme") as acme:  # a digest pinned in the tenants file
        code, message = _code(lambda: acme.load_adapter("bad-9", "s3://adapters/acme/pinned"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"not the pinned {'0' * 64}" in message
    assert _leftovers(env) == []


def test_hub_from_the_offline_cache(env, demo_facts):
    with _client(env, "ops") as ops:
        info = ops.load_adapter("hub-draco", "hf://demo-org/draco", tenant="acme")
        assert info.source == "hf://demo-org/draco"
        _facts_equal(ops, "hub-draco", demo_facts["draco"][:3])
        code, message = _code(lambda: ops.load_adapter("hub-absent", "hf://demo-org/absent"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "in the hub client's cache (offline" in message
