"""Shards in object storage, against a real S3-compatible server (moto in server mode) on 127.0.0.1.

The server runs as its own process on a free port; boto3 talks HTTP to it as it would to S3 or
MinIO. Asserted on what is stored: the objects, their bytes, the order the index appears in, and
what the unchanged loader reads back through ``pipe:sdo data cat``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")  # the `s3` server fixture is in tests/conftest.py

from pipelines.errors import DataError, ShardIndexError
from pipelines.remote import ObjectStoreError, cat, pipe_source, s3_client, upload_shards
from pipelines.shard import write_shards
from pipelines.sources import resolve_shards
from pipelines.synth import generate

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    generate(root / "coco", 12, 0, size=64, seed=0)
    out = root / "shards"
    write_shards(root / "coco" / "train", root / "coco" / "annotations" / "instances_train.json", out, shard_size=4,
                 progress=False)
    return out


def bucket(endpoint: str, name: str):
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    return client


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_upload_stores_every_shard_and_the_index_last(s3, shards):
    client = bucket(s3, "coco")
    before = digests(shards)
    order = []
    report = upload_shards(shards, "s3://coco/shards/train", endpoint_url=s3,
                           progress=lambda name, size: order.append(
                               (name, "index.json" in keys(client, "coco"))))
    assert report["shards"] == 3 and report["index_url"] == "s3://coco/shards/train/index.json"
    # No index was visible while the shards went up; it is there now, and every object is byte-identical.
    assert [seen for _, seen in order] == [False, False, False]
    stored = {key.rsplit("/", 1)[1]: hashlib.sha256(client.get_object(Bucket="coco", Key=key)["Body"].read()).hexdigest()
              for key in keys(client, "coco", full=True)}
    assert stored == before
    assert digests(shards) == before  # the local input is only read


def keys(client, name: str, full: bool = False) -> list[str]:
    listed = client.list_objects_v2(Bucket=name).get("Contents", [])
    return [o["Key"] if full else o["Key"].rsplit("/", 1)[1] for o in listed]


def test_reupload_hides_the_old_index_until_the_new_shards_are_stored(s3, shards, tmp_path):
    client = bucket(s3, "again")
    upload_shards(shards, "s3://again/p", endpoint_url=s3)
    seen = []
    upload_shards(shards, "s3://again/p", endpoint_url=s3,
                  progress=lambda name, size: seen.append("index.json" in keys(client, "again")))
    assert seen == [False, False, False]
    assert json.loads(client.get_object(Bucket="again", Key="p/index.json")["Body"].read()) == \
        json.loads((shards / "index.json").read_text())


def test_the_loader_reads_the_uploaded_shards_through_pipe(s3, shards, monkeypatch):
    bucket(s3, "load")
    report = upload_shards(shards, "s3://load/coco/train", endpoint_url=s3)
    command = f"{shlex.quote(sys.executable)} -m orchestrator.cli"
    source = pipe_source(report["index_url"], endpoint_url=s3, command=command)
    assert source.startswith("pipe:") and source.endswith("s3://load/coco/train/index.json")
    # the pipe command runs this checkout's CLI, as `sdo` would in the image
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    shard_set = resolve_shards(source)
    local = resolve_shards(shards)
    assert shard_set.index == local.index and shard_set.num_samples == 12
    for remote, here in zip(shard_set.shards, local.shards, strict=True):
        assert remote.url.endswith(Path(here.url).name) and remote.count == here.count
        out = subprocess.run(remote.url[len("pipe:"):], shell=True, capture_output=True, timeout=60, check=True)
        assert out.stdout == Path(here.url).read_bytes()


def test_cat_streams_one_object(s3, shards):
    bucket(s3, "cat")
    upload_shards(shards, "s3://cat/x", endpoint_url=s3)
    out = io.BytesIO()
    assert cat("s3://cat/x/shard-000000.tar", out, endpoint_url=s3) == (shards / "shard-000000.tar").stat().st_size
    assert out.getvalue() == (shards / "shard-000000.tar").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"read s3://cat/x/nope\.tar: not found"):
        cat("s3://cat/x/nope.tar", io.BytesIO(), endpoint_url=s3)


def test_bad_input_is_refused_before_anything_is_uploaded(s3, shards, tmp_path):
    client = bucket(s3, "bad")
    with pytest.raises(FileNotFoundError, match=r"bucket nobucket: not found"):
        upload_shards(shards, "s3://nobucket/p", endpoint_url=s3)
    with pytest.raises(DataError, match=r"expected s3://BUCKET"):
        upload_shards(shards, "gs://bad/p", endpoint_url=s3)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in shards.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "shard-000001.tar").write_bytes(b"truncated")
    with pytest.raises(ShardIndexError, match=r"shard-000001\.tar: 9 bytes, the index says"):
        upload_shards(broken, "s3://bad/p", endpoint_url=s3)
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(ShardIndexError, match=r"lists shard-000001\.tar, which is missing"):
        upload_shards(broken, "s3://bad/p", endpoint_url=s3)
    assert keys(client, "bad") == []


def test_a_dead_endpoint_fails_in_bounded_time():
    port = free_port()  # nothing listens there
    client = s3_client(f"http://127.0.0.1:{port}", connect_timeout=0.5, read_timeout=0.5, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(ObjectStoreError, match=rf"failed at http://127\.0\.0\.1:{port}"):
        cat("s3://b/k", io.BytesIO(), client=client)
    assert time.monotonic() - start < 20


def test_cli_upload_and_cat(s3, shards, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    bucket(s3, "cli")
    result = CliRunner().invoke(main, ["data", "upload", str(shards), "s3://cli/coco/train", "--endpoint-url", s3])
    assert result.exit_code == 0, result.output
    assert "pipe:sdo data cat --endpoint-url" in result.stdout
    result = CliRunner().invoke(main, ["data", "cat", "s3://cli/coco/train/index.json", "--endpoint-url", s3])
    assert result.exit_code == 0 and json.loads(result.stdout_bytes) == json.loads((shards / "index.json").read_text())
    result = CliRunner().invoke(main, ["data", "upload", str(tmp_path), "s3://cli/x", "--endpoint-url", s3])
    assert result.exit_code == 2 and result.stderr.startswith("sdo: error: ") and "no index.json" in result.stderr
