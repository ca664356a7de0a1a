"""Bounded reads of shards and indexes over http(s): a server that stalls or never answers fails in
bounded time instead of hanging a run.

- An index (small, read whole) is fetched with connect and read timeouts and a bounded number of
  attempts with backoff.
- Shards stream through curl (webdataset's `gopen`), which by default has a connect timeout only.
  sdo's handler adds a stall limit: a transfer slower than 1 byte/s for STALL_S seconds is aborted.
  Shards are not retried mid-stream (curl cannot take back bytes it already wrote to the pipe); a
  broken shard is counted by the loader like any tar error, and the skip budget decides.

``SDO_HTTP_READ_TIMEOUT_S`` overrides the index read timeout (a slow server; or a quick failure in a test).
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from webdataset.gopen import Pipe, gopen_schemes

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 20
ATTEMPTS = 3
BACKOFF_S = 1.0
STALL_S = 30


def read_timeout_s() -> float:
    """The index read timeout: ``SDO_HTTP_READ_TIMEOUT_S`` when set, else READ_TIMEOUT_S."""
    return float(os.environ.get("SDO_HTTP_READ_TIMEOUT_S") or READ_TIMEOUT_S)


def fetch(url: str) -> bytes:
    """The body of ``url``; raises OSError naming it after ``ATTEMPTS`` failed tries (connect/read timeouts,
    refused connections, 5xx). A 4xx answer is final at once."""
    last: Exception | None = None
    timeout = read_timeout_s()
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise FileNotFoundError(f"{url}: HTTP {err.code}") if err.code == 404 else OSError(
                    f"{url}: HTTP {err.code}") from None
            last = err
        except (urllib.error.URLError, OSError) as err:
            last = err
        if attempt < ATTEMPTS - 1:
            time.sleep(BACKOFF_S * 2 ** attempt)
    reason = getattr(last, "reason", last)
    raise OSError(f"{url}: no answer after {ATTEMPTS} attempts ({reason})")


def bounded_curl(url, mode="rb", bufsize=8192):
    """webdataset's curl reader with a stall limit (see the module doc)."""
    if mode[0] != "r":
        raise ValueError(f"{url}: sdo reads shards over http, it does not write them")
    args = ["curl", "--connect-timeout", str(CONNECT_TIMEOUT_S), "--speed-limit", "1", "--speed-time", str(STALL_S),
            "-f", "-s", "-L", url]
    return Pipe(args, mode=mode, bufsize=bufsize, ignore_status=[141, 23])


def install() -> None:
    """Make webdataset open http(s) shards with :func:`bounded_curl` (idempotent; inherited by loader workers)."""
    gopen_schemes["http"] = bounded_curl
    gopen_schemes["https"] = bounded_curl
