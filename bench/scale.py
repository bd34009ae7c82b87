"""Thousands of adapters on one real `mora-serve`: disk -> host cache -> device slots under load.

Registers >= 1,000 MoRA adapters (types 1 and 6) on a small Llama-shaped model and serves
zipf(1.0) traffic from 64 clients, on three servers one after the other:

1. `max_loras=16`: what adapter-aware admission (vLLM admits requests whose adapter has a slot
   ahead of one whose adapter has none; mora's scheduler bounds how often a request is passed
   over) makes of spread traffic: the share of the requests in the engine that its steps run
   (`share_16`: running / running + waiting, averaged over time) on this server and on one with
   strict arrival order (`--admission-max-passes 0`, `share_16_strict`; `admission_gain` the
   ratio), against the share one 16-slot step can hold of a fresh draw of this traffic admitted
   in arrival order (`share_fcfs`) and at best (`share_best`); and the traffic folded onto 16
   adapters, for phase 2's slot cost. A closed loop runs below the fresh-draw bounds: the
   requests left waiting are those whose adapters found no slot, and their clients stay stuck
   while the served ones come back with new (mostly hot) requests.
2. `max_loras auto`: as many slots as `--slots-bytes` holds for this model (`slots=`), the same
   traffic, measured side by side:

* `tput_vs_16`: requests per second over all the adapters, relative to the same traffic folded
  onto the 16 hottest adapters only (nothing to page);
* the folded traffic's throughput against phase 1's (what the extra idle slots cost);
* `p50_ttft_warm_ms` (adapter requested before) and `p99_ttft_cold_ms` (first request of an
  adapter: read from its snapshot on disk);
* `wrong`: answers that differ from the transformers reference (`mora.hf`), on every request
  whose (adapter, prompt) is in a reference sample of >= 200 pairs (hot and cold adapters);
* `rss_mb` of the server and its engine processes after the spread traffic, against
  `rss_bound_mb`: the RSS after the same traffic folded onto 16 adapters (every buffer and
  kernel a batch needs is allocated then, nothing paged) plus the host cache's bound
  (`max_cpu_loras` adapters) plus a constant;
* `merge_stall_p99_vs_normal`: p99 of one stream's token gaps while another adapter is merged
  and unmerged by the manual RPCs, over its p99 without merges.

    python -m bench.scale --quick   # the demo model, < 20 minutes on 2 CPU cores
    python -m bench.scale           # the 100M model of bench.serving
    python -m bench.scale --quick --isa avx2   # as on a CPU without AVX-512 (bench.isa)

Ends with one line: adapters= requests= failed= wrong= slots= p50_ttft_warm_ms= p99_ttft_cold_ms=
tput_vs_16= tput_vs_16_in_16_slots= share_16= share_16_strict= admission_gain= share_fcfs= share_best=
rss_mb= rss_bound_mb=
merge_stall_p99_vs_normal= isa= (the native kernel's path; then `emulated=avx2` when `--isa avx2`
runs everything as a CPU without AVX-512 does)
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from bench.isa import add_isa_argument, emulated, isa_held, run_on
from mora.kernels.native import native_isa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the loopback server harness shared with the tests

TOKENS = 8
PROMPTS = ["hello world", "MoRA serves", "tenant traffic"]
MAX_LORAS, MAX_CPU_LORAS, CLIENTS = 16, 64, 64
SLOTS_BYTES = 96 << 20  # the default slot budget: about 80 slots of the demo model (1.2 MB each in float32)
TIE_MARGIN = 1e-3
RSS_CONSTANT_MB = 256  # allocator slack, gRPC buffers, Python objects of the registry


def _zipf(n: int) -> list[float]:
    """zipf(1.0) weights of `n` adapters, rank 1 the hottest: the traffic and both of its models."""
    return [1.0 / (k + 1) for k in range(n)]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def _rss(pid: int) -> int:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def _prepare(cache: Path, quick: bool, n: int) -> tuple[Path, Path, list[str]]:
    from engine_helpers import random_mora

    from mora.demo import build_demo_assets

    if quick:
        demo = cache / "demo"
        if not (demo / "demo.json").is_file():
            build_demo_assets(demo, log=lambda _: None)
        base = demo / "base"
    else:
        from bench.serving import _larger_model

        base = _larger_model(cache / "model-100m")
    root = cache / f"scale-adapters-{'quick' if quick else 'full'}"
    names = [f"s{i:04d}" for i in range(n)]
    if not (root / names[-1] / "adapter_config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for i, name in enumerate(names):
            random_mora(base, root / name, mora_type=(1, 6)[i % 2], r=(4, 8)[i % 2], seed=10_000 + i, scale=0.08,
                        targets=("q_proj", "v_proj"))
    return base, root, names


def _references(base: Path, root: Path, sample: list[str]) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    from engine_helpers import hf_greedy_scored

    jobs = [(p, a) for a in sample for p in PROMPTS]
    out = hf_greedy_scored(base, {a: root / a for a in sample}, jobs, TOKENS)
    return {(a, p): ref for (p, a), ref in zip(jobs, out, strict=True)}


def _is_wrong(got: list[int], ref: tuple[list[int], list[float]]) -> bool:
    want, margins = ref
    if len(got) != len(want):
        return True
    first = next((k for k, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    return first is not None and margins[first] >= TIE_MARGIN  # a flip only at a reference near-tie


class Traffic:
    """64 clients, zipf(1.0) over `names` (rank 1 the hottest), streaming greedy requests."""

    def __init__(self, srv, names: list[str], refs: dict, fold_to: int | None = None) -> None:
        self.srv, self.names, self.refs, self.fold_to = srv, names, refs, fold_to
        self.lock = threading.Lock()
        self.records: list[tuple[str, str, float | None, bool, str]] = []  # adapter, code, ttft, cold, wrong?
        self.seen: set[str] = set()
        self.checked = 0
        self.wrong = 0
        self.ok = 0  # completed requests and seconds of the measured runs (warm-up runs excluded)
        self.elapsed = 0.0
        self.batch: list[float] = []  # vLLM's running batch, sampled during the measured runs
        self.waiting: list[float] = []  # and its waiting queue, at the same moments
        self.queued_s = 0.0  # seconds the measured runs' requests waited in the engine, and ran
        self.running_s = 0.0

    def _client(self, seed: int, stop: threading.Event) -> None:
        rng = random.Random(seed)
        weights = _zipf(len(self.names))
        with self.srv.client(timeout=300) as c:
            while not stop.is_set():
                rank = rng.choices(range(len(self.names)), weights)[0]
                if self.fold_to is not None:
                    rank %= self.fold_to
                adapter, prompt = self.names[rank], rng.choice(PROMPTS)
                with self.lock:
                    cold = adapter not in self.seen
                    self.seen.add(adapter)
                started, ttft, tokens, code = time.monotonic(), None, [], "OK"
                try:
                    for piece in c.stream(prompt, adapter, max_tokens=TOKENS, temperature=0, ignore_eos=True):
                        if ttft is None and piece.token_ids:
                            ttft = time.monotonic() - started
                        tokens.extend(piece.token_ids)
                except grpc.RpcError as e:
                    code = e.code().name
                ref = self.refs.get((adapter, prompt))
                with self.lock:
                    self.records.append((adapter, code, ttft, cold, ""))
                    if code == "OK" and ref is not None:
                        self.checked += 1
                        self.wrong += _is_wrong(tokens, ref)

    def run(self, seconds: float, measured: bool = True) -> None:
        """`seconds` of traffic from CLIENTS clients; a warm-up run (`measured=False`) is checked
        for wrong answers but counts in no throughput or running batch."""
        stop = threading.Event()
        threads = [threading.Thread(target=self._client, args=(i, stop), daemon=True) for i in range(CLIENTS)]
        done_before = sum(r[1] == "OK" for r in self.records)
        sampler = Sampler(self.srv) if measured else None
        engine_before = _engine_seconds(self.srv) if measured else (0.0, 0.0)
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        if sampler is not None:
            sampler.stop()
            self.batch.extend(sampler.values)
            self.waiting.extend(sampler.waiting)
            # Every request of the run has finished (its client joined); the front end records a
            # finished request's times just after its last output, hence the pause.
            time.sleep(0.5)
            queued, running = _engine_seconds(self.srv)
            self.queued_s += queued - engine_before[0]
            self.running_s += running - engine_before[1]
            self.ok += sum(r[1] == "OK" for r in self.records) - done_before
            self.elapsed += time.monotonic() - started

    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed else float("nan")

    def mean_batch(self) -> float:
        return sum(self.batch) / len(self.batch) if self.batch else float("nan")

    def share(self) -> float:
        """The share of the requests the engine holds that its steps run (running / running +
        waiting), averaged over the measured runs: by Little's law, the seconds the requests ran
        over their seconds in the engine, summed over every request (not sampled)."""
        held = self.queued_s + self.running_s
        return self.running_s / held if held else float("nan")


def _engine_seconds(srv) -> tuple[float, float]:
    """vLLM's running sums over its finished requests: seconds waiting to be scheduled (queued to
    first scheduled) and seconds running (first scheduled to last token), from /metrics."""
    from server_helpers import metric_value

    names = ("vllm:request_queue_time_seconds_sum", "vllm:request_inference_time_seconds_sum")
    scrape = srv.scrape(names=names)
    return metric_value(scrape, names[0]), metric_value(scrape, names[1])


def alternate(folded: Traffic, spread: Traffic, seconds: float, rounds: int) -> None:
    """Both traffics, `seconds` each in all, in alternating runs after a warm-up (the server's
    first steps at each batch size compile): side by side, so drift hits both alike."""
    folded.run(min(10.0, seconds / 4), measured=False)
    for _ in range(rounds):
        folded.run(seconds / rounds)
        spread.run(seconds / rounds)


class Sampler:
    """vLLM's running batch and waiting queue (`vllm:num_requests_running`, `_waiting`),
    sampled from /metrics."""

    def __init__(self, srv, every: float = 2.0) -> None:
        from server_helpers import metric_value

        self.values: list[float] = []
        self.waiting: list[float] = []
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(every):
                try:
                    # The two gauges only: a whole scrape renders every adapter's series, ~0.3 s
                    # of a core with 1,000 adapters in use, which the spread traffic would pay.
                    scrape = srv.scrape(names=("vllm:num_requests_running", "vllm:num_requests_waiting"))
                    self.values.append(metric_value(scrape, "vllm:num_requests_running"))
                    self.waiting.append(metric_value(scrape, "vllm:num_requests_waiting"))
                except Exception:  # noqa: BLE001 - a missed sample
                    pass

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def slot_bound(n: int, best: bool = False, trials: int = 2000) -> float:
    """The fraction of CLIENTS concurrent zipf(1.0) requests over `n` adapters that one step with
    MAX_LORAS adapter slots can hold (1.0 for the traffic folded onto MAX_LORAS adapters):
    admitted in arrival order while a slot is free or their adapter has one, or (`best`) the
    MAX_LORAS adapters with the most requests."""
    from collections import Counter

    rng = random.Random(1)
    weights = _zipf(n)
    held = 0
    for _ in range(trials):
        ranks = rng.choices(range(n), weights, k=CLIENTS)
        if best:
            held += sum(c for _, c in Counter(ranks).most_common(MAX_LORAS))
            continue
        slots: set[int] = set()
        for r in ranks:
            if r in slots or len(slots) < MAX_LORAS:
                slots.add(r)
                held += 1
    return held / (trials * CLIENTS)


def closed_loop_share(n: int, strict: bool, steps: int = 4000) -> float:
    """A model of the 16-slot phase, for comparison with the measured shares: CLIENTS clients
    that each keep one zipf(1.0) request over `n` adapters in the engine; a request runs TOKENS
    steps once admitted; each step admits waiting requests in arrival order while their adapter
    has a slot or one is free, skipping the others (vLLM's admission) or, `strict`, stopping at
    the first. Returns the running share averaged over the steps (the slot bounds of a fresh
    draw, `slot_bound`, ignore that the requests left waiting are the unlucky ones)."""
    rng = random.Random(1)
    weights = _zipf(n)
    waiting = rng.choices(range(n), weights, k=CLIENTS)  # adapters, in arrival order
    running: list[list[int]] = []  # [adapter, steps left]
    ran = 0
    for _ in range(steps):
        slots = {a for a, _ in running}
        left = []
        for i, a in enumerate(waiting):
            if a in slots or len(slots) < MAX_LORAS:
                slots.add(a)
                running.append([a, TOKENS])
            elif strict:
                left = waiting[i:]
                break
            else:
                left.append(a)
        ran += len(running)
        for r in running:
            r[1] -= 1
        done = sum(r[1] == 0 for r in running)
        running = [r for r in running if r[1] > 0]
        waiting = left + rng.choices(range(n), weights, k=done)
    return ran / (steps * CLIENTS)


def _token_gaps(srv, adapter: str, seconds: float, merging: str | None) -> list[float]:
    """Gaps between one stream's tokens for `seconds`, while `merging` is merged and unmerged."""
    stop = threading.Event()
    gaps: list[float] = []

    def probe() -> None:
        with srv.client(timeout=300) as c:
            while not stop.is_set():
                last = None
                for piece in c.stream("steady stream", adapter, max_tokens=64, temperature=0, ignore_eos=True):
                    now = time.monotonic()
                    if last is not None and piece.token_ids:
                        gaps.append((now - last) / len(piece.token_ids))
                    last = now

    def churn() -> None:
        with srv.client(timeout=300) as c:
            while not stop.is_set():
                c.merge_adapter(merging)
                time.sleep(0.5)
                c.unmerge_adapter(merging)
                time.sleep(0.5)

    threads = [threading.Thread(target=probe, daemon=True)]
    if merging is not None:
        threads.append(threading.Thread(target=churn, daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return gaps


def _cdf(seconds: list[float], points: int = 300) -> tuple[list[float], list[float]]:
    """An empirical CDF in milliseconds, at most `points` points (keeps the SVG small)."""
    xs = sorted(x * 1e3 for x in seconds)
    idx = sorted({min(len(xs) - 1, round(k * (len(xs) - 1) / (points - 1))) for k in range(points)})
    return [xs[i] for i in idx], [(i + 1) / len(xs) for i in idx]


def _plot(path: Path, warm: list[float], cold: list[float], hot: list[float], tput_all: float, tput_16: float,
          normal: list[float], merging: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft, gaps, tput) = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2, 2, 1]})
    for xs, label in ((hot, "16 hottest only"), (warm, "1,000: adapter seen before"), (cold, "1,000: first request (disk)")):
        if xs:
            ttft.plot(*_cdf(xs), label=f"{label} (n={len(xs)})")
    ttft.set(xscale="log", xlabel="time to first token (ms)", ylabel="fraction of requests", title="TTFT")
    ttft.legend(fontsize=8)
    for xs, label in ((normal, "no merge"), (merging, "merge/unmerge every 0.5 s")):
        if xs:
            gaps.plot(*_cdf(xs), label=label)
    gaps.set(xlabel="gap between a stream's tokens (ms)", title="another tenant's stream during merges")
    gaps.legend(fontsize=8)
    tput.bar(["16 hottest", "1,000"], [tput_16, tput_all], color=["tab:gray", "tab:blue"])
    tput.set(ylabel="requests / s", title="throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg")
    plt.close(fig)


def _serve(base: Path, root: Path, names: list[str], log: Path, slots: list[str], extra: list[str]) -> object:
    from server_helpers import ServerProcess

    srv = ServerProcess(base, root, log, args=[
        *slots, *extra, "--max-cpu-loras", str(MAX_CPU_LORAS), "--max-adapters", str(len(names) + 16),
        "--max-num-seqs", str(CLIENTS), "--max-pending-requests", str(4 * CLIENTS), "--no-auto-merge", "--max-lora-rank", "8"])
    srv.wait_serving()
    return srv


def _sixteen_slots(base: Path, root: Path, names: list[str], refs: dict, log: Path, extra: list[str],
                   seconds: float, rounds: int) -> tuple[Traffic, Traffic]:
    """The folded and the spread traffic, alternated on a server with MAX_LORAS slots."""
    srv = _serve(base, root, names, log, ["--max-loras", str(MAX_LORAS)], extra)
    try:
        _register(srv, names)
        folded, spread = Traffic(srv, names, refs, fold_to=16), Traffic(srv, names, refs)
        alternate(folded, spread, seconds, rounds)
        return folded, spread
    finally:
        srv.stop()


def _register(srv, names: list[str]) -> float:
    with srv.client(timeout=300) as c, ThreadPoolExecutor(4) as pool:
        t = time.monotonic()
        list(pool.map(lambda a: c.load_adapter(a, a), names))
        return time.monotonic() - t


def _slots(srv) -> int:
    from server_helpers import metric_value

    return int(metric_value(srv.scrape(), "mora_adapter_slots_capacity"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo model and shorter phases (< 15 min on 2 cores)")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=None, help="length of each traffic phase")
    p.add_argument("--rounds", type=int, default=4, help="alternating runs of the folded and the spread traffic")
    p.add_argument("--slots-bytes", type=int, default=SLOTS_BYTES,
                   help="the server's adapter_slots_bytes (max_loras auto: slots sized by this memory budget)")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    p.add_argument("--plot", type=Path, default=None, help="write an SVG: TTFT distributions and throughput per phase")
    p.add_argument("--server-arg", dest="server_args", action="append", default=[],
                   help="one more mora-serve argument for both servers (repeatable: --server-arg=--page-ins-per-tenant=8)")
    add_isa_argument(p)
    args = p.parse_args(argv)
    if args.isa:
        run_on(args.isa, "bench.scale", sys.argv[1:] if argv is None else argv)
    if isa_held():
        print(isa_held(), flush=True)
    seconds = args.seconds or (40.0 if args.quick else 120.0)
    args.cache.mkdir(parents=True, exist_ok=True)
    base, root, names = _prepare(args.cache, args.quick, args.adapters)
    rng = random.Random(0)
    # reference sample: the 70 hottest adapters and 30 cold ones, 3 prompts each (>= 200 pairs)
    sample = names[:70] + rng.sample(names[70:], min(30, max(0, len(names) - 70)))
    refs = _references(base, root, sample)
    adapter_bytes = max(sum(f.stat().st_size for f in (root / a).iterdir()) for a in names[:2])

    # 1. MAX_LORAS slots: what adapter-aware admission (vLLM's skip + mora's bound) makes of
    #    spread traffic in 16 slots, against the FCFS and best-16 bounds; and the folded traffic's
    #    throughput there (the cost of idle slots is phase 2's over this).
    hot16, spread16 = _sixteen_slots(base, root, names, refs, args.cache / "scale-server-16.log", args.server_args,
                                     seconds / 2, args.rounds)
    # 1b. the same in strict arrival order (no request passed over): what admission gains.
    hot_strict, spread_strict = _sixteen_slots(base, root, names, refs, args.cache / "scale-server-strict.log",
                                               [*args.server_args, "--admission-max-passes", "0"], seconds / 2,
                                               args.rounds)
    # 2. max_loras auto: the slot count the memory budget gives, the same traffic.
    srv = _serve(base, root, names, args.cache / "scale-server.log",
                 ["--max-loras", "auto", "--adapter-slots-bytes", str(args.slots_bytes)], args.server_args)
    try:
        slots = _slots(srv)
        rss_before = _rss(srv.proc.pid)
        register_s = _register(srv, names)
        rss_registered = _rss(srv.proc.pid)
        hot, spread = Traffic(srv, names, refs, fold_to=16), Traffic(srv, names, refs)
        hot.run(min(10.0, seconds / 4), measured=False)
        hot.run(seconds / args.rounds)
        rss_warm = _rss(srv.proc.pid)  # every buffer a batch needs is allocated, nothing paged
        spread.run(seconds / args.rounds)
        for _ in range(args.rounds - 1):
            hot.run(seconds / args.rounds)
            spread.run(seconds / args.rounds)
        rss = _rss(srv.proc.pid)
        normal = _token_gaps(srv, names[0], seconds / 2, None)
        merging = _token_gaps(srv, names[0], seconds / 2, names[1])
    finally:
        srv.stop()
    tput_16_on_16, tput_all_on_16 = hot16.throughput(), spread16.throughput()
    tput_16, tput_all = hot.throughput(), spread.throughput()

    traffics = (spread, hot, spread16, hot16, spread_strict, hot_strict)
    records = [r for t in traffics for r in t.records]
    failed = sum(r[1] != "OK" for r in records)
    wrong = sum(t.wrong for t in traffics)
    checked = sum(t.checked for t in traffics)
    gain = spread16.share() / spread_strict.share()
    tput_strict = spread_strict.throughput() / hot_strict.throughput()
    warm = [r[2] for r in spread.records if r[1] == "OK" and r[2] is not None and not r[3]]
    cold = [r[2] for r in spread.records if r[1] == "OK" and r[2] is not None and r[3]]
    bound = rss_warm + max(MAX_CPU_LORAS, slots) * adapter_bytes + (RSS_CONSTANT_MB << 20)
    print(f"registered {len(names)} adapters in {register_s:.1f}s; checked {checked} answers against the reference; "
          f"{len(cold)} cold first requests; rss {rss_before >> 20} MB before registering, {rss_registered >> 20} MB after "
          f"({(rss_registered - rss_before) / len(names) / 1024:.0f} KB per registered adapter), {rss_warm >> 20} MB "
          f"after the 16-adapter traffic", flush=True)
    # With max_loras slots a step holds requests of at most that many adapters: on a model whose
    # step time hardly grows with the batch, throughput follows the running batch.
    fcfs, best = slot_bound(len(names)), slot_bound(len(names), best=True)
    print(f"{MAX_LORAS} slots: running batch {spread16.mean_batch():.1f} of {CLIENTS} clients, "
          f"{sum(spread16.waiting) / max(len(spread16.waiting), 1):.1f} waiting "
          f"(share run {spread16.share():.2f}, {closed_loop_share(len(names), False):.2f} in a closed-loop model; bounds "
          f"of a fresh draw of this traffic in {MAX_LORAS} slots: {fcfs:.2f} FCFS, {best:.2f} best {MAX_LORAS} adapters per "
          f"step); spread vs folded throughput {tput_all_on_16 / tput_16_on_16:.2f}", flush=True)
    print(f"{MAX_LORAS} slots, strict arrival order: running batch {spread_strict.mean_batch():.1f}, share run "
          f"{spread_strict.share():.2f} ({closed_loop_share(len(names), True):.2f} in the model; adapter-aware admission "
          f"runs {gain:.2f}x that share); spread vs folded "
          f"throughput {tput_strict:.2f} ({tput_all_on_16 / tput_16_on_16 / tput_strict:.2f}x with adapter-aware admission)",
          flush=True)
    print(f"max_loras auto: {slots} slots in {args.slots_bytes >> 20} MiB; running batch: {spread.mean_batch():.1f} spread, "
          f"{hot.mean_batch():.1f} hot (ratio {spread.mean_batch() / max(hot.mean_batch(), 1e-9):.2f}); folded traffic "
          f"{tput_16 / tput_16_on_16:.2f}x its throughput in {MAX_LORAS} slots (the cost of {slots - MAX_LORAS} idle slots)",
          flush=True)
    print(f"adapters={len(names)} requests={len(records)} failed={failed} wrong={wrong} slots={slots} "
          f"p50_ttft_warm_ms={_pct(warm, 0.5) * 1e3:.1f} p99_ttft_cold_ms={_pct(cold, 0.99) * 1e3:.1f} "
          f"tput_vs_16={tput_all / tput_16:.2f} tput_vs_16_in_16_slots={tput_all_on_16 / tput_16_on_16:.2f} "
          f"share_16={spread16.share():.2f} share_16_strict={spread_strict.share():.2f} admission_gain={gain:.2f} "
          f"share_fcfs={fcfs:.2f} share_best={best:.2f} "
          f"rss_mb={rss >> 20} rss_bound_mb={bound >> 20} merge_stall_p99_vs_normal={_pct(merging, 0.99) / _pct(normal, 0.99):.2f} "
          f"isa={native_isa() or 'blas'}{emulated()}")
    if args.plot is not None:
        _plot(args.plot, warm, cold, [r[2] for r in hot.records if r[1] == "OK" and r[2] is not None],
              tput_all, tput_16, normal, merging)
    return 0 if failed == 0 and wrong == 0 and checked >= 200 else 1


if __name__ == "__main__":
    sys.exit(main())
