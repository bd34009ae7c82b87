"""Adapter sources for plain vLLM: a LoRA resolver (vLLM's `vllm/lora/resolver.py` interface),
registered by the `vllm.general_plugins` entry point `mora_sources` that this package installs.

vLLM's own OpenAI server then loads an adapter it does not know, MoRA or LoRA, from the same
stores as mora-serve, by name: a request for model NAME looks for `<prefix>/NAME` under each
prefix of MORA_LORA_RESOLVER_SOURCES (comma-separated `s3://bucket/prefix` or `hf://org`), in
order, downloaded by the same bounded, verified fetcher (serve/adapters/sources). Like vLLM's own
resolvers it needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True. S3 endpoint and credentials: the standard
AWS variables; limits: the server's MORA_SERVE_SOURCE_* / MORA_SERVE_S3_* variables. Downloads
land in MORA_LORA_RESOLVER_CACHE_DIR (default: a private temporary folder), each moved into place
whole once verified, so vLLM never reads a half-written adapter.

vLLM's server has no tenants: every name under the prefixes is served to every caller. The
engine's worker validates each adapter when it loads it (the MoRA plugin), not before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from mora.files import MAX_FILE_BYTES
from serve.adapters.sources.base import SourceConfig
from serve.adapters.sources.fetch import Fetcher
from serve.adapters.sources.uri import SourceUri, parse_source
from serve.errors import ServeError, SourceNotFound

__all__ = ["ENV_CACHE", "ENV_SOURCES", "MoraSourceResolver", "register"]

log = logging.getLogger(__name__)
ENV_SOURCES = "MORA_LORA_RESOLVER_SOURCES"
ENV_CACHE = "MORA_LORA_RESOLVER_CACHE_DIR"


class MoraSourceResolver(LoRAResolver):
    def __init__(self, prefixes: list[SourceUri], cache: Path, config: SourceConfig) -> None:
        self.prefixes = prefixes
        self.cache = cache
        self.fetcher = Fetcher(config)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        for prefix in self.prefixes:
            try:
                uri = prefix.child(lora_name)
                folder = await asyncio.to_thread(self._fetch, uri)
            except SourceNotFound:
                continue
            except ServeError as e:  # vLLM answers "does not exist" for None; the reason goes to the log
                log.warning("adapter %r not resolved from %s: %s", lora_name[:64], prefix, e.message)
                return None
            log.info("adapter %s resolved from %s", lora_name, uri)
            return LoRARequest(lora_name, 1, str(folder))  # vLLM gives it its own id
        return None

    def _fetch(self, uri: SourceUri) -> Path:
        """The adapter at `uri`, downloaded whole into the cache (once per URI)."""
        folder = self.cache / hashlib.sha256(str(uri).encode()).hexdigest()[:32]
        if folder.is_dir():
            return folder
        listing = self.fetcher.list(uri, MAX_FILE_BYTES)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.cache))
        try:
            self.fetcher.download(listing, staging, {})
            os.replace(staging, folder)  # whole, or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: registers the resolver when
    MORA_LORA_RESOLVER_SOURCES is set (otherwise nothing)."""
    text = os.environ.get(ENV_SOURCES, "").strip()
    if not text:
        return
    prefixes = [parse_source(p.strip()) for p in text.split(",") if p.strip()]
    cache_dir = os.environ.get(ENV_CACHE)
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="mora-lora-resolver-"))
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o700)
    LoRAResolverRegistry.register_resolver("mora sources", MoraSourceResolver(prefixes, cache, SourceConfig.from_env()))
