"""Remote shard sources that never answer fail in bounded time with a line naming them (real sockets on 127.0.0.1)."""
from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import http as bounded_http

ROOT = Path(__file__).resolve().parents[2]


def _launch(tmp_path: Path, source: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    sys.path.insert(0, str(ROOT / "tests" / "orchestrator"))
    from train_helpers import make_shards, tiny_config

    shards = make_shards(tmp_path, num_train=4, num_val=2, size=64)
    path, _ = tiny_config(tmp_path / "t.yaml", shards, tmp_path / "runs")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "--config", str(path), "--name", "remote",
                           "--set", f"data.train_shards={source}"], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, **env})
    return done, time.monotonic() - started


def test_a_black_hole_index_server_fails_in_bounded_time(tmp_path):
    # by default within two minutes: every attempt times out, with the backoff between them
    backoff = sum(bounded_http.BACKOFF_S * 2 ** a for a in range(bounded_http.ATTEMPTS - 1))
    assert bounded_http.ATTEMPTS * bounded_http.READ_TIMEOUT_S + backoff < 120
    with socket.socket() as hole:  # accepts (the kernel does), never reads, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/coco/train/index.json"
        done, seconds = _launch(tmp_path, url, SDO_HTTP_READ_TIMEOUT_S="2")  # the same path, 2 s per attempt
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdo: error: data.train_shards='{url}': ") and "no answer after 3 attempts" in last
    assert bounded_http.ATTEMPTS * 2 + backoff <= seconds < bounded_http.ATTEMPTS * 2 + backoff + 60
    assert not (tmp_path / "runs" / "remote").exists()


def test_no_server_is_refused_quickly_and_a_404_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(OSError, match=f"127.0.0.1:{port}/index.json: no answer after 3 attempts"):
        bounded_http.fetch(f"http://127.0.0.1:{port}/index.json")
    assert time.monotonic() - started < 3 * bounded_http.CONNECT_TIMEOUT_S


def test_webdataset_reads_http_shards_with_the_stall_limit():
    from webdataset.gopen import gopen_schemes

    import pipelines.sources  # noqa: F401  (installs the handler)

    assert gopen_schemes["http"] is bounded_http.bounded_curl and gopen_schemes["https"] is bounded_http.bounded_curl
    pipe = bounded_http.bounded_curl("http://127.0.0.1:9/x.tar")
    try:
        command = pipe.args[0][0]  # Pipe keeps (popen args, popen kwargs)
        assert command[command.index("--speed-time") + 1] == str(bounded_http.STALL_S)
    finally:
        pipe.proc.kill()
        pipe.proc.wait()



class _StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, except that ``stall_name`` gets its headers and half its body, then silence."""

    stall_name = ""
    release = threading.Event()

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.name != self.stall_name:
            return super().do_GET()
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.release.wait(120)  # hold the connection open without sending a byte

    def log_message(self, *args):
        pass


def test_a_shard_that_stalls_mid_body_is_cut_off_and_counted(tmp_path, monkeypatch):
    from pipelines.loader import make_loader
    from pipelines.shard import write_shards
    from pipelines.synth import generate

    generate(tmp_path / "coco", 1, 8, size=64, seed=0)
    out = tmp_path / "shards"
    write_shards(tmp_path / "coco" / "val", tmp_path / "coco" / "annotations" / "instances_val.json", out,
                 shard_size=4, progress=False)
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert len(tars) == 2
    handler = type("Handler", (_StallingHandler,), {"stall_name": tars[1], "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(bounded_http, "STALL_S", 2)  # 30 s in a run; the mechanism is the same
    try:
        loader = make_loader(f"http://127.0.0.1:{server.server_address[1]}/index.json", train=False, batch_size=2,
                             num_workers=0, val_scale=64, max_size=64)
        started = time.monotonic()
        with pytest.warns(UserWarning):
            batches = list(loader)
        seconds = time.monotonic() - started
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
    skips = loader.epoch_skips()
    delivered = sorted(t["image_id"] for _, _, targets in batches for t in targets if t["image_id"] >= 0)
    assert seconds < bounded_http.STALL_S + 10  # the stall limit, not a hang
    assert skips["tar_errors"] >= 1 and skips["missing_samples"] >= 1, skips
    assert 4 <= len(delivered) < 8 and len(set(delivered)) == len(delivered)  # the whole first shard, once each
    assert len(batches) == 4  # evaluation pads the missing samples: every rank's batch count holds
