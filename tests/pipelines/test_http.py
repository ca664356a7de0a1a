"""Remote shard sources that never answer fail in bounded time with a line naming them (real sockets on 127.0.0.1)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import http

ROOT = Path(__file__).resolve().parents[2]


def _launch(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess, float]:
    sys.path.insert(0, str(ROOT / "tests" / "orchestrator"))
    from train_helpers import make_shards, tiny_config

    shards = make_shards(tmp_path, num_train=4, num_val=2, size=64)
    path, _ = tiny_config(tmp_path / "t.yaml", shards, tmp_path / "runs")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "--config", str(path), "--name", "remote",
                           "--set", f"data.train_shards={source}"], capture_output=True, text=True, timeout=300,
                          check=False)
    return done, time.monotonic() - started


def test_a_black_hole_index_server_fails_within_two_minutes(tmp_path):
    with socket.socket() as hole:  # accepts (the kernel does), never reads, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/coco/train/index.json"
        done, seconds = _launch(tmp_path, url)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdo: error: data.train_shards='{url}': ") and "no answer after 3 attempts" in last
    assert seconds < 120
    assert not (tmp_path / "runs" / "remote").exists()


def test_no_server_is_refused_quickly_and_a_404_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(OSError, match=f"127.0.0.1:{port}/index.json: no answer after 3 attempts"):
        http.fetch(f"http://127.0.0.1:{port}/index.json")
    assert time.monotonic() - started < 3 * http.CONNECT_TIMEOUT_S


def test_webdataset_reads_http_shards_with_the_stall_limit():
    from webdataset.gopen import gopen_schemes

    import pipelines.sources  # noqa: F401  (installs the handler)

    assert gopen_schemes["http"] is http.bounded_curl and gopen_schemes["https"] is http.bounded_curl
    pipe = http.bounded_curl("http://127.0.0.1:9/x.tar")
    try:
        command = pipe.args[0][0]  # Pipe keeps (popen args, popen kwargs)
        assert command[command.index("--speed-time") + 1] == str(http.STALL_S)
    finally:
        pipe.proc.kill()
        pipe.proc.wait()
