"""Adapter snapshots: the private, read-only copies of validated adapters that the engine reads.

The engine gets a snapshot written from exactly the tensors the mora library validated (read-only,
in a directory only this process knows), so files changing on disk afterwards cannot change what
is served. The folder of snapshots is locked for the process's lifetime, so that the next start
can tell the folders of live servers from those of servers that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from mora.kinds import Adapter, kind_of

__all__ = ["LOCK_FILE", "SNAPSHOTS_PREFIX", "SnapshotDir", "clean_stale_snapshots", "hollow", "tensor_bytes"]

log = logging.getLogger(__name__)
SNAPSHOTS_PREFIX = "mora-snapshots-"
LOCK_FILE = ".lock"


def tensor_bytes(adapter: Adapter) -> int:
    """Bytes of `adapter`'s tensors (what its snapshot holds; the disk budget counts them)."""
    return sum(t.numel() * t.element_size() for t in kind_of(adapter).tensors(adapter))


def hollow(adapter: Adapter) -> Adapter:
    """`adapter` with its tensors on the meta device: shapes and counts, no memory."""
    return kind_of(adapter).hollow(adapter)


def _lock_snapshot_dir(directory: Path) -> int:
    """Hold an exclusive lock on `directory` for this process's lifetime (released by the kernel
    when it dies, however it dies), so the next start can tell live snapshot folders from stale ones."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def clean_stale_snapshots(parent: Path) -> list[Path]:
    """Remove snapshot folders left by servers that died without cleaning up (SIGKILL, OOM)."""
    removed = []
    for d in parent.glob(SNAPSHOTS_PREFIX + "*"):
        lock = d / LOCK_FILE
        if not d.is_dir() or d.is_symlink() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live server holds it
        finally:
            os.close(fd)
        for p in [d, *d.rglob("*")]:
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, stat.S_IRWXU)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class SnapshotDir:
    """This process's folder of snapshots (private, locked while it lives, removed on close)."""

    def __init__(self, parent: Path | None) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        parent = Path(parent or tempfile.gettempdir())
        for stale in clean_stale_snapshots(parent):
            log.warning("removed the stale snapshot folder %s of a server that died", stale)
        self.path = Path(tempfile.mkdtemp(prefix=SNAPSHOTS_PREFIX, dir=parent))
        os.chmod(self.path, 0o700)
        self._lock_fd = _lock_snapshot_dir(self.path)

    def path_for(self, adapter_name: str, number: int) -> Path:
        """Where version `number` of adapter `adapter_name` is (or would be) written."""
        return self.path / f"{adapter_name}.v{number}"

    def write(self, adapter: Adapter, number: int) -> Path:
        """Save `adapter` as version `number`, read-only; returns its folder."""
        path = self.path_for(adapter.name, number)
        kind_of(adapter).save(adapter, path)
        for f in path.iterdir():
            os.chmod(f, stat.S_IRUSR)
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        return path

    @staticmethod
    def remove(path: Path) -> None:
        """Delete one snapshot folder (made writable first: snapshots are read-only)."""
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Remove every snapshot and the folder, then release the lock."""
        with contextlib.suppress(OSError):
            for p in self.path.iterdir():
                self.remove(p)
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
