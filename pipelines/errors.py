"""Exceptions raised by pipelines/ for bad input (all ValueError subclasses: the CLI exits 2)."""


class DataError(ValueError):
    """A dataset file or argument is unusable; the message names the file, field or argument."""


class AnnotationFormatError(DataError):
    """A COCO annotation file is not the expected JSON structure."""


class ShardIndexError(DataError):
    """A shard directory / URL has no usable index.json, or the index does not match the shards."""


class InputOverlapError(DataError):
    """An output path would equal, contain or lie inside an input (inputs are never modified)."""


class SkipBudgetError(DataError):
    """More data was skipped than the allowed fraction (the message carries the skip summary)."""
