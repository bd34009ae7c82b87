"""`hf://org/name[@revision]` through the hub's own client (huggingface_hub).

Online, the listing asks the hub for the candidate files' sizes (and, for files kept in LFS,
their sha256, which every download is checked against); each file is then fetched into the
hub's cache (HF_HUB_CACHE, HF_TOKEN and HF_ENDPOINT as usual) and streamed from there into the
server's staging folder with the same bounds as any source. With HF_HUB_OFFLINE=1 (the default in
the images: pods reach nothing outside the cluster) only the hub client's local cache is read, for
example one filled by a sync job or baked into the image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from serve.adapters.sources.base import CHUNK, Listing, RemoteFile, SourceConfig
from serve.adapters.sources.uri import SourceUri
from serve.errors import InvalidRequest, ServeError, SourceDenied, SourceNotFound, SourceUnavailable

__all__ = ["HubResolver"]


def _error(e: Exception, what: str) -> ServeError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return SourceDenied(f"the hub refused the server's token for {what} (a gated repository)")
    if isinstance(e, errors.RepositoryNotFoundError | errors.RevisionNotFoundError | errors.EntryNotFoundError):
        return SourceNotFound(f"no adapter at {what}: {type(e).__name__}")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return SourceNotFound(f"no adapter at {what} in the hub client's cache (offline)")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", 0) or 0
        if status in (401, 403):
            return SourceDenied(f"the hub refused the server's token for {what} ({status})")
        if status == 404:
            return SourceNotFound(f"no adapter at {what} (404)")
        return SourceUnavailable(f"the hub failed on {what} ({status or type(e).__name__})")
    return SourceUnavailable(f"the hub could not be reached for {what} ({type(e).__name__})")


class HubResolver:
    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    @staticmethod
    def _offline() -> bool:
        from huggingface_hub import constants

        return constants.is_offline_mode()

    def list(self, uri: SourceUri, names: tuple[str, ...]) -> tuple[list[RemoteFile], str | None]:
        if "/" not in uri.bucket:
            raise InvalidRequest(f"{uri} names an organization; an adapter is hf://org/name[@revision]")
        if self._offline():
            return self._list_cached(uri, names), uri.revision
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            commit = api.model_info(uri.bucket, revision=uri.revision).sha  # pin the revision every file is read at
            entries = api.get_paths_info(uri.bucket, list(names), revision=commit)
        except Exception as e:  # noqa: BLE001 - every hub failure is classified
            raise _error(e, str(uri)) from None
        found = []
        for entry in entries:
            if getattr(entry, "size", None) is None or entry.path not in names:
                continue  # a folder
            lfs = getattr(entry, "lfs", None)
            found.append(RemoteFile(entry.path, uri.file(entry.path), int(entry.size), entry.path,
                                    getattr(lfs, "sha256", None) if lfs is not None else None))
        return found, commit

    def _list_cached(self, uri: SourceUri, names: tuple[str, ...]) -> list[RemoteFile]:
        from huggingface_hub import try_to_load_from_cache

        found = []
        for name in names:
            path = try_to_load_from_cache(uri.bucket, name, revision=uri.revision)
            if isinstance(path, str):
                found.append(RemoteFile(name, uri.file(name), os.stat(path).st_size, name))
        if not found:
            raise SourceNotFound(f"no adapter at {uri} in the hub client's cache (offline: HF_HUB_OFFLINE is set)")
        return found

    @contextlib.contextmanager
    def open(self, file: RemoteFile, listing: Listing, timeout: float) -> Iterator[Iterator[bytes]]:
        from huggingface_hub import hf_hub_download

        try:
            # Into the hub's cache first (its client resumes and verifies), then streamed from there.
            path = hf_hub_download(listing.uri.bucket, file.key, revision=listing.revision, local_files_only=self._offline(),
                                   etag_timeout=min(timeout, 60.0))
        except Exception as e:  # noqa: BLE001
            raise _error(e, file.uri) from None
        with open(Path(path), "rb") as f:
            yield iter(lambda: f.read(CHUNK), b"")
