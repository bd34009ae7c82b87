"""Thousands of adapters on a real server: disk -> host cache -> device slots, pins, evictions
under use, lazy registration and its refusals, the tier metrics (real vLLM engine, real gRPC)."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from engine_helpers import assert_greedy_matches, hf_greedy_scored, random_mora
from server_helpers import ServerProcess, metric_value, write_tenants

from serve.grpc.proto import adapters_pb2 as apb

pytestmark = pytest.mark.vllm
MANY = int(os.environ.get("MORA_TEST_MANY_ADAPTERS", "1000"))
MAX_LORAS, MAX_CPU_LORAS = 2, 4
SPARE = 40  # adapters of the disk budget left once the MANY are registered


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _details(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def _bytes(folder: Path) -> int:
    """The tensor bytes the server's disk budget counts for the adapter in `folder`."""
    from mora.checkpoint import load_mora_adapter

    return sum(w.numel() * w.element_size() for w in load_mora_adapter(folder, folder.name).weights.values())


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.fixture(scope="module")
def env(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = demo_assets / "base"
    top = tmp_path_factory.mktemp("tiers")
    root = top / "adapters"
    (root / "many").mkdir(parents=True)
    for name in ("atlas", "borealis", "cygnus"):
        shutil.copytree(demo_assets / "adapters" / name, root / name)
    for i in range(MANY):  # tiny MoRA adapters of types 1 and 6, each its own weights
        random_mora(base, root / "many" / f"m{i}", mora_type=(1, 6)[i % 2], r=1 if i % 2 else 4, seed=1000 + i, scale=0.3,
                    targets=("q_proj",))
    size = _bytes(root / "many" / "m0") + _bytes(root / "many" / "m1")
    (root / "acme").mkdir()
    (root / "beta").mkdir()
    random_mora(base, root / "acme" / "lazy-ok", mora_type=6, r=4, seed=77, scale=0.1)
    random_mora(base, root / "acme" / "lazy-two", mora_type=1, r=4, seed=78, scale=0.1)
    random_mora(base, root / "acme" / "lazy-three", mora_type=6, r=4, seed=79, scale=0.1)
    random_mora(base, root / "acme" / "lazy-bad", mora_type=1, r=4, seed=80)
    cfg = json.loads((root / "acme" / "lazy-bad" / "adapter_config.json").read_text())
    (root / "acme" / "lazy-bad" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8}))  # n no longer matches
    random_mora(base, root / "beta" / "secret", mora_type=6, r=4, seed=81)
    os.symlink(root / "beta" / "secret", root / "acme" / "link-out")
    random_mora(base, root / "beta" / "beta-own", mora_type=6, r=4, seed=82)
    keys = write_tenants(top / "tenants.json", {
        "ops": {"role": "admin"},
        "acme": {"adapters": ["atlas"], "lazy_adapters": True, "max_resident_adapters": 4},
        "beta": {"max_resident_adapters": MANY + 200},
        "gamma": {},
    })
    # a disk budget the MANY fill nearly: SPARE more fit, then loads are refused
    others = [root / "atlas", root / "borealis", *(root / "acme" / n for n in ("lazy-ok", "lazy-two", "lazy-three"))]
    budget = (MANY // 2 + SPARE // 2) * size + sum(_bytes(d) for d in others)
    srv = ServerProcess(base, root, top / "server.log", args=[
        "--tenants", str(top / "tenants.json"), "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_CPU_LORAS),
        "--max-adapters", str(MANY + 200), "--adapter-disk-bytes", str(budget), "--preload", "atlas=atlas",
        "--no-auto-merge", "--page-ins-per-tenant", "2"], holdable=True)
    try:
        srv.wait_serving()
        yield {"srv": srv, "root": root, "base": base, "keys": keys}
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def clients(env):
    made = {name: env["srv"].client(key) for name, key in env["keys"].items()}
    yield made
    for c in made.values():
        c.close()


def _location(client, adapter_id: str) -> int:
    return client.get_adapter(adapter_id).location


def test_thousands_registered_adapters_served_from_disk(env, clients, demo_facts):
    ops = clients["ops"]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: ops.load_adapter(f"m{i}", f"many/m{i}", tenant="beta"), range(MANY)))
    print(f"registered {MANY} adapters in {time.monotonic() - started:.1f}s")
    assert len(ops.list_adapters()) >= MANY + 1
    scrape = env["srv"].scrape()
    rss_kib = int(next(ln for ln in open(f"/proc/{env['srv'].proc.pid}/status") if ln.startswith("VmRSS")).split()[1])
    print(f"server rss {rss_kib >> 10} MiB with {MANY} adapters registered")
    # the registry keeps metadata only: far from MANY copies of the weights
    assert _wait(lambda: _location(ops, "m0") == apb.ADAPTER_LOCATION_DISK_ONLY, 10), "evicted long ago: on disk only"
    # a sample, including adapters that sit on disk only, against the transformers reference
    sample = sorted({x % MANY for x in (0, 1, 2, 3, MANY // 3, MANY // 2 + 1, MANY - 2, MANY - 1, 17, 42, 101, 555)})
    prompt = "the tiers of adapters"
    beta = clients["beta"]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: list(beta.generate(prompt, f"m{i}", max_tokens=10, temperature=0, ignore_eos=True).token_ids),
                            sample))
    want = hf_greedy_scored(env["base"], {f"m{i}": env["root"] / "many" / f"m{i}" for i in sample},
                            [(prompt, f"m{i}") for i in sample], 10)
    assert_greedy_matches(got, want)
    # the preloaded adapter is pinned: never evicted, however many others came through
    assert _location(ops, "atlas") in (apb.ADAPTER_LOCATION_HOST_CACHE, apb.ADAPTER_LOCATION_DEVICE_SLOT)
    fact = demo_facts["atlas"][0]
    assert clients["acme"].generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
    scrape = env["srv"].scrape()
    assert metric_value(scrape, "mora_adapter_load_seconds_count", tier="disk") >= len(sample) - MAX_CPU_LORAS
    assert metric_value(scrape, "mora_adapter_evictions_total", cache="host") >= MANY - MAX_CPU_LORAS
    assert metric_value(scrape, "mora_adapter_cache_misses_total", cache="host") >= len(sample) - MAX_CPU_LORAS
    assert metric_value(scrape, "mora_adapter_snapshot_bytes") > 0


def test_disk_budget_refuses_with_the_reason(clients):
    ops = clients["ops"]
    refused = None
    for i in range(SPARE * 4):
        try:
            ops.load_adapter(f"spare{i}", f"many/m{i % 2}", tenant="beta")
        except grpc.RpcError as e:
            refused = e
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk budget" in refused.details()
    for j in range(i):
        ops.unload_adapter(f"spare{j}")


def test_eviction_under_use_never_breaks_requests_in_flight(env, clients):
    """Requests for one adapter stay in flight while many others page through the small caches."""
    ops, beta = clients["ops"], clients["beta"]
    ops.load_adapter("busy", "borealis", tenant="beta")
    prompt = "hold this adapter"
    stream = beta.stream(prompt, "busy", max_tokens=120, ignore_eos=True, temperature=0)
    tokens = list(next(stream).token_ids)
    others = [f"m{i % MANY}" for i in range(20, 20 + 3 * MAX_CPU_LORAS)]
    evictions_before = metric_value(env["srv"].scrape(), "mora_adapter_evictions_total", cache="host")
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda a: beta.generate("churn", a, max_tokens=4), others))
    for piece in stream:
        tokens.extend(piece.token_ids)
    want = hf_greedy_scored(env["base"], {"busy": env["root"] / "borealis"}, [(prompt, "busy")], 120)
    assert_greedy_matches([tokens], want)
    assert _wait(lambda: metric_value(env["srv"].scrape(), "mora_adapter_evictions_total", cache="host") > evictions_before, 10)
    ops.unload_adapter("busy")


def test_lazy_registration_and_its_refusals(env, clients):
    acme, beta, ops = clients["acme"], clients["beta"], clients["ops"]
    root = env["root"]
    # served by id on first use; concurrent first requests share one validation
    with ThreadPoolExecutor(3) as pool:
        out = list(pool.map(lambda _: list(acme.generate("lazy hello", "lazy-ok", max_tokens=8, temperature=0, ignore_eos=True).token_ids),
                            range(3)))
    want = hf_greedy_scored(env["base"], {"lazy-ok": root / "acme" / "lazy-ok"}, [("lazy hello", "lazy-ok")], 8)
    assert_greedy_matches(out, want * 3)
    info = acme.get_adapter("lazy-ok")
    assert info.tenant == "acme" and info.version == ops.get_adapter("lazy-ok").version
    # refusals, each with its reason
    assert _code(lambda: acme.generate("x", "no-such-folder")) == grpc.StatusCode.NOT_FOUND
    code, details = _details(lambda: acme.generate("x", "lazy-bad"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lazy registration" in details and "lazy-bad" in details
    code, details = _details(lambda: acme.generate("x", "link-out"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "outside" in details  # a symlink out of its own folder
    assert _code(lambda: acme.generate("x", "secret")) == grpc.StatusCode.NOT_FOUND  # another tenant's folder
    assert _code(lambda: beta.generate("x", "beta-own")) == grpc.StatusCode.NOT_FOUND  # lazy loading is off for beta
    assert _code(lambda: acme.generate("x", "m5")) == grpc.StatusCode.NOT_FOUND  # another tenant's id stays hidden
    # over the tenant's count budget: atlas and three lazy ones fill its 4
    acme.generate("x", "lazy-two", max_tokens=2)
    acme.generate("x", "lazy-three", max_tokens=2)
    shutil.copytree(root / "acme" / "lazy-ok", root / "acme" / "lazy-four")
    code, details = _details(lambda: acme.generate("x", "lazy-four"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
    scrape = env["srv"].scrape()
    assert metric_value(scrape, "mora_adapter_load_seconds_count", tier="source") >= 3
    assert "lazy-four" not in scrape and "no-such-folder" not in scrape


def test_cache_hit_metrics(env, clients):
    beta = clients["beta"]
    for _ in range(3):
        beta.generate("again", "m7", max_tokens=4)
    assert _wait(lambda: metric_value(env["srv"].scrape(), "mora_adapter_cache_hits_total", cache="device") > 0, 10)
    scrape = env["srv"].scrape()
    assert metric_value(scrape, "mora_adapter_cache_hits_total", cache="host") > 0
    assert metric_value(scrape, "mora_adapter_load_seconds_count", tier="host") > 0


def test_merge_under_traffic_records_other_tenants_step_times(env, clients):
    """A manual merge and unmerge of one tenant's adapter while another tenant streams: the other
    tenant's answer stays exact; its token gaps during the transition and the stall gauge are
    recorded (printed, not asserted: they depend on the machine)."""
    ops, beta = clients["ops"], clients["beta"]
    prompt = "steady while merging"
    stream = beta.stream(prompt, "m3", max_tokens=96, ignore_eos=True, temperature=0)
    stamps, tokens = [], []
    first = next(stream)
    tokens.extend(first.token_ids)
    stamps.append(time.monotonic())
    merge = ThreadPoolExecutor(1).submit(lambda: (ops.merge_adapter("atlas"), ops.unmerge_adapter("atlas")))
    for piece in stream:
        tokens.extend(piece.token_ids)
        stamps.append(time.monotonic())
    merge.result()
    want = hf_greedy_scored(env["base"], {"m3": env["root"] / "many" / "m3"}, [(prompt, "m3")], 96)
    assert_greedy_matches([tokens], want)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    scrape = env["srv"].scrape()
    stall = metric_value(scrape, "mora_merge_step_stall_seconds")
    print(f"other tenant's token gaps: median {gaps[len(gaps) // 2] * 1e3:.1f} ms, max {gaps[-1] * 1e3:.1f} ms; "
          f"last merge stall {stall * 1e3:.1f} ms")
    assert stall > 0
    assert metric_value(scrape, "mora_merge_transitions_total", adapter="atlas", direction="merge", trigger="manual") >= 1
    assert not ops.get_adapter("atlas").merged


def test_marked_hot_adapters_are_never_evicted(env, clients):
    """LoadAdapter(pinned=True): admins only, bounded by max_cpu_loras - max_loras, and a pinned
    adapter stays in the host cache while many others page through it."""
    ops, beta = clients["ops"], clients["beta"]
    assert _code(lambda: beta.load_adapter("hot-own", "beta-own", pinned=True)) == grpc.StatusCode.PERMISSION_DENIED
    info = ops.load_adapter("hot1", "borealis", tenant="beta", pinned=True)
    assert info.pinned and ops.get_adapter("atlas").pinned  # --preload pins too
    # atlas and hot1 hold the two pins a 4-adapter host cache with 2 device slots allows
    code, details = _details(lambda: ops.load_adapter("hot2", "borealis", tenant="beta", pinned=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in details, details
    assert _code(lambda: ops.get_adapter("hot2")) == grpc.StatusCode.NOT_FOUND  # refused: nothing left behind
    evictions = metric_value(env["srv"].scrape(), "mora_adapter_evictions_total", cache="host")
    for name in (f"m{i % MANY}" for i in range(100, 100 + 3 * MAX_CPU_LORAS)):
        beta.generate("churn", name, max_tokens=2)
        assert _location(ops, "hot1") != apb.ADAPTER_LOCATION_DISK_ONLY
    assert _wait(lambda: metric_value(env["srv"].scrape(), "mora_adapter_evictions_total", cache="host") > evictions, 10)
    assert not ops.get_adapter("m100").pinned
    ops.unload_adapter("hot1")  # its pin is free again: marked hot through the CLI this time
    from serve.client import main as client_main

    assert client_main(["--target", env["srv"].target, "--api-key", env["keys"]["ops"], "adapters", "load", "hot2",
                        "--path", "borealis", "--tenant", "beta", "--pinned"]) == 0
    assert ops.get_adapter("hot2").pinned
    ops.unload_adapter("hot2")


def test_cold_adapter_never_blocks_warm_ones(env, clients, demo_facts):
    """A request whose adapter is still being read from disk waits outside the engine (the test
    holds the read: it never ends until released), while requests for warm adapters are served;
    the cold one is exact once its read ends."""
    srv, ops, beta = env["srv"], clients["ops"], clients["beta"]
    cold, prompt = "m777", "a cold adapter"
    assert _location(ops, cold) == apb.ADAPTER_LOCATION_DISK_ONLY
    hold = srv.hold_dir / "hold-pagein"
    hold.touch()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: list(beta.generate(prompt, cold, max_tokens=10, temperature=0, ignore_eos=True).token_ids))
            assert _wait(lambda: (srv.hold_dir / "paging").exists(), 60), "the cold request never asked for its page-in"
            for fact in demo_facts["atlas"][:2]:  # another tenant's warm adapter, served meanwhile
                assert clients["acme"].generate(fact["prompt"], "atlas", max_tokens=48, temperature=0).text == fact["completion"]
            assert not pending.done(), "the cold request must still be waiting for its read"
            hold.unlink()
            got = pending.result(timeout=300)
    finally:
        hold.unlink(missing_ok=True)
    want = hf_greedy_scored(env["base"], {cold: env["root"] / "many" / cold}, [(prompt, cold)], 10)
    assert_greedy_matches([got], want)


def test_evicted_adapter_in_the_page_cache_is_queued_without_a_round_trip(env, clients):
    """An adapter gone from the host cache (registered long ago, never requested since) whose
    snapshot is in the page cache (written at registration) is queued at once: no
    `mora_prefetch` (the engine's round trip, served between two steps), the step reads it from
    memory, and it answers exactly."""
    from mora.vllm_plugin.tiers import snapshot_in_page_cache

    srv, ops, beta = env["srv"], clients["ops"], clients["beta"]
    adapter, prompt = "m905", "read from memory"
    assert _location(ops, adapter) == apb.ADAPTER_LOCATION_DISK_ONLY
    assert snapshot_in_page_cache(env["root"] / "many" / adapter)  # this file system answers RWF_NOWAIT reads

    def asked() -> list[str]:
        f = srv.hold_dir / "asked"
        return f.read_text().split() if f.exists() else []

    before = len(asked())
    got = list(beta.generate(prompt, adapter, max_tokens=10, temperature=0, ignore_eos=True).token_ids)
    assert adapter not in asked()[before:], "a snapshot in memory needs no read-in"
    assert _location(ops, adapter) != apb.ADAPTER_LOCATION_DISK_ONLY
    want = hf_greedy_scored(env["base"], {adapter: env["root"] / "many" / adapter}, [(prompt, adapter)], 10)
    assert_greedy_matches([got], want)


def test_page_ins_are_fair_across_tenants(env, clients):
    """A tenant flooding the server with cold adapters has page_ins_per_tenant (2) read at a time;
    another tenant's cold adapter is read beside them, not after the flood. Reads are held by the
    test (they never end until released), so this is about order, not speed."""
    srv, ops, beta, gamma = env["srv"], clients["ops"], clients["beta"], clients["gamma"]
    ops.load_adapter("gamma-cold", "many/m888", tenant="gamma")
    for i in range(200, 200 + MAX_CPU_LORAS + 1):  # push it out of the 4-adapter host cache
        beta.generate("churn", f"m{i}", max_tokens=2)
    assert _wait(lambda: _location(ops, "gamma-cold") == apb.ADAPTER_LOCATION_DISK_ONLY, 10)
    flood = [f"m{i}" for i in range(300, 306)]
    hold = srv.hold_dir / "hold-pagein"
    (srv.hold_dir / "prefetched").unlink(missing_ok=True)
    hold.touch()

    def prefetched() -> set[str]:
        f = srv.hold_dir / "prefetched"
        return set(f.read_text().split()) if f.exists() else set()

    def page_ins(state: str, tenant: str) -> float:
        return metric_value(srv.scrape(), "mora_adapter_page_ins", tenant=tenant, state=state)

    try:
        with ThreadPoolExecutor(len(flood) + 1) as pool:
            floods = [pool.submit(beta.generate, "flood", a, max_tokens=4, ignore_eos=True) for a in flood]
            assert _wait(lambda: page_ins("reading", "beta") == 2 and page_ins("waiting", "beta") == len(flood) - 2, 60)
            assert len(prefetched() & set(flood)) == 2, prefetched()
            mine = pool.submit(gamma.generate, "mine", "gamma-cold", max_tokens=4, ignore_eos=True)
            assert _wait(lambda: "gamma-cold" in prefetched(), 60), "gamma's read must not wait for beta's flood"
            assert len(prefetched() & set(flood)) == 2, "beta still reads two at a time"
            hold.unlink()
            # every one answered in full (4 tokens; their text may decode to nothing)
            assert len(mine.result(timeout=300).token_ids) == 4
            assert all(len(f.result(timeout=300).token_ids) == 4 for f in floods)
    finally:
        hold.unlink(missing_ok=True)
    assert _wait(lambda: page_ins("reading", "beta") == 0 and page_ins("waiting", "beta") == 0, 10)
    ops.unload_adapter("gamma-cold")
