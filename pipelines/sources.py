"""Where shards live: resolve a `source` string to the index and the shard URLs.

A source is one of
- a local directory holding index.json (shards next to it);
- a path or URL of an index.json: `http(s)://host/dir/index.json`, or `pipe:CMD ... index.json ...`
  (e.g. `pipe:aws s3 cp s3://bucket/coco/val/index.json -`); each shard URL is the source with the
  last `index.json` replaced by the shard's name;
- a brace pattern or a single shard (`dir/shard-{000000..000003}.tar`, `https://h/d/shard-000001.tar`):
  the index is read next to the shards and only the listed shards are used.
Shard URLs are opened by webdataset (`gopen`): local files, http(s) (via curl, with the stall limit
of pipelines/http.py) and `pipe:`. An http(s) index is read with timeouts and bounded retries.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import braceexpand
from webdataset import gopen  # the function (webdataset re-exports it over the module)

from pipelines import http
from pipelines.errors import ShardIndexError
from pipelines.shard import INDEX_FORMAT, INDEX_NAME

http.install()  # http(s) shards are read with a stall limit (pipelines/http.py)


@dataclass(frozen=True)
class Shard:
    url: str
    count: int


@dataclass(frozen=True)
class ShardSet:
    """The index of a shard directory and the (url, sample count) of each shard in use."""

    index: dict
    shards: tuple[Shard, ...]

    @property
    def num_samples(self) -> int:
        return sum(shard.count for shard in self.shards)


def _is_url(source: str) -> bool:
    return source.startswith(("pipe:", "http://", "https://"))


def _read_text(location: str) -> str:
    if location.startswith(("http://", "https://")):
        return http.fetch(location).decode()
    if _is_url(location):
        with gopen(location, "rb") as stream:
            return stream.read().decode()
    with open(location, encoding="utf-8") as handle:
        return handle.read()


def _replace_last(text: str, old: str, new: str) -> str:
    head, sep, tail = text.rpartition(old)
    return head + new + tail if sep else text


def _load_index(location: str) -> dict:
    try:
        index = json.loads(_read_text(location))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard index {location} does not exist (run `sdo data shard` first)") from None
    except json.JSONDecodeError as err:
        raise ShardIndexError(f"shard index {location} is not valid JSON: {err}") from None
    except OSError as err:
        raise ShardIndexError(f"cannot read shard index {location}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ShardIndexError(f"{location} is not an sdo shard index (format {INDEX_FORMAT!r})")
    return index


def max_category_id(index: dict) -> int | None:
    """The largest category id a shard index declares (indexes older than `max_category_id` list categories)."""
    if isinstance(index.get("max_category_id"), int):
        return index["max_category_id"]
    ids = [c["id"] for c in index.get("categories", []) if isinstance(c, dict) and isinstance(c.get("id"), int)]
    return max(ids, default=None)


def resolve_shards(source) -> ShardSet:
    """Index and shard list of `source` (see the module docstring). Raises for a missing/bad index."""
    source = os.fspath(source)
    if not _is_url(source) and os.path.isdir(source):
        index_location = os.path.join(source, INDEX_NAME)
        index = _load_index(index_location)
        shards = tuple(Shard(os.path.join(source, s["name"]), int(s["count"])) for s in index["shards"])
        return ShardSet(index, shards)
    if source.rstrip().endswith(INDEX_NAME) or (source.startswith("pipe:") and INDEX_NAME in source):
        index = _load_index(source)
        if _is_url(source):
            shards = tuple(Shard(_replace_last(source, INDEX_NAME, s["name"]), int(s["count"])) for s in index["shards"])
        else:
            folder = os.path.dirname(source)
            shards = tuple(Shard(os.path.join(folder, s["name"]), int(s["count"])) for s in index["shards"])
        return ShardSet(index, shards)
    if not _is_url(source) and "{" not in source and not os.path.exists(source):
        raise FileNotFoundError(f"data source {source} does not exist (run `sdo data shard` first)")
    urls = list(braceexpand.braceexpand(source))
    if not urls or not all(url.endswith(".tar") for url in urls):
        raise ShardIndexError(f"data source {source!r} is neither a shard directory, an index.json nor .tar shards")
    folder, _ = urls[0].rsplit("/", 1) if "/" in urls[0] else (".", urls[0])
    index = _load_index(f"{folder}/{INDEX_NAME}")
    counts = {s["name"]: int(s["count"]) for s in index["shards"]}
    shards = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name not in counts:
            raise ShardIndexError(f"shard {url} is not listed in {folder}/{INDEX_NAME}")
        shards.append(Shard(url, counts[name]))
    return ShardSet(index, tuple(shards))
