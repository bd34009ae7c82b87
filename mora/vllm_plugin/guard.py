"""Containment guards that run inside every vLLM process (installed by `register()`).

* **Finite KV cache.** One request whose activations become NaN/inf (a hostile adapter, an
  overflow) must not leave those values where other requests read them. vLLM reuses KV-cache
  blocks without clearing them, and attention kernels read whole blocks (masked positions
  contribute `0 * value`, which is NaN for an inf/NaN value). So keys and values are made
  finite at the one point where they are written: `Attention.forward`, before vLLM's KV-cache
  update. For finite inputs `nan_to_num` is the identity, bit for bit, so every other
  request's results are unchanged. The request itself is failed by the server, which checks
  the sampled token's log-probability (`serve/services/generation.py`).
* **No orphans.** Engine and worker processes exit (SIGKILL to themselves) within
  `WATCHDOG_S` of their parent dying, however it died (`kill -9`, OOM killer), so they do not
  keep gigabytes of memory and a device. A polling thread rather than `PR_SET_PDEATHSIG`:
  the latter fires when the *thread* that forked exits, and vLLM forks from worker threads.

The one vLLM internal touched here is `Attention.forward(self, query, key, value, ...)`,
checked when the guard is installed; a mismatch raises (the plugin then refuses to run).
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import torch

__all__ = ["install", "sanitize_kv"]

log = logging.getLogger(__name__)
WATCHDOG_S = 0.5
_installed = False
_watched: set[int] = set()


def sanitize_kv(t: torch.Tensor | None) -> torch.Tensor | None:
    """Semantics: `torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)` (identity on finite values)."""
    if t is None:
        return None
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _patch_attention() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    forward = Attention.forward
    if getattr(forward, "_mora_guarded", False):
        return
    params = list(inspect.signature(forward).parameters)[:4]
    if params != ["self", "query", "key", "value"]:
        raise RuntimeError(f"vLLM's Attention.forward has changed (parameters {params}); the KV-cache guard cannot be installed")

    @functools.wraps(forward)
    def guarded(self: Any, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        return forward(self, query, sanitize_kv(key), sanitize_kv(value), *args, **kwargs)

    guarded._mora_guarded = True  # type: ignore[attr-defined]
    Attention.forward = guarded


def _watch_parent() -> None:
    """Exit when the process that started this one dies (this process is then re-parented)."""
    pid = os.getpid()
    if pid in _watched:
        return
    _watched.add(pid)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mora-parent-watchdog", daemon=True).start()


def install() -> None:
    """Install both guards in this process (idempotent)."""
    global _installed
    if multiprocessing.parent_process() is not None:
        _watch_parent()  # a spawned vLLM process
    if _installed:
        return
    _patch_attention()
    os.register_at_fork(after_in_child=_watch_parent)  # forked engine core / workers (and their children)
    _installed = True
