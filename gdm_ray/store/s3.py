"""S3 (or any S3-protocol server) as a place for results, models and artifacts.

Every object is written with one PUT of its whole body: S3 never shows a
partial object, so an upload that fails or is cut off leaves the key as it
was. Settings come from the ``store`` config group; a null value falls back
to the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL).
Every failure becomes a one-line :class:`StoreError` naming the URI.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gdm_ray.core.errors import GdmRayError

__all__ = ["S3Config", "S3", "StoreError", "is_s3", "split_s3", "join_uri"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
MAX_PUT = 5 * 1024**3  # S3's limit for a single PUT


class StoreError(GdmRayError, OSError):
    """A result store (local or S3) cannot be read or written."""


def is_s3(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key"); a bad bucket name is an error."""
    if not is_s3(uri):
        raise StoreError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise StoreError(f"{uri}: {bucket!r} is not a valid S3 bucket name")
    return bucket, key.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// prefix."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


@dataclass
class S3Config:
    """Where and as whom to talk S3 (the store config group); None = AWS environment."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 2

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any] | None) -> S3Config:
        values = dict(node or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StoreError(f"store: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @property
    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def region_name(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def describe(self) -> str:
        return self.endpoint or "AWS S3"

    def arrow_fs(self) -> Any:
        """The same place and identity as a pyarrow S3FileSystem (what Ray Tune
        writes its experiments with); a null key falls back to the AWS environment."""
        from urllib.parse import urlparse

        from pyarrow import fs

        kw: dict[str, Any] = {
            "region": self.region_name,
            "connect_timeout": float(self.connect_timeout),
            "request_timeout": float(self.read_timeout),
        }
        if self.access_key_id and self.secret_access_key:
            kw.update(access_key=self.access_key_id, secret_key=self.secret_access_key, session_token=self.session_token)
        if self.endpoint:
            url = urlparse(self.endpoint)
            kw.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        return fs.S3FileSystem(**kw)


class S3:
    """A boto3 S3 client with errors turned into one line each."""

    def __init__(self, cfg: S3Config | Mapping[str, Any] | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.cfg = cfg if isinstance(cfg, S3Config) else S3Config.from_cfg(cfg)
        c = self.cfg
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=c.endpoint,
            region_name=c.region_name,
            aws_access_key_id=c.access_key_id,
            aws_secret_access_key=c.secret_access_key,
            aws_session_token=c.session_token,
            config=Config(
                connect_timeout=c.connect_timeout,
                read_timeout=c.read_timeout,
                retries={"max_attempts": int(c.retries) + 1, "mode": "standard"},
                # path-style addressing works with every S3-protocol server (moto, MinIO, Ceph)
                s3={"addressing_style": "path"} if c.endpoint else {},
            ),
        )

    @contextlib.contextmanager
    def errors(self, uri: str) -> Iterator[None]:
        """Turn boto's exceptions into a StoreError naming ``uri`` and what to fix."""
        from botocore import exceptions as bx

        try:
            yield
        except bx.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            bucket = uri[len("s3://") :].split("/", 1)[0]
            if code == "NoSuchBucket":
                raise StoreError(f"{uri}: bucket {bucket!r} does not exist at {self.cfg.describe()}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
                raise StoreError(
                    f"{uri}: {self.cfg.describe()} rejected the credentials ({code}); check store.access_key_id/"
                    "secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                ) from None
            if code in ("AccessDenied", "403", "Forbidden") or status == 403:
                raise StoreError(f"{uri}: access denied by {self.cfg.describe()} ({code or status})") from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise StoreError(f"{uri}: no such object") from None
            raise StoreError(f"{uri}: S3 error {code or status}: {err.get('Message', exc)}") from None
        except bx.NoCredentialsError:
            raise StoreError(
                f"{uri}: no S3 credentials; set store.access_key_id and store.secret_access_key "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError) as exc:
            raise StoreError(f"{uri}: S3 endpoint {self.cfg.describe()} unreachable ({type(exc).__name__})") from None
        except bx.BotoCoreError as exc:
            raise StoreError(f"{uri}: S3 request failed at {self.cfg.describe()}: {str(exc).splitlines()[0]}") from None

    def check_bucket(self, uri: str) -> None:
        """Fail now, with a clear line, if the bucket is missing or the credentials are wrong."""
        bucket, _ = split_s3(uri)
        with self.errors(uri):  # a GET, not head_bucket: HEAD errors carry no code to tell these apart
            self.client.list_objects_v2(Bucket=bucket, MaxKeys=1)

    def put_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """One PUT of the whole body (atomic: readers see the old object or the new one)."""
        bucket, key = split_s3(uri)
        if not key:
            raise StoreError(f"{uri}: needs a key after the bucket")
        if len(data) > MAX_PUT:
            raise StoreError(f"{uri}: {len(data)} bytes is more than one S3 PUT takes ({MAX_PUT})")
        extra = {"ContentType": content_type} if content_type else {}
        with self.errors(uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)

    def put_file(self, uri: str, path: str | Path) -> None:
        self.put_bytes(uri, Path(path).read_bytes(), _content_type(str(path)))

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        with self.errors(uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        with self.errors(uri):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

    def list(self, prefix_uri: str) -> list[str]:
        """Keys under a prefix (as full s3:// URIs), sorted; the prefix is a folder."""
        bucket, prefix = split_s3(prefix_uri)
        prefix = f"{prefix}/" if prefix else ""
        out: list[str] = []
        with self.errors(prefix_uri):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        with self.errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def download(self, uri: str, dest: Path) -> Path:
        """One object to a local file, written to a temp name and renamed."""
        data = self.get_bytes(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return dest


def _content_type(name: str) -> str | None:
    return {".json": "application/json", ".png": "image/png", ".parquet": "application/vnd.apache.parquet", ".md": "text/markdown"}.get(
        Path(name).suffix
    )
