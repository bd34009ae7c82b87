"""What it costs that a merged adapter runs alone (serve/adapters/merge_gate.py), on a real server.

A merged adapter's weights are `W + dW` rounded to the serving dtype, so the server never runs
another adapter's (or the base model's) request beside it: such a request first unmerges it.
There is thus no "mixed step while merged"; its cost is the wait of the first other request
that arrives while an adapter is merged. This bench starts `mora-serve` (bfloat16, the 100M
Llama-shaped model of bench.serving, two MoRA adapters) and times, in interleaved rounds, one
request of adapter B (a prompt, one generated token):

* plain  - nothing merged;
* merged - adapter A merged just before (by MergeAdapter): B's request waits for the unmerge.

`isolation_wait_ms` is the median of (merged - plain) per round; `step_ms` the decode time per
token of one request (32 tokens), so `isolation_vs_step` says how many decode steps the wait
costs that one request. Other requests are never slowed: between the unmerge and the next
merge every step runs unmerged.

    python -m bench.isolation      # ends with: isolation_wait_ms=X step_ms=Y isolation_vs_step=Z merge_ms=W
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serving import _larger_model, _make_adapters
from serve.client import MoraClient

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(proc: subprocess.Popen, target: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mora-serve exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError("mora-serve never became SERVING")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--work", type=Path, default=None, help="where the model and adapters are built (default: a temp dir)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mora-bench-isolation-"))
    model = _larger_model(work / "model")
    moras, _ = _make_adapters(model, work / "adapters")
    port = _free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "serve.server", "--model", str(model), "--adapter-root", str(work / "adapters"),
               "--port", str(port), "--http-port", "0", "--metrics-port", "0", "--dtype", "bfloat16",
               "--kv-cache-bytes", str(512 << 20), "--no-auto-merge",
               "--preload", f"a={moras[0].name}", f"b={moras[1].name}"]
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    try:
        _wait_serving(proc, target)
        with MoraClient(target) as c:
            prompt = "the quick brown fox jumps over the lazy dog " * 4
            c.generate(prompt, "b", max_tokens=4)  # warm both adapters into slots
            c.generate(prompt, "a", max_tokens=4)
            plain, merged, merges = [], [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                c.generate(prompt, "b", max_tokens=1, temperature=0)
                plain.append(time.perf_counter() - started)
                started = time.perf_counter()
                c.merge_adapter("a")
                merges.append(time.perf_counter() - started)
                started = time.perf_counter()
                c.generate(prompt, "b", max_tokens=1, temperature=0)  # waits for a's unmerge
                merged.append(time.perf_counter() - started)
                assert not c.get_adapter("a").merged
            started = time.perf_counter()
            out = c.generate(prompt, "b", max_tokens=33, temperature=0, ignore_eos=True)
            decode = (time.perf_counter() - started - statistics.median(plain)) / (len(out.token_ids) - 1)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()
    wait = statistics.median(m - p for m, p in zip(merged, plain, strict=True))
    print(f"bf16, 100M Llama (8 layers), {args.rounds} rounds: request alone {statistics.median(plain) * 1e3:.1f} ms, "
          f"after a merge {statistics.median(merged) * 1e3:.1f} ms, decode step {decode * 1e3:.1f} ms, "
          f"merge {statistics.median(merges) * 1e3:.1f} ms")
    print(f"isolation_wait_ms={wait * 1e3:.1f} step_ms={decode * 1e3:.1f} isolation_vs_step={wait / decode:.2f} "
          f"merge_ms={statistics.median(merges) * 1e3:.1f}")


if __name__ == "__main__":
    main()
