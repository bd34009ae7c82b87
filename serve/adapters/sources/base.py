"""What every source scheme shares: the limits (`SourceConfig`), what a listing holds
(`RemoteFile`, `Listing`) and the interface of a scheme's resolver (`SchemeResolver`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from mora.checkpoint import ADAPTER_CONFIG, BIN_WEIGHTS, SAFETENSORS_WEIGHTS
from serve.adapters.sources.uri import SourceUri

__all__ = ["ADAPTER_FILES", "CHUNK", "Listing", "RemoteFile", "SchemeResolver", "SourceConfig"]

# What the checkpoint reader reads (mora/checkpoint.py); nothing else is ever fetched.
ADAPTER_FILES = (ADAPTER_CONFIG, SAFETENSORS_WEIGHTS, BIN_WEIGHTS)
CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceConfig:
    """Where the stores are and the limits on downloads (from `ServerSettings`, or from the
    environment for the plain-vLLM resolver). Credentials are never here: the clients read them
    from the standard places (AWS_* variables, profiles; HF_TOKEN, the hub's login)."""

    max_bytes: int = 4 << 30  # one adapter's files together
    file_timeout_s: float = 300.0
    retries: int = 3  # attempts after the first, on transient failures
    backoff_s: float = 0.5  # first wait; doubled each retry, at most 30 s
    s3_endpoint_url: str | None = None  # none: AWS_ENDPOINT_URL or AWS's own
    s3_region: str | None = None
    s3_profile: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SourceConfig:
        """From the server's own variables (MORA_SERVE_S3_*, MORA_SERVE_SOURCE_*), for processes
        without its settings (the plain-vLLM resolver, serve/engine/lora_resolver.py)."""
        values = {}
        for f in dataclasses.fields(cls):
            text = environ.get("MORA_SERVE_" + (f.name if f.name.startswith("s3_") else "source_" + f.name).upper())
            if text is not None:
                default = f.default
                values[f.name] = type(default)(text) if isinstance(default, int | float) else text
        return cls(**values)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # one of ADAPTER_FILES
    uri: str  # the file's URI (digests are pinned by it)
    size: int
    key: str  # the resolver's handle for it (an S3 key, a hub filename)
    sha256: str | None = None  # when the store knows it (the hub's LFS files)


@dataclass(frozen=True)
class Listing:
    """The files of one adapter at `uri` (limits checked), and the revision the store resolved."""

    uri: SourceUri
    files: tuple[RemoteFile, ...]
    revision: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class SchemeResolver(Protocol):
    """How one kind of store is listed and read. Failures are `SourceNotFound`, `SourceDenied`
    (permanent) or `SourceUnavailable` (transient: retried)."""

    def list(self, uri: SourceUri, names: tuple[str, ...]) -> tuple[list[RemoteFile], str | None]:
        """The files among `names` directly at `uri`, and the revision listed (or None)."""

    def open(self, file: RemoteFile, listing: Listing, timeout: float) -> AbstractContextManager[Iterator[bytes]]:
        """`file`'s bytes, in chunks."""
