"""A real `mora-serve` process on loopback for tests (exactly the command the container runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
                 tls: dict[str, Path] | None = None) -> None:
        self.tls = tls  # {"ca": ..., "cert": ..., "key": ...} of a client the server accepts
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}/v1"
        self.target = f"127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "serve.server", "--model", str(model), "--adapter-root", str(adapter_root),
                        "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
                        "--kv-cache-bytes", str(128 << 20),
                        # vLLM's "auto" runs float32 checkpoints in bf16; tests compare against a float32 reference
                        "--dtype", "float32", *(args or [])]
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

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mora-serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            status = self.health()
            if status is not None:
                self.health_seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.5)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def client(self, key: str | None = None, **kw: object) -> MoraClient:
        if self.tls is not None and "tls_ca" not in kw:
            kw = {"tls_ca": self.tls["ca"], "tls_cert": self.tls["cert"], "tls_key": self.tls["key"], **kw}
        return MoraClient(self.target, api_key=key, **kw)

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()

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
