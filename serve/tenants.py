"""Tenants: API keys (stored as SHA-256 hashes), roles, owned adapters and limits.

A tenants file (YAML or JSON):

    tenants:
      - name: acme
        key_sha256: 9f86d081...        # sha256 of the key: `mora-client hash-key KEY`
        adapters: [acme-support]       # adapter ids this tenant owns and may use
        allow_base_model: true
        max_concurrent_requests: 8
        max_resident_adapters: 4
        lazy_adapters: true            # serve <adapter-root>/acme/<id>/ by id on first use
        sources:                       # where acme may load adapters from (admins: anywhere)
          - prefix: s3://adapters/acme           # s3://bucket/prefix or hf://org[/name[@revision]]
            on_demand: true                      # an unknown id resolves to <prefix>/<id> on first use
            sha256:                              # optional: digests the files must have
              s3://adapters/acme/support-v3/adapter_model.safetensors: 4f2a...
      - name: ops
        key_sha256: ...
        role: admin                    # may load/unload/merge any adapter and use them all

Keys arrive as `authorization: Bearer <key>` metadata; their hash is compared in constant time
with every tenant's (so the time taken says nothing about which tenant or how many bytes
matched). Without a tenants file the server is open and logs that it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve.errors import PermissionDenied, ServeError, Unauthenticated

if TYPE_CHECKING:
    from serve.adapters.sources.uri import SourceUri

__all__ = ["OPEN", "SourceGrant", "Tenant", "TenantDirectory", "hash_key"]

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored in tenants files."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _source_uri(text: str) -> SourceUri:
    # Imported here: the URI parser lives with the sources (serve/adapters/sources), whose
    # package imports this module.
    from serve.adapters.sources.uri import parse_source

    return parse_source(text)


class SourceGrant(BaseModel):
    """A source URI prefix a tenant may load adapters from (segment by segment: `s3://b/acme`
    covers `s3://b/acme/x`, not `s3://b/acme-x`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(max_length=1024)
    # Requests naming an id that is not registered load `<prefix>/<id>` on first use (the first
    # such grant; like vLLM's LoRA resolvers), within the tenant's page-in limit.
    on_demand: bool = False
    sha256: dict[str, str] = Field(default_factory=dict, max_length=4096, description="file URI -> pinned sha256")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            return str(_source_uri(v))  # canonical: two spellings of one place compare equal
        except ServeError as e:
            raise ValueError(e.message) from None

    @field_validator("sha256")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        for uri, digest in v.items():
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"sha256 of {uri[:64]!r}: expected 64 hex digits")
        return {k: d.lower() for k, d in v.items()}

    @property
    def uri(self) -> SourceUri:
        return _source_uri(self.prefix)


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    role: Literal["tenant", "admin"] = "tenant"
    adapters: tuple[str, ...] = ()
    allow_base_model: bool = True
    manage_adapters: bool = False
    max_concurrent_requests: int = Field(16, ge=1)
    max_resident_adapters: int = Field(8, ge=0)
    # Serve any adapter folder directly under <adapter-root>/<name>/ by its folder name on first
    # use (validated then; the first request waits). Counted against max_resident_adapters.
    lazy_adapters: bool = False
    sources: tuple[SourceGrant, ...] = Field((), max_length=256)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_manage(self) -> bool:
        return self.is_admin or self.manage_adapters


# The caller of an open server: may do everything.
OPEN = Tenant(name="open", key_sha256="0" * 64, role="admin", max_concurrent_requests=1 << 30, max_resident_adapters=1 << 30)


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[Tenant]

    @field_validator("tenants")
    @classmethod
    def _unique(cls, v: list[Tenant]) -> list[Tenant]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if len({t.key_sha256 for t in v}) != len(v):
            raise ValueError("two tenants share an API key")
        return v

    @model_validator(mode="after")
    def _one_owner(self) -> _TenantsFile:
        owners: dict[str, str] = {}
        for t in self.tenants:
            for a in t.adapters:
                if a in owners:
                    raise ValueError(f"adapter {a!r} is listed by tenants {owners[a]!r} and {t.name!r}")
                owners[a] = t.name
        return self


class TenantDirectory:
    """Authentication and authorization of callers."""

    def __init__(self, tenants: Sequence[Tenant] | None) -> None:
        self.open = tenants is None
        self.tenants = list(tenants or [])
        self._owner = {a: t.name for t in self.tenants for a in t.adapters}
        self._by_name = {t.name: t for t in self.tenants}

    @classmethod
    def from_file(cls, path: Path | None) -> TenantDirectory:
        if path is None:
            log.warning("no tenants file: the server is OPEN, every caller may use and manage every adapter")
            return cls(None)
        text = Path(path).read_text(encoding="utf-8")
        try:
            raw = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
            parsed = _TenantsFile.model_validate(raw)
        except (ValidationError, ValueError, yaml.YAMLError) as e:
            raise ValueError(f"tenants file {path}: {e}") from None
        log.info("tenants file %s: %d tenants", path, len(parsed.tenants))
        return cls(parsed.tenants)

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant whose key is in the `authorization: Bearer` metadata."""
        if self.open:
            return OPEN
        key = None
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if len(values) > 1:
            # Proxies and clients disagree on which of two headers counts: refuse instead of guessing.
            raise Unauthenticated("more than one authorization header")
        for v in values:
            value = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                key = token.strip()
        if key is None:
            raise Unauthenticated("missing 'authorization: Bearer <key>' metadata")
        digest = hash_key(key)
        found = None
        for t in self.tenants:  # constant time per comparison, and every tenant is compared
            if hmac.compare_digest(digest, t.key_sha256):
                found = t
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    def owner_of(self, adapter_id: str) -> str | None:
        """The tenant a tenants file gives `adapter_id` to, if any."""
        return self._owner.get(adapter_id)

    @staticmethod
    def may_see(tenant: Tenant, owner: str | None) -> bool:
        """May `tenant` use (and see) an adapter owned by `owner`? Callers answer NOT_FOUND when not,
        exactly as for an absent adapter, so nobody learns which ids other tenants have."""
        return tenant.is_admin or owner == tenant.name

    def check_base(self, tenant: Tenant) -> None:
        if not (tenant.is_admin or tenant.allow_base_model):
            raise PermissionDenied("this API key may not use the base model")

    @staticmethod
    def check_source(tenant: Tenant, uri: SourceUri) -> None:
        """May `tenant` load from `uri`? Decided from the tenants file alone, before the store is
        asked anything, so the refusal is the same whether or not anything is there."""
        if not (tenant.is_admin or any(uri.within(g.uri) for g in tenant.sources)):
            raise PermissionDenied(f"adapter source {uri} is not granted to this API key")

    @staticmethod
    def pins(tenant: Tenant, uri: SourceUri) -> dict[str, str]:
        """The sha256 digests `tenant`'s grants pin for files of the adapter at `uri`."""
        return {f: d for g in tenant.sources if uri.within(g.uri) for f, d in g.sha256.items()}

    @staticmethod
    def on_demand(tenant: Tenant) -> SourceUri | None:
        """The prefix ids `tenant` names are resolved under on first use, if any."""
        return next((g.uri for g in tenant.sources if g.on_demand), None)

    @staticmethod
    def check_manage(tenant: Tenant) -> None:
        """May `tenant` load/unload/merge adapters at all (which ones: `may_see`)?"""
        if not tenant.may_manage():
            raise PermissionDenied("managing adapters needs the admin role or manage_adapters")
