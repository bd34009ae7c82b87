"""Downloading an adapter from its source into a private folder, bounded and verified.

One `Fetcher` for every scheme; what differs per scheme (how to list a prefix, how to read an
object) is a small `SchemeResolver` (serve/adapters/sources/s3.py, hf.py), in the spirit of
vLLM's LoRA resolvers (`vllm/lora/resolver.py`). The order never changes:

1. **List** the adapter's files (only the names the checkpoint reader reads: the config and one
   weights file) with their sizes, and check every size limit from the listing, before a byte is
   fetched: the config against the reader's limit, the weights against what the base model
   allows (`mora.checkpoint.weights_limit`) and `source_max_bytes`.
2. **Download** each file into the destination folder, streaming: never more bytes than listed
   (a longer object changed meanwhile), within `source_file_timeout_s` per file (a trickling
   server included), retried with exponential backoff on transient failures (cut connections,
   timeouts, 5xx, fewer bytes than listed); sha256 computed on the way and compared with the
   store's own digest (the hub's) and the pinned ones.
3. The caller validates the folder exactly like a local adapter and removes it whatever happens;
   nothing here registers anything.

Blocking (the clients are synchronous): the registry runs it in its own small thread pool, never
in the event loop's default executor (which tokenizes prompts).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from mora.checkpoint import ADAPTER_CONFIG, BIN_WEIGHTS, MAX_CONFIG_BYTES, SAFETENSORS_WEIGHTS
from serve.adapters.sources.base import ADAPTER_FILES, Listing, RemoteFile, SchemeResolver, SourceConfig
from serve.adapters.sources.uri import Scheme, SourceUri
from serve.errors import InvalidRequest, SourceNotFound, SourceUnavailable

__all__ = ["Fetcher"]

T = TypeVar("T")


class Fetcher:
    def __init__(self, config: SourceConfig, resolvers: Mapping[Scheme, SchemeResolver] | None = None) -> None:
        self.config = config
        self._resolvers: dict[Scheme, SchemeResolver] = dict(resolvers or {})
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def resolver(self, scheme: Scheme) -> SchemeResolver:
        """The resolver of `scheme`, built on first use (the S3 client reads its configuration then)."""
        with self._lock:
            if scheme not in self._resolvers:
                if scheme is Scheme.S3:
                    from serve.adapters.sources.s3 import S3Resolver

                    self._resolvers[scheme] = S3Resolver(self.config)
                else:
                    from serve.adapters.sources.hf import HubResolver

                    self._resolvers[scheme] = HubResolver(self.config)
            return self._resolvers[scheme]

    def close(self) -> None:
        """Stop: downloads in flight fail at their next chunk, retries stop waiting."""
        self._stop.set()

    # -- listing --------------------------------------------------------------------------

    def list(self, uri: SourceUri, weights_limit: int) -> Listing:
        """The adapter's files at `uri`, every size checked against the limits."""
        found, revision = self._retrying(lambda: self.resolver(uri.scheme).list(uri, ADAPTER_FILES))
        by_name = {f.name: f for f in found}
        config = by_name.get(ADAPTER_CONFIG)
        weights = by_name.get(SAFETENSORS_WEIGHTS) or by_name.get(BIN_WEIGHTS)
        if config is None:
            raise SourceNotFound(f"no adapter at {uri}: it has no {ADAPTER_CONFIG}")
        if weights is None:
            raise SourceNotFound(f"no adapter at {uri}: it has no {SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS}")
        limit = min(weights_limit, self.config.max_bytes)
        if config.size > MAX_CONFIG_BYTES:
            raise InvalidRequest(f"{config.uri} is {config.size} bytes; an adapter config may have {MAX_CONFIG_BYTES}")
        if weights.size > limit:
            raise InvalidRequest(f"{weights.uri} is {weights.size} bytes; adapters of this base model are at most "
                                 f"{limit} bytes (source_max_bytes or what the base model's shapes allow)")
        listing = Listing(uri, (config, weights), revision)
        if listing.total_bytes > self.config.max_bytes:
            raise InvalidRequest(f"the adapter at {uri} is {listing.total_bytes} bytes; the limit is {self.config.max_bytes}")
        return listing

    # -- download -------------------------------------------------------------------------

    def download(self, listing: Listing, dest: Path, pins: Mapping[str, str]) -> None:
        """Every file of `listing` into the folder `dest`, each verified (size, the store's digest,
        the digest `pins` gives its URI, if any)."""
        resolver = self.resolver(listing.uri.scheme)
        for f in listing.files:
            got = self._retrying(lambda f=f: self._download_one(resolver, listing, f, dest / f.name))
            pinned = pins.get(f.uri)
            if pinned is not None and got != pinned.lower():
                raise InvalidRequest(f"sha256 of {f.uri} is {got}, not the pinned {pinned.lower()[:64]}")

    def _download_one(self, resolver: SchemeResolver, listing: Listing, f: RemoteFile, path: Path) -> str:
        """One attempt: the file at `path` (rewritten from its start), its sha256."""
        timeout = self.config.file_timeout_s
        deadline = time.monotonic() + timeout
        digest, got = hashlib.sha256(), 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, resolver.open(f, listing, timeout) as chunks:
            for chunk in chunks:
                if self._stop.is_set():
                    raise SourceUnavailable("the server is shutting down")
                got += len(chunk)
                if got > f.size:
                    raise SourceUnavailable(f"{f.uri} is longer than the {f.size} bytes listed (it changed while it was "
                                            "downloaded)")
                if time.monotonic() > deadline:
                    raise SourceUnavailable(f"{f.uri} was not downloaded within {timeout:g}s (source_file_timeout_s)")
                digest.update(chunk)
                out.write(chunk)
        if got < f.size:
            raise SourceUnavailable(f"the transfer of {f.uri} ended after {got} of its {f.size} bytes (truncated)")
        hexdigest = digest.hexdigest()
        if f.sha256 is not None and hexdigest != f.sha256:
            raise SourceUnavailable(f"{f.uri} arrived corrupted: its sha256 differs from the store's")
        return hexdigest

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, again after `SourceUnavailable` (backoff doubling from `backoff_s`), at most
        `retries` more times; permanent failures are raised at once."""
        retries = self.config.retries
        for n in range(retries + 1):
            try:
                return attempt()
            except SourceUnavailable as e:
                if n == retries or self._stop.is_set():
                    raise SourceUnavailable(f"{e.message} (after {n + 1} attempts)") from None
                if self._stop.wait(min(30.0, self.config.backoff_s * 2 ** n)):
                    raise SourceUnavailable("the server is shutting down") from None
        raise AssertionError("unreachable")
