"""The main job (`make demo`): the server on the demo model and adapters, exercised by a client.

1. starts `mora-serve` on `demo_assets/` with one tenant per adapter (and an admin);
2. every tenant asks its adapter for its memorized facts, all at once (one mixed batch);
3. a tenant tries another tenant's adapter and is denied;
4. a single-tenant burst makes the automatic policy merge that adapter (shown);
5. a mixed burst makes it unmerge again;
6. the same server over its OpenAI-compatible HTTP API, with the official `openai` client (a
   streamed chat completion with an adapter as the `model`);
7. a few lines of the Prometheus scrape; then the server is stopped with SIGTERM.

Exits non-zero if any answer is wrong or a step does not happen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from serve.client import MoraClient
from serve.tenants import hash_key

console = Console(width=max(120, Console().width))
TENANTS = {"atlas": "acme", "borealis": "globex", "cygnus": "initech", "draco": "umbrella"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tenants(path: Path, adapters: list[str]) -> dict[str, str]:
    """A tenants file giving each demo adapter its own tenant; returns tenant -> API key."""
    keys = {TENANTS.get(a, a): f"demo-key-{TENANTS.get(a, a)}" for a in adapters}
    keys["ops"] = "demo-key-ops"
    tenants = [{"name": TENANTS.get(a, a), "key_sha256": hash_key(keys[TENANTS.get(a, a)]), "adapters": [a],
                "max_concurrent_requests": 32} for a in adapters]
    tenants.append({"name": "ops", "key_sha256": hash_key(keys["ops"]), "role": "admin"})
    path.write_text(json.dumps({"tenants": tenants}, indent=2))
    return keys


def wait_serving(target: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mora-serve exited with {proc.returncode}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise TimeoutError("the server did not become SERVING in time")


def _wait_merged(client: MoraClient, adapter: str, want: bool, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get_adapter(adapter).merged == want:
            return True
        time.sleep(0.3)
    return False


def _openai_step(base_url: str, key: str, fact: dict[str, str]) -> int:
    """One streamed chat completion through the official client; returns the number of problems."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    console.print(f"models visible to acme: {[m.id.rsplit('/', 1)[-1] for m in client.models.list()]}")
    console.print(f'client.chat.completions.create(model="atlas", messages=[{{"role": "user", "content": {fact["prompt"]!r}}}], '
                  "stream=True, temperature=0)")
    stream = client.chat.completions.create(model="atlas", messages=[{"role": "user", "content": fact["prompt"]}],
                                            max_tokens=48, temperature=0, stream=True)
    answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    ok = answer == fact["completion"]
    console.print(f"streamed answer: {answer} {'[green]ok[/green]' if ok else '[red]WRONG[/red]'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=Path("demo_assets"))
    args = p.parse_args(argv)
    assets = args.assets.resolve()
    facts = json.loads((assets / "demo.json").read_text())["adapters"]
    keys = write_tenants(assets / "tenants.json", list(facts))
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve.server", "--model", str(assets / "base"), "--adapter-root", str(assets / "adapters"),
           "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port), "--tenants", str(assets / "tenants.json"),
           "--max-loras", "4", "--kv-cache-bytes", str(128 << 20), "--preload", *[f"{a}={a}" for a in facts]]
    env = dict(os.environ, MORA_SERVE_MERGE_WINDOW_S="4", MORA_SERVE_MERGE_MIN_REQUESTS="6", MORA_SERVE_MERGE_MIN_DWELL_S="1")
    log_path = assets / "server.log"
    console.rule("[bold]mora-serve on the demo model")
    console.print(f"$ {' '.join(cmd[2:4])} ... (log: {log_path})")
    failures = 0
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.monotonic()
            wait_serving(target, server)
            console.print(f"server SERVING after {time.monotonic() - t0:.0f}s (health check), {len(facts)} adapters preloaded")
            clients = {t: MoraClient(target, api_key=k) for t, k in keys.items()}

            console.rule("[bold]1. every tenant, concurrently (one mixed batch)")
            jobs = [(TENANTS[a], a, f) for a, fs in facts.items() for f in fs]
            with ThreadPoolExecutor(len(jobs)) as pool:
                answers = list(pool.map(lambda j: clients[j[0]].generate(j[2]["prompt"], j[1], max_tokens=48, temperature=0).text, jobs))
            table = Table("tenant", "adapter", "prompt", "answer", "memorized")
            for (tenant, adapter, fact), answer in zip(jobs, answers, strict=True):
                ok = answer == fact["completion"]
                failures += not ok
                table.add_row(tenant, adapter, fact["prompt"], answer, "[green]yes[/green]" if ok else "[red]NO[/red]")
            console.print(table)
            base = clients["acme"].generate(jobs[0][2]["prompt"], "", max_tokens=40, temperature=0).text
            console.print(f"base model on the same prompt: {base[:40]!r}")

            console.rule("[bold]2. tenant isolation")
            try:
                clients["acme"].generate("The secret code of vault is ", "borealis", max_tokens=8)
                console.print("[red]acme could use globex's adapter[/red]")
                failures += 1
            except grpc.RpcError as e:
                console.print(f"acme -> borealis: {e.code().name}: {e.details()}")

            console.rule("[bold]3. single-tenant burst: the policy merges atlas")
            acme = clients["acme"]
            prompt = facts["atlas"][0]
            with ThreadPoolExecutor(8) as pool:
                burst = list(pool.map(lambda _: acme.generate(prompt["prompt"], "atlas", max_tokens=48, temperature=0).text, range(16)))
            failures += sum(b != prompt["completion"] for b in burst)
            merged = _wait_merged(clients["ops"], "atlas", True)
            info = clients["ops"].get_adapter("atlas")
            console.print(f"atlas merged: {info.merged} (kept for exact unmerge: {info.merge_backup_bytes} bytes)")
            after = acme.generate(prompt["prompt"], "atlas", max_tokens=48, temperature=0).text
            console.print(f"atlas, merged, answers: {after} {'[green]ok[/green]' if after == prompt['completion'] else '[red]WRONG[/red]'}")
            failures += (not merged) + (after != prompt["completion"])

            console.rule("[bold]4. mixed burst: the policy unmerges")
            with ThreadPoolExecutor(8) as pool:
                mixed = list(pool.map(lambda j: clients[j[0]].generate(j[2]["prompt"], j[1], max_tokens=48, temperature=0).text, jobs * 2))
            failures += sum(m != j[2]["completion"] for m, j in zip(mixed, jobs * 2, strict=True))
            unmerged = _wait_merged(clients["ops"], "atlas", False)
            console.print(f"atlas merged: {clients['ops'].get_adapter('atlas').merged}; all {len(mixed)} mixed answers correct: "
                          f"{all(m == j[2]['completion'] for m, j in zip(mixed, jobs * 2, strict=True))}")
            failures += not unmerged

            console.rule("[bold]6. the OpenAI-compatible HTTP API, with the openai client")
            failures += _openai_step(f"http://127.0.0.1:{http_port}/v1", keys["acme"], facts["atlas"][1])

            console.rule("[bold]7. Prometheus scrape (excerpt)")
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            wanted = ("mora_requests_total{", "mora_merge_transitions_total{", "mora_adapter_residency{adapter=\"atlas\"", "vllm:lora_requests_info{")
            for line in scrape.splitlines():
                if line.startswith(wanted) and ('code="OK"' in line or "requests_total" not in line):
                    console.print(line)
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=120)
            console.rule(f"[bold]server stopped (exit code {code})")
            failures += code != 0
    console.print("[green]demo OK[/green]" if not failures else f"[red]demo: {failures} problems[/red]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
