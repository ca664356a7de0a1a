"""Output-directory rules shared by the writers: refuse to clobber, replace only when complete."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Validate `out_dir` before anything is written.

    Raises FileExistsError when it holds files and `overwrite` is false, NotADirectoryError when it
    is a file. Nothing is created or removed here.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite to replace it")
    return out


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to build a complete new output in before it replaces `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def swap_in(stage: Path, out: Path) -> None:
    """Move the finished `stage` to `out`; the old `out` is removed only after the move succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def check_apart_from_inputs(out_dir, *, images_dir, annotations_file) -> None:
    """Refuse an output folder that could touch the inputs, before anything is written.

    `out_dir` may not equal, contain or lie inside `images_dir`, nor contain `annotations_file`
    (symlinks resolved). Raises InputOverlapError naming both paths.
    """
    from pipelines.errors import InputOverlapError

    out, images, annotations = _resolved(out_dir), _resolved(images_dir), _resolved(annotations_file)
    if out == images:
        raise InputOverlapError(f"--out {out_dir} is the image folder --images {images_dir}; "
                                "write shards to a folder outside the inputs")
    if images in out.parents:
        raise InputOverlapError(f"--out {out_dir} lies inside the image folder --images {images_dir}; "
                                "write shards to a folder outside the inputs")
    if out in images.parents:
        raise InputOverlapError(f"--out {out_dir} contains the image folder --images {images_dir}; "
                                "write shards to a folder outside the inputs")
    if out in annotations.parents:
        raise InputOverlapError(f"--out {out_dir} holds the annotation file --annotations {annotations_file}; "
                                "write shards to a folder outside the inputs")
