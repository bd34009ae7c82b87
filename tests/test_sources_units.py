"""Adapter sources without the engine: URIs and tenants' grants, and the fetcher against a real
S3-compatible server on loopback (rclone) with boto3, faults injected by a proxy at chosen bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from s3_helpers import FaultProxy, S3Server

from serve.adapters.sources import AdapterSources, SourceConfig, parse_source, request_pins
from serve.adapters.sources.fetch import Fetcher
from serve.adapters.sources.s3 import S3Resolver
from serve.adapters.sources.uri import Scheme
from serve.errors import InvalidRequest, PermissionDenied, SourceDenied, SourceNotFound, SourceUnavailable
from serve.tenants import SourceGrant, Tenant, TenantDirectory

WEIGHTS = "adapter_model.safetensors"


def test_uris_are_canonical_and_strict():
    assert str(parse_source("s3://adapters/acme/x/")) == "s3://adapters/acme/x"
    assert parse_source("s3://adapters/acme/x/") == parse_source("s3://adapters/acme/x")
    hub = parse_source("hf://org/name@refs/pr/1")
    assert (hub.bucket, hub.revision, str(hub)) == ("org/name", "refs/pr/1", "hf://org/name@refs/pr/1")
    assert hub.file(WEIGHTS) == f"hf://org/name/{WEIGHTS}@refs/pr/1"
    assert str(parse_source("s3://adapters/acme").child("x")) == "s3://adapters/acme/x"
    assert str(parse_source("hf://org").child("name")) == "hf://org/name"
    for bad, why in [("s3://adapters/acme/../globex", "'..'"), ("s3://adapters//x", "empty"), ("s3://Bad_Bucket/x", "bucket"),
                     ("s3://adapters/a%2e%2e/x", "'%'"), ("s3://adapters/a\\b", "'\\\\'"), ("ftp://x/y", "scheme"),
                     ("hf://org/name/extra", "hf://org/name"), ("hf://org/name@..", "revision"), ("s3://adapters/" + "x" * 1100, "1024")]:
        with pytest.raises(InvalidRequest) as e:
            parse_source(bad)
        assert why.strip("'") in e.value.message or why in e.value.message, (bad, e.value.message)
    with pytest.raises(InvalidRequest, match="organization"):
        parse_source("hf://org/name").child("x")


def test_grants_are_prefixes_by_segment():
    acme = Tenant(name="acme", key_sha256="1" * 64, sources=(
        SourceGrant(prefix="s3://adapters/acme/", on_demand=True, sha256={f"s3://adapters/acme/x/{WEIGHTS}": "AB" * 32}),
        SourceGrant(prefix="hf://org/pinned@v1"),
        SourceGrant(prefix="hf://team")))
    admin = Tenant(name="ops", key_sha256="2" * 64, role="admin")
    d = TenantDirectory([acme, admin])
    for ok in ("s3://adapters/acme", "s3://adapters/acme/x", "hf://org/pinned@v1", "hf://team/any@main"):
        d.check_source(acme, parse_source(ok))
    for refused in ("s3://adapters/acme-evil/x", "s3://adapters/globex/x", "s3://other/acme/x", "hf://org/pinned",
                    "hf://org/pinned@v2", "hf://org/other"):
        with pytest.raises(PermissionDenied) as e:
            d.check_source(acme, parse_source(refused))
        assert e.value.message == f"adapter source {parse_source(refused)} is not granted to this API key"
    d.check_source(admin, parse_source("s3://anything/at/all"))
    assert d.pins(acme, parse_source("s3://adapters/acme/x")) == {f"s3://adapters/acme/x/{WEIGHTS}": "ab" * 32}
    assert str(d.on_demand(acme)) == "s3://adapters/acme" and d.on_demand(admin) is None
    with pytest.raises(ValueError, match="64 hex"):
        SourceGrant(prefix="s3://adapters/acme", sha256={"s3://adapters/acme/x/a": "zz"})
    with pytest.raises(ValueError, match="not a valid S3 bucket"):
        SourceGrant(prefix="s3://A/x")
    uri = parse_source("s3://adapters/acme/x")
    assert request_pins(uri, {WEIGHTS: "CD" * 32}) == {f"s3://adapters/acme/x/{WEIGHTS}": "cd" * 32}
    for bad, why in [({"../etc/passwd": "00" * 32}, "not an adapter file"), ({WEIGHTS: "00"}, "64 hex")]:
        with pytest.raises(InvalidRequest, match=why):
            request_pins(uri, bad)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("s3-units")
    root = top / "buckets"
    atlas = root / "adapters" / "common" / "atlas"  # the fetcher moves bytes; the registry's tests validate them
    atlas.mkdir(parents=True)
    (atlas / "adapter_config.json").write_text('{"r": 8, "target_modules": ["q_proj"]}')
    (atlas / WEIGHTS).write_bytes(os.urandom(300_000))
    (atlas / "README.md").write_text("never fetched")
    server = S3Server(root, top / "rclone.log")
    proxy = FaultProxy(server.port)
    server.proxy = proxy
    yield server
    server.stop()


@pytest.fixture
def fetcher(s3, monkeypatch):
    for k, v in s3.env(s3.proxy.url).items():
        monkeypatch.setenv(k, v)
    s3.proxy.reset()
    f = Fetcher(SourceConfig(retries=2, backoff_s=0.01, s3_addressing_style="path"))
    yield f
    f.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_is_listed_bounded_and_verified(s3, fetcher, tmp_path):
    atlas = s3.root / "adapters" / "common" / "atlas"
    uri = parse_source("s3://adapters/common/atlas/")
    listing = fetcher.list(uri, 1 << 30)
    assert [(f.name, f.size) for f in listing.files] == [(n, (atlas / n).stat().st_size) for n in ("adapter_config.json", WEIGHTS)]
    fetcher.download(listing, tmp_path, {uri.file(WEIGHTS): _sha(atlas / WEIGHTS)})
    assert all((tmp_path / n).read_bytes() == (atlas / n).read_bytes() for n in ("adapter_config.json", WEIGHTS))
    assert all(oct((tmp_path / n).stat().st_mode & 0o777) == "0o600" for n in ("adapter_config.json", WEIGHTS))
    # limits come from the listing: nothing is fetched
    s3.proxy.reset()
    with pytest.raises(InvalidRequest, match=f"{WEIGHTS} is {(atlas / WEIGHTS).stat().st_size} bytes"):
        fetcher.list(uri, 1000)
    assert s3.proxy.requests and s3.proxy.gets(WEIGHTS) == s3.proxy.gets(".json") == 0  # listed, never read
    with pytest.raises(InvalidRequest, match="sha256 of s3://adapters/common/atlas/adapter_config.json is"):
        fetcher.download(listing, tmp_path, {uri.file("adapter_config.json"): "0" * 64})


def test_failures_are_named_and_transient_ones_retried(s3, fetcher, tmp_path):
    uri = parse_source("s3://adapters/common/atlas")
    listing = fetcher.list(uri, 1 << 30)
    for missing, why in [("s3://adapters/common/nope", "has no adapter_config.json"), ("s3://nobucket/x", "NoSuchBucket")]:
        with pytest.raises(SourceNotFound, match=why):
            fetcher.list(parse_source(missing), 1 << 30)
    # a transfer cut after 1000 bytes, every time: 1 + 2 retries, then UNAVAILABLE naming it
    s3.proxy.reset()
    s3.proxy.cut_after[WEIGHTS] = 1000
    with pytest.raises(SourceUnavailable, match=r"transfer of .*adapter_model.safetensors was cut.*truncated.*after 3 attempts"):
        fetcher.download(listing, tmp_path, {})
    assert s3.proxy.gets(WEIGHTS) == 3
    # cut once, then the endpoint is down: retries find nobody
    s3.proxy.reset()
    s3.proxy.cut_after[WEIGHTS] = 1000
    s3.proxy.down_after_cut = True
    with pytest.raises(SourceUnavailable, match="could not be reached.*after 3 attempts"):
        fetcher.download(listing, tmp_path, {})
    # cut once, then back: the retry completes the file
    s3.proxy.reset()
    s3.proxy.cut_after[WEIGHTS] = 1000
    s3.proxy.cut_once = True
    fetcher.download(listing, tmp_path, {})
    assert _sha(tmp_path / WEIGHTS) == _sha(s3.root / "adapters" / "common" / "atlas" / WEIGHTS)
    assert s3.proxy.gets(WEIGHTS) == 2
    # the store refuses the server's credentials: named, not retried
    s3.start(("someone-else", "another-secret"))
    try:
        s3.proxy.reset()
        with pytest.raises(SourceDenied, match="refused the server's credentials"):
            fetcher.list(uri, 1 << 30)
        assert len(s3.proxy.requests) == 1
    finally:
        s3.start()


def test_staging_is_private_and_removed_whatever_happens(s3, fetcher, tmp_path, monkeypatch):
    sources = AdapterSources(fetcher.config, tmp_path, 2)
    uri = parse_source("s3://adapters/common/atlas")

    async def run() -> None:
        listing = await sources.list(uri, 1 << 30)
        async with sources.staged(listing, {}) as folder:
            assert folder.parent == tmp_path and oct(folder.stat().st_mode & 0o777) == "0o700"
            assert sorted(os.listdir(folder)) == ["adapter_config.json", WEIGHTS]
        assert not folder.exists()
        s3.proxy.cut_after[WEIGHTS] = 1000
        with pytest.raises(SourceUnavailable):
            async with sources.staged(listing, {}):
                raise AssertionError("a failed download yields nothing")
        assert os.listdir(tmp_path) == []

    try:
        asyncio.run(run())
    finally:
        sources.close()


def test_each_file_has_a_deadline(s3, fetcher, tmp_path):
    """A deadline already past when the first chunk arrives (no clock race: any machine is slower
    than a microsecond): the attempt fails naming the setting, and is retried like a cut transfer."""
    uri = parse_source("s3://adapters/common/atlas")
    listing = fetcher.list(uri, 1 << 30)
    hurried = Fetcher(SourceConfig(file_timeout_s=1e-6, retries=1, backoff_s=0.01),
                      resolvers={Scheme.S3: S3Resolver(fetcher.config)})  # the client itself with normal timeouts
    try:
        with pytest.raises(SourceUnavailable, match=r"not downloaded within 1e-06s \(source_file_timeout_s\).*after 2 attempts"):
            hurried.download(listing, tmp_path, {})
    finally:
        hurried.close()
