"""Load and churn against a real `mora-serve` on loopback.

N client threads (streaming and unary) send greedy requests to 16+ adapters with zipf
popularity while a churn thread, every second, loads/unloads adapters, replaces one with new
weights, and merges/unmerges (the automatic policy is on too). Every answer is checked against
the transformers reference (`mora.hf`) computed up front, so a wrong or stale answer, or an
unloaded adapter answered with another adapter's weights, is caught. Then an overload burst
(shed with RESOURCE_EXHAUSTED, fast) and SIGTERM under load (every in-flight request completes
or gets UNAVAILABLE). The server's RSS (with its engine processes) is sampled after warm-up and
at the end.

    python -m bench.load --quick   # bounded to < 10 minutes on 2 CPU cores
    python -m bench.load           # 64 clients, 10k+ requests

Ends with: requests=N failed=F wrong=W rss_growth_pct=R
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the loopback server harness shared with the tests

TOKENS = 8
CANDIDATE_PROMPTS = ["hello world", "The secret code of vault is ", "abc", "MoRA serves", "zebra 42", "q", "tenant traffic", "x y z"]


@dataclass
class Outcome:
    adapter: str
    code: str
    latency: float
    ttft: float | None
    tokens: int
    wrong: bool
    started: float
    detail: str = ""


@dataclass
class Shared:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    shutting_down: threading.Event = field(default_factory=threading.Event)
    reload_done: dict[str, tuple[float, str]] = field(default_factory=dict)  # adapter -> (time, version name)
    loaded: dict[str, bool] = field(default_factory=dict)
    churn_done: Counter = field(default_factory=Counter)  # lifecycle operation -> times it succeeded
    churn_errors: list[str] = field(default_factory=list)


def _references(base: Path, dirs: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    """Greedy reference tokens per (adapter dir, prompt), keeping prompts with a clear margin."""
    from engine_helpers import hf_greedy_scored

    jobs = [(prompt, name) for name in dirs for prompt in CANDIDATE_PROMPTS]
    refs: dict[str, dict[str, list[int]]] = {name: {} for name in dirs}
    for (prompt, name), (tokens, margins) in zip(jobs, hf_greedy_scored(base, dirs, jobs, TOKENS), strict=True):
        if min(margins) > 0.05:  # far from a tie: batching-order rounding cannot flip it
            refs[name][prompt] = tokens
    # both versions of the reloaded adapter are asked the same prompts
    versions = [n for n in refs if n.startswith("churn-")]
    common = [p for p in CANDIDATE_PROMPTS if all(p in refs[v] for v in versions)]
    for name in refs:
        keep = common if name in versions else list(refs[name])
        if not keep:
            raise RuntimeError(f"no prompt of {CANDIDATE_PROMPTS} has a clear greedy margin for {name}")
        refs[name] = {p: refs[name][p] for p in keep[:3]}
    return refs


def _prepare(cache: Path, n_adapters: int) -> tuple[Path, Path, dict[str, dict[str, list[int]]], list[str]]:
    from engine_helpers import random_mora

    from mora.demo import build_demo_assets

    demo = cache / "demo"
    if not (demo / "demo.json").is_file():
        build_demo_assets(demo, log=lambda _: None)
    base = demo / "base"
    root = cache / "load-adapters"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dirs: dict[str, Path] = {}
    for i in range(n_adapters):
        name = f"a{i:02d}"
        random_mora(base, root / name, mora_type=(6, 1, 4, 6)[i % 4], r=(4, 8)[i % 2], seed=100 + i, scale=0.08)
        dirs[name] = root / name
    for name, seed in (("churn-v1", 500), ("churn-v2", 501), ("ephemeral", 502)):
        random_mora(base, root / name, mora_type=6, r=4, seed=seed, scale=0.08)
        dirs[name] = root / name
    refs = _references(base, dirs)
    popular = [n for n in dirs if n.startswith("a")]
    return base, root, refs, popular


def _client_loop(srv, shared: Shared, refs, names: list[str], weights: list[float], seed: int) -> None:
    rng = random.Random(seed)
    with srv.client(timeout=120) as c:
        while not shared.stop.is_set():
            name = rng.choices(names, weights)[0]
            prompts = refs["churn-v1" if name == "churn" else name]
            prompt = rng.choice(list(prompts))
            started = time.monotonic()
            stream = rng.random() < 0.5
            ttft, tokens, code = None, [], "OK"
            try:
                if stream:
                    for piece in c.stream(prompt, name, max_tokens=TOKENS, temperature=0, ignore_eos=True):
                        if ttft is None and piece.token_ids:
                            ttft = time.monotonic() - started
                        tokens.extend(piece.token_ids)
                else:
                    tokens = list(c.generate(prompt, name, max_tokens=TOKENS, temperature=0, ignore_eos=True).token_ids)
            except grpc.RpcError as e:
                code = e.code().name
            latency = time.monotonic() - started
            wrong = False
            if code == "OK":
                if name == "churn":
                    done_at, version = shared.reload_done.get("churn", (0.0, "churn-v1"))
                    allowed = [refs[version][prompt]] if started > done_at else [refs["churn-v1"][prompt], refs["churn-v2"][prompt]]
                    wrong = tokens not in allowed  # stale weights after a reload returned
                else:
                    wrong = tokens != refs[name][prompt]
            with shared.lock:
                detail = f"{prompt!r} stream={stream} got {tokens}" if wrong else ""
                shared.outcomes.append(Outcome(name, code, latency, ttft, len(tokens), wrong, started, detail))


def _churn_loop(srv, shared: Shared, popular: list[str], interval: float) -> None:
    rng = random.Random(7)
    version = "churn-v1"
    with srv.client() as c:
        while not shared.stop.wait(interval) and not shared.shutting_down.is_set():
            action = rng.choice(["reload", "ephemeral", "merge", "unmerge"])
            try:
                if action == "reload":
                    version = "churn-v2" if version == "churn-v1" else "churn-v1"
                    c.load_adapter("churn", version, replace=True)
                    shared.reload_done["churn"] = (time.monotonic(), version)
                elif action == "ephemeral":
                    if shared.loaded.get("ephemeral"):
                        c.unload_adapter("ephemeral")
                        shared.loaded["ephemeral"] = False
                    else:
                        c.load_adapter("ephemeral", "ephemeral")
                        shared.loaded["ephemeral"] = True
                elif action == "merge":
                    c.merge_adapter(rng.choice(popular[:4]))
                else:
                    for a in popular[:4]:
                        c.unmerge_adapter(a, automatic=True)
                shared.churn_done[action] += 1
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # unload refused while busy is allowed
                    shared.churn_done[f"{action} refused (busy)"] += 1
                elif not shared.shutting_down.is_set():
                    shared.churn_errors.append(f"churn {action}: {e.code().name}: {e.details()}")
                    print(shared.churn_errors[-1], flush=True)


def _rss(proc: psutil.Process) -> dict[str, int]:
    """Resident memory of the server process and of each vLLM process it started, by name."""
    out = {"server": proc.memory_info().rss}
    for child in proc.children(recursive=True):
        try:
            name = child.name() or "child"
            out[name] = out.get(name, 0) + child.memory_info().rss
        except psutil.Error:
            pass
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main(argv: list[str] | None = None) -> int:
    from server_helpers import ServerProcess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 clients, bounded to < 10 minutes")
    p.add_argument("--clients", type=int)
    p.add_argument("--duration", type=float, help="seconds of load (default: until --requests)")
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--churn-interval", type=float, default=1.0, help="seconds between lifecycle operations")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    args = p.parse_args(argv)
    clients = args.clients or (16 if args.quick else 64)
    target_requests = args.requests or (2500 if args.quick else 10000)
    max_duration = args.duration or (300 if args.quick else 1800)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.monotonic()
    base, root, refs, popular = _prepare(args.cache, args.adapters)
    print(f"prepared {len(refs)} adapters and their references in {time.monotonic() - t0:.0f}s", flush=True)
    srv = ServerProcess(base, root, args.cache / "load-server.log", args=[
        "--max-loras", "8", "--max-cpu-loras", str(args.adapters + 8), "--preload", *[f"{a}={a}" for a in popular], "churn=churn-v1",
    ], env={"MORA_SERVE_MAX_PENDING_REQUESTS": str(2 * clients), "MORA_SERVE_SHUTDOWN_GRACE_S": "20",
            "MORA_SERVE_MERGE_MIN_REQUESTS": "32", "MORA_SERVE_UNLOAD_TIMEOUT_S": "2"})
    srv.wait_serving()
    server_proc = psutil.Process(srv.proc.pid)
    names = [*popular, "churn", "ephemeral"]
    zipf = [1.0 / (i + 1) for i in range(len(popular))] + [0.3, 0.2]
    shared = Shared()
    workers = [threading.Thread(target=_client_loop, args=(srv, shared, refs, names, zipf, i), daemon=True) for i in range(clients)]
    churn = threading.Thread(target=_churn_loop, args=(srv, shared, popular, args.churn_interval), daemon=True)
    start = time.monotonic()
    for w in workers:
        w.start()
    churn.start()
    warm_rss = None
    timeline: list[tuple[int, dict[str, int]]] = []
    while True:
        time.sleep(1.0)
        n = len(shared.outcomes)
        if warm_rss is None and n >= max(200, target_requests // 10):
            warm_rss = _rss(server_proc)
            warm_at = n
        if warm_rss is not None and n >= warm_at + len(timeline) * max(1, target_requests // 10):
            timeline.append((n, _rss(server_proc)))
        if n >= target_requests or time.monotonic() - start > max_duration:
            break
    end_rss = _rss(server_proc)
    timeline.append((len(shared.outcomes), end_rss))
    elapsed = time.monotonic() - start
    main_outcomes = list(shared.outcomes)

    # overload: on top of the steady clients, a burst that exceeds the admission limit (2x clients); the surplus must be shed, fast
    with ThreadPoolExecutor(3 * clients) as pool, srv.client(timeout=120) as c:
        def one(i: int) -> tuple[str, float]:
            t = time.monotonic()
            try:
                c.generate("hello world", popular[0], max_tokens=TOKENS, temperature=0, ignore_eos=True)
                return "OK", time.monotonic() - t
            except grpc.RpcError as e:
                return e.code().name, time.monotonic() - t
        burst = list(pool.map(one, range(3 * clients)))

    # SIGTERM under load: every in-flight request completes or gets UNAVAILABLE
    before = len(shared.outcomes)
    time.sleep(1.0)
    shared.shutting_down.set()
    srv.proc.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    code = srv.proc.wait(timeout=120)
    shared.stop.set()
    for w in workers:
        w.join(timeout=30)
    at_shutdown = [o for o in shared.outcomes[before:] if o.started <= sigterm_at]
    expected = {("ephemeral", "NOT_FOUND")}  # asked for while unloaded: refused, as it must be
    shutdown_bad = [o for o in at_shutdown if o.code not in ("OK", "UNAVAILABLE") and (o.adapter, o.code) not in expected]

    # report
    by_code = Counter(o.code for o in main_outcomes)
    failed = [o for o in main_outcomes if o.code != "OK" and (o.adapter, o.code) not in expected]
    wrong = [o for o in main_outcomes if o.wrong]
    ok = [o for o in main_outcomes if o.code == "OK"]
    tokens = sum(o.tokens for o in ok)
    print(f"\n{len(main_outcomes)} requests in {elapsed:.0f}s from {clients} clients: {len(main_outcomes) / elapsed:.1f} req/s, "
          f"{tokens / elapsed:.0f} tokens/s; codes {dict(by_code)}")
    per: dict[str, list[Outcome]] = defaultdict(list)
    for o in ok:
        per[o.adapter].append(o)
    print(f"{'adapter':10} {'n':>6} {'ttft p50':>9} {'p95':>7} {'p99':>7} {'lat p50':>8} {'p95':>7} {'p99':>7}")
    for name in sorted(per, key=lambda a: -len(per[a])):
        ts = [o.ttft for o in per[name] if o.ttft is not None]
        ls = [o.latency for o in per[name]]
        print(f"{name:10} {len(per[name]):6d} {_pct(ts, .5):9.3f} {_pct(ts, .95):7.3f} {_pct(ts, .99):7.3f} "
              f"{_pct(ls, .5):8.3f} {_pct(ls, .95):7.3f} {_pct(ls, .99):7.3f}")
    shed = [t for c_, t in burst if c_ == "RESOURCE_EXHAUSTED"]
    admitted = [t for c_, t in burst if c_ == "OK"]
    print(f"overload burst of {len(burst)}: {Counter(c_ for c_, _ in burst)}; shed in p99 {_pct(shed, .99) * 1e3:.1f} ms; "
          f"admitted p99 latency {_pct(admitted, .99):.2f}s (vs {_pct([o.latency for o in ok], .99):.2f}s under normal load)")
    print(f"SIGTERM under load: exit code {code}; {len(at_shutdown)} requests in flight, "
          f"{Counter(o.code for o in at_shutdown)}; bad: {len(shutdown_bad)}")
    growth = float("nan")
    if warm_rss:
        growth = 100.0 * (sum(end_rss.values()) - sum(warm_rss.values())) / sum(warm_rss.values())
        print(f"RSS after warm-up ({warm_at} requests) -> end ({len(main_outcomes)}): total {sum(warm_rss.values()) / 2**20:.0f} -> "
              f"{sum(end_rss.values()) / 2**20:.0f} MiB ({growth:+.1f}%); "
              + ", ".join(f"{k} {warm_rss.get(k, 0) / 2**20:.0f} -> {v / 2**20:.0f}" for k, v in end_rss.items()))
        print("RSS timeline (requests: MiB total): " + ", ".join(f"{n}: {sum(r.values()) / 2**20:.0f}" for n, r in timeline))
    else:
        print("RSS: not enough requests to warm up")
    if wrong:
        print(f"WRONG answers by adapter: {dict(Counter(o.adapter for o in wrong))}")
        for o in wrong[:5]:
            print(f"  e.g. {o.adapter}: {o.detail}; expected {refs['churn-v1' if o.adapter == 'churn' else o.adapter]}")
    if failed:
        print(f"FAILED by adapter/code: {dict(Counter((o.adapter, o.code) for o in failed))}")
    print(f"lifecycle operations during the load: {dict(shared.churn_done)}; errors: {len(shared.churn_errors)}")
    failed_total = len(failed) + len(shutdown_bad) + (code != 0) + (not shed) + len(shared.churn_errors)
    print(f"requests={len(main_outcomes)} failed={failed_total} wrong={len(wrong)} rss_growth_pct={growth:.1f}")
    return 0 if failed_total == 0 and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
