"""A real `mora-serve` process on loopback for tests (exactly the command the container runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.client import MoraClient
from serve.tenants import hash_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tenants(path: Path, spec: dict[str, dict]) -> dict[str, str]:
    """`spec`: tenant name -> extra fields; keys are `key-<name>`. Returns name -> key."""
    keys = {name: f"key-{name}" for name in spec}
    tenants = [{"name": n, "key_sha256": hash_key(keys[n]), **fields} for n, fields in spec.items()]
    path.write_text(json.dumps({"tenants": tenants}))
    return keys


class ServerProcess:
    def __init__(self, model: Path, adapter_root: Path, log: Path, *, args: list[str] | None = None, env: dict | None = None,
                 tls: dict[str, Path] | None = None, holdable: bool = False, hold_start: bool = False) -> None:
        self.tls = tls  # {"ca": ..., "cert": ..., "key": ...} of a client the server accepts
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}/v1"
        self.target = f"127.0.0.1:{self.port}"
        # holdable: the same server with a test-only hold on the engine (tests/held_server.py)
        self.hold_dir = log.parent / f"{log.stem}.hold" if holdable else None
        entry = [str(Path(__file__).with_name("held_server.py"))] if holdable else ["-m", "serve.server"]
        if self.hold_dir is not None:
            self.hold_dir.mkdir(exist_ok=True)
            if hold_start:  # the engine does not start until release_start()
                (self.hold_dir / "hold-start").touch()
            env = {**(env or {}), "MORA_TEST_HOLD_DIR": str(self.hold_dir)}
        self.command = [sys.executable, *entry, "--model", str(model), "--adapter-root", str(adapter_root),
                        "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
                        "--kv-cache-bytes", str(128 << 20),
                        # vLLM's "auto" runs float32 checkpoints in bf16; tests compare against a float32 reference
                        "--dtype", "float32",
                        # eager: a compiled CPU engine starts tens of seconds later (compilation is tested once,
                        # in tests/test_gpu_contract_vllm.py)
                        "--enforce-eager", *(args or [])]
        self.log_path = log
        self._log = open(log, "w")
        # Own session: stop() can reap the engine processes too, even if the server died abruptly.
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.health_seen: list[int] = []

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target)
        creds = grpc.ssl_channel_credentials(self.tls["ca"].read_bytes(), self.tls["key"].read_bytes(), self.tls["cert"].read_bytes())
        return grpc.secure_channel(self.target, creds)

    def health(self) -> int | None:
        try:
            with self.channel() as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None

    def wait_health(self, status: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mora-serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            seen = self.health()
            if seen is not None:
                self.health_seen.append(seen)
            if seen == status:
                return
            time.sleep(0.2)
        raise TimeoutError(f"health never {status}:\n{self.log_path.read_text()[-4000:]}")

    def release_start(self) -> None:
        (self.hold_dir / "hold-start").unlink(missing_ok=True)

    def wait_serving(self, timeout: float = 300) -> None:
        self.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout)

    def client(self, key: str | None = None, **kw: object) -> MoraClient:
        if self.tls is not None and "tls_ca" not in kw:
            kw = {"tls_ca": self.tls["ca"], "tls_cert": self.tls["cert"], "tls_key": self.tls["key"], **kw}
        return MoraClient(self.target, api_key=key, **kw)

    def hold(self) -> None:
        """Freeze the engine when the next request produces output (before the client sees it)."""
        assert self.hold_dir is not None, "start the server with holdable=True"
        for name in ("paused", "release"):
            (self.hold_dir / name).unlink(missing_ok=True)
        (self.hold_dir / "armed").touch()

    def wait_held(self, timeout: float = 120) -> None:
        """Until the engine is frozen (an event, not a speed: the timeout only guards a broken server)."""
        deadline = time.monotonic() + timeout
        while not (self.hold_dir / "paused").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"engine never paused:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.05)

    def release(self) -> None:
        """Resume the engine (and disarm a hold that never triggered)."""
        (self.hold_dir / "armed").unlink(missing_ok=True)
        if (self.hold_dir / "paused").exists():
            (self.hold_dir / "release").touch()
            deadline = time.monotonic() + 120
            while (self.hold_dir / "release").exists() and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)

    def aborts(self) -> int:
        """Engine requests the server has aborted so far."""
        f = self.hold_dir / "aborts"
        return len(f.read_text().split()) if f.exists() else 0

    def scrape(self, token: str | None = None, names: tuple[str, ...] = ()) -> str:
        """/metrics; only the series of `names` where given (Prometheus' `name[]` filter)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        query = ("?" + urllib.parse.urlencode([("name[]", n) for n in names])) if names else ""
        request = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics{query}", headers=headers)
        return urllib.request.urlopen(request, timeout=10).read().decode()

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of a crashed server
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return code


def metric_value(scrape: str, name: str, **labels: str) -> float:
    """The value of one sample (0 if absent); labels must all match."""
    total = 0.0
    for line in scrape.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
