"""`s3://bucket/prefix` through boto3, on any S3-compatible endpoint (AWS, MinIO, R2, GCS
interoperability, rclone).

The endpoint, region and credentials come from the standard AWS configuration (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE and the shared files)
or from the server's settings (`s3_endpoint_url`, `s3_region`, `s3_profile`), never from a
request. botocore's own retries are off: the `Fetcher` retries every step the same way, streamed
bodies included (which botocore never retries).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from serve.adapters.sources.base import CHUNK, Listing, RemoteFile, SourceConfig
from serve.adapters.sources.uri import SourceUri
from serve.errors import ServeError, SourceDenied, SourceNotFound, SourceUnavailable

__all__ = ["S3Resolver"]

_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
           "InvalidToken", "ExpiredToken"}
# a body that ended before its Content-Length (the connection was cut mid-transfer)
_CUT = (bex.IncompleteReadError, bex.ResponseStreamingError)
# transport failures: the endpoint is down, the connection was cut, a read timed out
_TRANSIENT = (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
              bex.ResponseStreamingError, bex.IncompleteReadError, bex.HTTPClientError, ConnectionError, TimeoutError)


def _error(e: Exception, what: str) -> ServeError:
    """A boto3 failure as the server's error naming `what` and the cause (never credentials)."""
    if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError):
        return SourceDenied(f"{what}: the server has no S3 credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or a profile)")
    if isinstance(e, bex.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _MISSING or status == 404:
            return SourceNotFound(f"no adapter at {what}: the store answered {code or status}")
        if code in _DENIED or status == 403:
            return SourceDenied(f"the store refused the server's credentials for {what} ({code or status})")
        return SourceUnavailable(f"the store failed on {what} ({code or status})")
    if isinstance(e, _CUT):
        return SourceUnavailable(f"the transfer of {what} was cut before its end (truncated; {type(e).__name__})")
    if isinstance(e, _TRANSIENT):
        return SourceUnavailable(f"the store could not be reached for {what} ({type(e).__name__})")
    return SourceUnavailable(f"the S3 client failed on {what} ({type(e).__name__})")


class S3Resolver:
    def __init__(self, config: SourceConfig) -> None:
        session = boto3.session.Session(profile_name=config.s3_profile) if config.s3_profile else boto3.session.Session()
        self.client: Any = session.client(
            "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
            config=Config(connect_timeout=min(30.0, config.file_timeout_s), read_timeout=min(60.0, config.file_timeout_s),
                          retries={"total_max_attempts": 1}, s3={"addressing_style": config.s3_addressing_style}))

    def list(self, uri: SourceUri, names: tuple[str, ...]) -> tuple[list[RemoteFile], str | None]:
        # One request lists exactly the candidate names: they share the prefix `<key>/adapter_`.
        base = f"{uri.path}/" if uri.path else ""
        try:
            page = self.client.list_objects_v2(Bucket=uri.bucket, Prefix=base + "adapter_", Delimiter="/", MaxKeys=100)
        except Exception as e:  # noqa: BLE001 - every boto3/botocore failure is classified
            raise _error(e, str(uri)) from None
        found = []
        for obj in page.get("Contents", []):
            name = obj["Key"][len(base):]
            if name in names:
                found.append(RemoteFile(name, uri.file(name), int(obj["Size"]), obj["Key"]))
        return found, None

    @contextlib.contextmanager
    def open(self, file: RemoteFile, listing: Listing, timeout: float) -> Iterator[Iterator[bytes]]:
        try:
            answer = self.client.get_object(Bucket=listing.uri.bucket, Key=file.key)
        except Exception as e:  # noqa: BLE001
            raise _error(e, file.uri) from None
        body = answer["Body"]
        if int(answer.get("ContentLength", file.size)) != file.size:
            body.close()
            raise SourceUnavailable(f"{file.uri} is {answer.get('ContentLength')} bytes now, not the {file.size} listed "
                                    "(it changed while it was downloaded)")

        def chunks() -> Iterator[bytes]:
            try:
                while chunk := body.read(CHUNK):
                    yield chunk
            except ServeError:
                raise
            except Exception as e:  # noqa: BLE001 - a cut connection surfaces as botocore's or urllib3's error
                raise _error(e, file.uri) from None

        try:
            yield chunks()
        finally:
            body.close()
