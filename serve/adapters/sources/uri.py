"""Adapter source URIs: `s3://bucket/prefix`, `hf://org/name[@revision]`, parsed once into a typed
`SourceUri`; anything without `://` is a path relative to the caller's adapter folder (not a URI).

Parsing is strict on purpose: a URI names where the server reads from, and tenants are granted
URI prefixes (serve/tenants.py), so two spellings of one place must compare equal and no spelling
may step outside a granted prefix. Empty, `.` and `..` segments, backslashes, control characters
and percent escapes are refused rather than normalized.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from serve.errors import InvalidRequest, short

__all__ = ["URI_MAX_BYTES", "Scheme", "SourceUri", "is_uri", "parse_source"]

URI_MAX_BYTES = 1024  # as adapter paths (serve/adapters/validation.py, PATH_MAX_BYTES)
# S3 bucket names (AWS's rules; MinIO, R2 and GCS interoperability use the same or looser ones)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._\-+=,@~]+$")
# Hugging Face repo ids and revisions (branch, tag or commit)
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class Scheme(enum.Enum):
    S3 = "s3"
    HF = "hf"


@dataclass(frozen=True)
class SourceUri:
    """One place adapters are read from: S3 `bucket` + key `path` (segments joined by `/`), or a
    Hugging Face repo `bucket` (`org/name`) at `revision` (None: the default branch)."""

    scheme: Scheme
    bucket: str  # S3 bucket, or the hub repo id `org/name` (just `org` in a grant)
    path: str = ""  # S3 key prefix without leading or trailing `/`; always "" for hf
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme is Scheme.S3:
            return f"s3://{self.bucket}" + (f"/{self.path}" if self.path else "")
        return f"hf://{self.bucket}" + (f"@{self.revision}" if self.revision else "")

    @property
    def segments(self) -> tuple[str, ...]:
        """The location as segments: bucket (or org and name) first, then the key's segments."""
        return (*self.bucket.split("/"), *(self.path.split("/") if self.path else ()))

    def child(self, name: str) -> SourceUri:
        """The URI of `name` directly under this one (an adapter id under a granted prefix)."""
        if self.scheme is Scheme.HF:
            if "/" in self.bucket:
                raise InvalidRequest(f"{self} is a repository; adapters are resolved by name under an organization (hf://org)")
            return parse_source(f"hf://{self.bucket}/{name}")
        return parse_source(f"{self}/{name}")

    def file(self, name: str) -> str:
        """The URI of file `name` of the adapter at this URI (digests are pinned by these)."""
        if self.scheme is Scheme.HF:
            return f"hf://{self.bucket}/{name}" + (f"@{self.revision}" if self.revision else "")
        return f"{self}/{name}"

    def within(self, grant: SourceUri) -> bool:
        """Whether this URI is `grant` or lies below it, segment by segment (a grant of
        `s3://b/acme` covers `s3://b/acme/x`, never `s3://b/acme-evil`). A grant with a
        revision covers that revision only."""
        if self.scheme is not grant.scheme:
            return False
        mine, theirs = self.segments, grant.segments
        if mine[: len(theirs)] != theirs:
            return False
        return grant.revision is None or grant.revision == self.revision


def is_uri(text: str) -> bool:
    """Whether `text` names a source by URI (else it is a path relative to an adapter folder)."""
    return "://" in text


def _refuse_odd(text: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > URI_MAX_BYTES:
        raise InvalidRequest(f"adapter source URI is longer than {URI_MAX_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\\%?#" for c in text):
        raise InvalidRequest(f"adapter source URI {short(text)} contains a control character, '\\', '%', '?' or '#'")


def parse_source(text: str) -> SourceUri:
    """`text` as a `SourceUri`; INVALID_ARGUMENT naming what is wrong otherwise."""
    _refuse_odd(text)
    scheme_text, sep, rest = text.partition("://")
    if not sep:
        raise InvalidRequest(f"{short(text)} is not an adapter source URI (s3://bucket/prefix or hf://org/name[@revision])")
    try:
        scheme = Scheme(scheme_text)
    except ValueError:
        raise InvalidRequest(f"unsupported adapter source scheme {short(scheme_text, 16)}: use s3://, hf:// "
                             "or a path relative to your adapter folder") from None
    if scheme is Scheme.S3:
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidRequest(f"{short(text)}: {short(bucket, 64)} is not a valid S3 bucket name")
        key = key.rstrip("/")  # a trailing `/` names the same prefix
        segments = key.split("/") if key else []
        for s in segments:
            if s in ("", ".", "..") or not _KEY_SEGMENT.match(s):
                raise InvalidRequest(f"{short(text)}: the key has an empty, '.', '..' or unsupported segment "
                                     f"(letters, digits and ._-+=,@~ only)")
        return SourceUri(Scheme.S3, bucket, "/".join(segments))
    repo, at, revision = rest.partition("@")
    parts = repo.rstrip("/").split("/")
    if not 1 <= len(parts) <= 2 or not all(_HF_PART.match(p) and p not in (".", "..") for p in parts):
        raise InvalidRequest(f"{short(text)}: expected hf://org/name[@revision] (letters, digits and ._- only)")
    if at and (not _REVISION.match(revision) or ".." in revision.split("/") or len(revision) > 128):
        raise InvalidRequest(f"{short(text)}: {short(revision, 64)} is not a valid revision")
    return SourceUri(Scheme.HF, "/".join(parts), "", revision or None)
