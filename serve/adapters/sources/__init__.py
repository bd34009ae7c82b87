"""Adapters from where users keep them: S3-compatible storage (`s3://bucket/prefix`) and the
Hugging Face Hub (`hf://org/name[@revision]`), beside paths under the adapter root.

`uri.py` parses URIs (tenants are granted URI prefixes: serve/tenants.py, `SourceGrant`);
`fetch.py` lists and downloads one adapter, bounded and verified, through a resolver per scheme
(`s3.py`, `hf.py`); `AdapterSources` (here) gives the registry staging folders inside the
snapshot tier: a download lands in a private folder there, the registry validates it exactly
like a local adapter (the same `AdapterValidator`, the same file scopes) and the folder is
removed whatever happens, so nothing half-written is ever registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve.adapters.sources.base import ADAPTER_FILES, Listing, SourceConfig
from serve.adapters.sources.fetch import Fetcher
from serve.adapters.sources.uri import Scheme, SourceUri, is_uri, parse_source
from serve.config import ServerSettings
from serve.errors import InvalidRequest, short

__all__ = ["ADAPTER_FILES", "AdapterSources", "Listing", "Scheme", "SourceConfig", "SourceUri", "is_uri", "parse_source",
           "request_pins", "source_config"]

STAGING_PREFIX = ".staging-"


def source_config(settings: ServerSettings) -> SourceConfig:
    return SourceConfig(max_bytes=settings.source_max_bytes, file_timeout_s=settings.source_file_timeout_s,
                        retries=settings.source_retries, backoff_s=settings.source_backoff_s,
                        s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region,
                        s3_profile=settings.s3_profile, s3_addressing_style=settings.s3_addressing_style)


def request_pins(uri: SourceUri, sha256: Mapping[str, str]) -> dict[str, str]:
    """A request's digests (file name -> sha256) keyed by the files' URIs, checked."""
    if len(sha256) > len(ADAPTER_FILES):
        raise InvalidRequest(f"sha256: at most {len(ADAPTER_FILES)} digests (one per adapter file)")
    pins = {}
    for name, digest in sha256.items():
        if name not in ADAPTER_FILES:
            raise InvalidRequest(f"sha256: {short(name)} is not an adapter file ({', '.join(ADAPTER_FILES)})")
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise InvalidRequest(f"sha256 of {name}: expected 64 hex digits")
        pins[uri.file(name)] = digest.lower()
    return pins


class AdapterSources:
    """Listing and downloading for the registry, in a small thread pool of its own (the event
    loop's default executor tokenizes prompts: downloads never take its threads)."""

    def __init__(self, config: SourceConfig, staging_parent: Path, workers: int) -> None:
        self.fetcher = Fetcher(config)
        self._parent = staging_parent
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mora-source")

    async def list(self, uri: SourceUri, weights_limit: int) -> Listing:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.fetcher.list, uri, weights_limit)

    @contextlib.asynccontextmanager
    async def staged(self, listing: Listing, pins: Mapping[str, str]) -> AsyncIterator[Path]:
        """A private folder holding `listing`'s files, downloaded and verified; removed on exit,
        after a failure too (and only once the download has stopped writing into it)."""
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self._parent))
        os.chmod(folder, 0o700)
        download = asyncio.get_running_loop().run_in_executor(self._pool, self.fetcher.download, listing, folder, dict(pins))
        try:
            await asyncio.shield(download)
            yield folder
        finally:
            if not download.done():  # the caller went away: the thread stops at its next chunk or timeout
                with contextlib.suppress(BaseException):
                    await asyncio.wait({download})
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self.fetcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
