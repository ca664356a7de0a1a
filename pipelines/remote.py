"""Shards in object storage: upload a shard directory to ``s3://bucket/prefix``, stream an object back.

Upload order makes the remote copy safe to read at any moment, the way pipelines/shard.py keeps a
local directory safe: the old ``index.json`` is deleted first (a reader then sees "no index", never an
index over half-replaced shards), every shard is uploaded (one S3 object each, all-or-nothing) and
its size checked, and the index is written last. An upload that died part way leaves no index:
rerunning it is safe.

The loader reads the result without new code through webdataset's ``pipe:`` (see
:func:`pipe_source`): ``pipe:sdo data cat s3://bucket/prefix/index.json``, the shard URLs following
from it. Every S3 call has connect and read timeouts and a bounded number of attempts (botocore's
standard retry mode, exponential backoff), so a dead endpoint fails in bounded time and names itself.

Credentials and the endpoint come from the usual AWS settings (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role; ``AWS_ENDPOINT_URL`` or ``endpoint_url`` for
S3-compatible stores such as MinIO or Ceph). Needs boto3 (``pip install sdo[s3]``).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from pipelines.errors import DataError, ShardIndexError
from pipelines.shard import INDEX_FORMAT, INDEX_NAME

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 60.0     # seconds without a byte on an open connection
MAX_ATTEMPTS = 5        # per S3 call, first try included
CHUNK = 1 << 20
MAX_PUT_BYTES = 5 * 1024**3  # one S3 PUT; larger shards need multipart: shard with --max-bytes below this


class ObjectStoreError(RuntimeError):
    """Object storage could not be reached or refused a request (not bad input: exit 1)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing '/'; '' = the bucket's root

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/some/prefix`` -> S3Location; anything else is a DataError naming the URL."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise DataError(f"{url!r}: expected s3://BUCKET[/PREFIX] (gs:// and others are not supported by upload)")
    if parts.query or parts.fragment:
        raise DataError(f"{url!r}: no '?' or '#' in an s3:// URL")
    return S3Location(parts.netloc, parts.path.strip("/"))


def s3_client(endpoint_url: str | None = None, *, connect_timeout: float = CONNECT_TIMEOUT,
              read_timeout: float = READ_TIMEOUT, max_attempts: int = MAX_ATTEMPTS):
    """A boto3 S3 client with bounded timeouts and retries."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DataError("s3:// needs boto3: pip install 'sdo[s3]' (or pip install boto3)") from None
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"} if endpoint_url or os.environ.get("AWS_ENDPOINT_URL") else None)
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


def _store_error(err: Exception, what: str, endpoint: str) -> Exception:
    """One line for a failed S3 call: bad input (DataError) for a missing bucket/object, else ObjectStoreError."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        message = err.response.get("Error", {}).get("Message", "") or code
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{what}: not found ({code}) at {endpoint}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DataError(f"{what}: access denied at {endpoint} ({message}): check the AWS credentials")
        return ObjectStoreError(f"{what} failed at {endpoint}: {code} {message}".strip())
    if isinstance(err, BotoCoreError):
        return ObjectStoreError(f"{what} failed at {endpoint}: {str(err).splitlines()[0]}")
    return err


def _endpoint(client) -> str:
    return client.meta.endpoint_url


def _call(client, what: str, fn: Callable, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (BotoCoreError, ClientError) as err:
        raise _store_error(err, what, _endpoint(client)) from None


def _local_index(shard_dir: Path) -> dict:
    """The index of a local shard directory, with every shard it lists present at its recorded size."""
    index_file = shard_dir / INDEX_NAME
    if not index_file.is_file():
        raise FileNotFoundError(f"{shard_dir}: no {INDEX_NAME} (write the shards with `sdo data shard` first)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ShardIndexError(f"{index_file} is not valid JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ShardIndexError(f"{index_file} is not an sdo shard index (format {INDEX_FORMAT!r})")
    for shard in index["shards"]:
        path = shard_dir / shard["name"]
        if not path.is_file():
            raise ShardIndexError(f"{index_file} lists {shard['name']}, which is missing from {shard_dir}")
        if "bytes" in shard and path.stat().st_size != shard["bytes"]:
            raise ShardIndexError(f"{path}: {path.stat().st_size} bytes, the index says {shard['bytes']} "
                                  f"(changed after sharding?)")
    return index


def upload_shards(shard_dir: str | os.PathLike, destination: str, *, client=None, endpoint_url: str | None = None,
                  progress: Callable[[str, int], None] | None = None) -> dict:
    """Upload ``shard_dir`` (shard-*.tar + index.json) to ``destination`` (s3://bucket/prefix), index last.

    Returns {'destination', 'index_url', 'shards', 'bytes', 'endpoint_url'}. The local files are only read.
    """
    shard_dir = Path(shard_dir)
    location = parse_s3_url(destination)
    index = _local_index(shard_dir)
    client = client or s3_client(endpoint_url)
    _call(client, f"bucket {location.bucket}", client.head_bucket, Bucket=location.bucket)
    # Readers must never see the old index over new shards: without an index the prefix is unreadable.
    _call(client, f"delete {location.url}/{INDEX_NAME}", client.delete_object, Bucket=location.bucket,
          Key=location.key(INDEX_NAME))
    total = 0
    for shard in index["shards"]:
        path, key = shard_dir / shard["name"], location.key(shard["name"])
        size = path.stat().st_size
        if size > MAX_PUT_BYTES:
            raise DataError(f"{path}: {size} bytes is over one S3 PUT ({MAX_PUT_BYTES}); reshard with a smaller --max-bytes")
        with open(path, "rb") as handle:
            _call(client, f"upload {path} -> s3://{location.bucket}/{key}", client.put_object, Bucket=location.bucket,
                  Key=key, Body=handle, ContentLength=size, ContentType="application/x-tar")
        head = _call(client, f"check s3://{location.bucket}/{key}", client.head_object, Bucket=location.bucket, Key=key)
        if head["ContentLength"] != size:
            raise ObjectStoreError(f"s3://{location.bucket}/{key}: {head['ContentLength']} bytes stored, {size} sent")
        total += size
        if progress:
            progress(shard["name"], size)
    body = (shard_dir / INDEX_NAME).read_bytes()
    _call(client, f"upload {location.url}/{INDEX_NAME}", client.put_object, Bucket=location.bucket,
          Key=location.key(INDEX_NAME), Body=body, ContentType="application/json")
    return {"destination": location.url, "index_url": f"{location.url}/{INDEX_NAME}", "shards": len(index["shards"]),
            "bytes": total, "endpoint_url": _endpoint(client)}


def cat(url: str, out: BinaryIO | None = None, *, client=None, endpoint_url: str | None = None) -> int:
    """Stream the object ``url`` (s3://bucket/key) to ``out`` (default stdout); returns the bytes written."""
    location = parse_s3_url(url)
    if not location.prefix:
        raise DataError(f"{url!r}: names a bucket, not an object")
    out = out if out is not None else sys.stdout.buffer
    client = client or s3_client(endpoint_url)
    response = _call(client, f"read {url}", client.get_object, Bucket=location.bucket, Key=location.prefix)
    from botocore.exceptions import BotoCoreError

    written = 0
    try:
        for chunk in response["Body"].iter_chunks(CHUNK):
            out.write(chunk)
            written += len(chunk)
    except BotoCoreError as err:  # e.g. the read timeout on a stalled stream
        raise _store_error(err, f"read {url}", _endpoint(client)) from None
    out.flush()
    if written != response["ContentLength"]:
        raise ObjectStoreError(f"{url}: stream ended after {written} of {response['ContentLength']} bytes")
    return written


def pipe_source(index_url: str, *, endpoint_url: str | None = None, command: str = "sdo") -> str:
    """The ``data.*_shards`` value that makes the loader read an uploaded index and its shards via ``pipe:``.

    pipelines/sources.py replaces the last ``index.json`` of a pipe command by each shard's name, so one
    command serves the index and every shard.
    """
    words = shlex.split(command) + ["data", "cat"] + (["--endpoint-url", endpoint_url] if endpoint_url else []) + [index_url]
    return "pipe:" + shlex.join(words)
