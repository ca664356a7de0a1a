"""Where runs live: a local folder, or a prefix in object storage (``s3://``, ``gs://``).

``location(text)`` gives a ``pathlib.Path`` for a local folder and a :class:`RemotePath` for a URI.
A RemotePath has the small part of Path's interface that a run's state needs (``/``, ``name``,
``parent``, ``exists``/``is_file``/``is_dir``, ``read_*``/``write_*``, ``touch``, ``unlink``,
``iterdir``, ``mkdir``), so the code that reads and writes ``sdo_run.json``, eval json, the stop
marker and checkpoint listings is the same for both. The I/O goes through ``pyarrow.fs``, the
filesystems Ray Train itself uses for checkpoints in object storage; credentials and the endpoint
come from the usual settings (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``
for S3-compatible servers, ``GOOGLE_APPLICATION_CREDENTIALS``...).

Object stores have no rename, but a single PUT is atomic: a reader sees the old object or the new
one, never half of one, which is what the local write-then-rename gives.
"""
from __future__ import annotations

import fnmatch
import os
from functools import lru_cache
from pathlib import Path, PurePosixPath

REMOTE_SCHEMES = ("s3", "gs")


def is_remote(text) -> bool:
    """Whether ``text`` names object storage (a RemotePath, or a string ``s3://…`` / ``gs://…``)."""
    return isinstance(text, RemotePath) or str(text).partition("://")[0] in REMOTE_SCHEMES and "://" in str(text)


def location(text: str | os.PathLike) -> Path | RemotePath:
    """A local folder (absolute Path) or a RemotePath for ``s3://bucket/prefix`` / ``gs://bucket/prefix``."""
    if isinstance(text, RemotePath):
        return text
    text = str(text)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in REMOTE_SCHEMES:
            raise ValueError(f"{text!r}: storage must be a local folder, s3://bucket/prefix or gs://bucket/prefix")
        return RemotePath(text)
    return Path(text).expanduser().resolve()


CONNECT_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 60
ATTEMPTS = 3


def _filesystem(scheme: str, bucket: str):
    """The pyarrow filesystem of ``bucket``; S3 calls are bounded (connect/request timeouts, 3 attempts), so a
    dead endpoint fails a run in about a minute instead of hanging it."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return _cached_filesystem(scheme, bucket, endpoint, region)


@lru_cache(maxsize=8)
def _cached_filesystem(scheme: str, bucket: str, endpoint: str | None, region: str | None):
    import pyarrow.fs

    if scheme == "s3":
        return pyarrow.fs.S3FileSystem(
            endpoint_override=endpoint, region=region,
            connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS))
    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def ray_storage(text: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local folder as it is; object storage
    as its path on the bounded filesystem above, so Ray's checkpoint uploads get the same timeouts."""
    if not is_remote(text):
        return str(text), None
    fs, path = RemotePath(str(text)).filesystem
    return path, fs


class RemotePath:
    """``scheme://bucket/key`` in object storage, with the Path methods a run's state needs."""

    def __init__(self, uri: str):
        scheme, rest = uri.split("://", 1)
        self.scheme = scheme
        self._key = PurePosixPath(rest.strip("/"))  # bucket/key...
        if not self._key.parts:
            raise ValueError(f"{uri!r}: no bucket")

    # ------------------------------------------------------------------ naming

    def __str__(self) -> str:
        return f"{self.scheme}://{self._key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(f"{self.scheme}://{self._key / str(part)}")

    @property
    def name(self) -> str:
        return self._key.name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{self._key.parent}") if len(self._key.parts) > 1 else self

    @property
    def filesystem(self):
        """The pyarrow filesystem and this object's path on it (what Ray Train's storage takes)."""
        return _filesystem(self.scheme, self._key.parts[0]), str(self._key)

    # ------------------------------------------------------------------ queries

    def _info(self):
        fs, path = self.filesystem
        return fs.get_file_info(path)

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.Directory

    def iterdir(self):
        import pyarrow.fs

        fs, path = self.filesystem
        selector = pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)
        for info in fs.get_file_info(selector):
            yield RemotePath(f"{self.scheme}://{info.path}")

    def glob(self, pattern: str):
        """Direct children whose name matches ``pattern`` (no ``**``)."""
        return (child for child in self.iterdir() if fnmatch.fnmatch(child.name, pattern))

    # ------------------------------------------------------------------ contents

    def read_bytes(self) -> bytes:
        fs, path = self.filesystem
        try:
            # one ranged GET of the whole object; a stream's read() asks for it ~256 KiB at a time
            with fs.open_input_file(path) as file:
                return file.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such object: {self}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        fs, path = self.filesystem
        with fs.open_output_stream(path) as stream:  # one PUT: readers see all of it or the old object
            stream.write(data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def touch(self) -> None:
        self.write_bytes(b"")

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self.filesystem
        if not self.exists():
            if missing_ok:
                return
            raise FileNotFoundError(f"no such object: {self}")
        fs.delete_file(path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders; only the refusal of an existing one matters."""
        if self.exists() and not exist_ok:
            raise FileExistsError(str(self))

    def rmtree(self) -> None:
        fs, path = self.filesystem
        fs.delete_dir(path)


def remove_tree(path: Path | RemotePath) -> None:
    """``shutil.rmtree`` for both kinds (missing is fine)."""
    import shutil

    if isinstance(path, RemotePath):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)
