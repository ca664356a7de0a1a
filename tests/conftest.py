"""Fixtures shared by several test folders: the native ms_deform_attn op (installed, else JIT-built once),
and a real S3-compatible server (moto) on 127.0.0.1."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

from model import ms_deform_attn as msda


@pytest.fixture(scope="session")
def native_op():
    """torch.ops.sdo.ms_deform_attn on CPU: the installed `sdo_ops`, else a JIT build (once per session)."""
    if not msda.native_available("cpu"):
        from orchestrator import ops_build

        ops_build.build()
        msda.load_native(retry=True)
    assert msda.native_available("cpu"), f"native op not loaded (source: {msda.native_source()})"
    return torch.ops.sdo.ms_deform_attn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on 127.0.0.1 -> its endpoint URL (credentials in the environment)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(tmp_path_factory.mktemp("moto") / "server.log", "wb") as log, pytest.MonkeyPatch.context() as env:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"moto server did not start (exit {process.poll()})") from None
                    time.sleep(0.2)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            yield endpoint
        finally:
            process.terminate()
            process.wait(timeout=10)
