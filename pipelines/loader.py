"""Streaming loader: WebDataset shards -> augmented, padded batches, split by rank and worker.

Split policy (explicit `rank` / `world_size`, never torch.distributed globals):
- Each epoch the shard list is put in one order shared by all ranks (shuffled by seed + epoch when
  training). With at least `world_size * max(num_workers, 1)` shards, whole shards are dealt to
  ranks and then to DataLoader workers, balancing sample counts (greedy by the index counts).
  With fewer shards (small datasets), every worker streams all shards and keeps the samples whose
  position p satisfies p % slots == its slot (slots = world_size * workers, rank = p % world_size):
  tar bytes are read by everyone but each sample is decoded by exactly one worker.
- Training: every rank yields len(loader) = total // (world_size * batch_size) full batches. A
  batch comes from one worker; workers get as many batches as their samples fill, the remainder
  goes where the fewest samples would repeat. A worker with more samples than its quota leaves the
  rest for the next epoch's shuffle; one with fewer starts a freshly shuffled pass over its own
  data. With balanced shards every sample is seen exactly once per epoch; a sample is never seen
  by two ranks in one epoch.
- Evaluation: every sample is yielded exactly once across ranks. Batches are full: the last
  batch of a worker is padded with copies of a real image whose target has image_id = -1 and
  no boxes (`to_coco_predictions` ignores negative ids), and ranks with fewer samples get padding
  batches so that every rank yields the same len(loader).
- A truncated/corrupt tar or sample is skipped with a warning and counted in `loader.stats`
  (tar_errors, corrupt_samples, incomplete_samples, missing_samples = expected by the index but
  not delivered; padding replaces them at evaluation, an extra pass at training).
- The index is verified: every shard read to its end in an epoch's first pass (evaluation reads
  all of them; training those it finishes before its quota) has its samples counted and compared
  with the index; `index_mismatch` counts the samples of difference, `index_mismatch_shards` the
  shards (each shard is checked by one worker only). `epoch_skips()` gives one epoch's counts and
  `check_skip_budget` turns them into a SkipBudgetError over a fraction of the expected samples.
- Every sample's json goes through `pipelines.records.parse_record`; an evaluation loader keeps
  the parsed records it yielded, so `ground_truth()` is exactly the data the predictions are on.
"""
from __future__ import annotations

import io
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.errors import DataError, SkipBudgetError
from pipelines.records import parse_record, records_to_coco
from pipelines.sources import Shard, resolve_shards
from pipelines.transforms import (
    DEFAULT_SCALES,
    make_transforms,
    prepare_target,
)

try:  # optional fast JPEG path
    import simplejpeg
except ImportError:
    simplejpeg = None

PAD_IMAGE_ID = -1
IMAGE_KEYS = ("jpg", "jpeg", "png")
STAT_KEYS = ("tar_errors", "corrupt_samples", "incomplete_samples", "missing_samples", "index_mismatch",
             "index_mismatch_shards")
SKIP_KEYS = ("corrupt_samples", "incomplete_samples", "index_mismatch")  # samples lost (the skip budget)


class CorruptSampleWarning(UserWarning):
    """A tar shard or sample could not be read and was skipped."""


class IncompleteSample(ValueError):
    """A sample lacks its image or its json."""


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> PIL RGB image (simplejpeg when installed, else PIL/libjpeg-turbo).

    Grayscale, CMYK and palette images become RGB; EXIF orientation is ignored, as in the official
    loader (COCO boxes refer to the stored pixels). PNG bytes behind a .jpg name decode as PNG."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
        except (ValueError, RuntimeError):  # e.g. CMYK, which libjpeg-turbo cannot turn into RGB; PIL can
            pass
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _batch_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor; inside a DataLoader worker it lives in shared memory, so handing the
    batch to the main process needs no extra copy (torch's default_collate does the same)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    element_size = torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * element_size)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_uint8(samples):
    """[(image uint8 [3, h_i, w_i], target)] -> (images uint8 [B, 3, H, W] zero padded, mask [B, H, W]
    bool True = pad, targets): what the loader's workers hand over.

    The pixels stay uint8 (a quarter of float32's bytes through shared memory and to the device);
    `pipelines.transforms.normalize_batch` turns them into the model's input on the training device.
    """
    height = max(image.shape[1] for image, _ in samples)
    width = max(image.shape[2] for image, _ in samples)
    images = _batch_tensor((len(samples), 3, height, width), torch.uint8)
    mask = torch.ones(len(samples), height, width, dtype=torch.bool)
    for i, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        images[i, :, :h, :w] = image
        images[i, :, h:, :].zero_()
        images[i, :, :h, w:].zero_()
        mask[i, :h, :w] = False
    return images, mask, [target for _, target in samples]


@dataclass
class WorkerPlan:
    """What one DataLoader worker of this rank reads in an epoch and how many batches it yields."""

    urls: list[str]
    slot: tuple[int, int] | None  # (slots, my slot) for sample-level splitting, None = whole shards
    num_samples: int  # samples the index promises this worker
    quota: int = 0  # batches it yields
    verify: dict[str, int] | None = None  # url -> index count of the shards this worker checks


def _balance(shards: list[Shard], bins: int) -> list[list[Shard]]:
    """Deal shards to `bins` lists, biggest first, each to the least-loaded list (stable ties)."""
    order = sorted(range(len(shards)), key=lambda i: -shards[i].count)
    groups, loads = [[] for _ in range(bins)], [0] * bins
    for i in order:
        target = min(range(bins), key=lambda b: (loads[b], b))
        groups[target].append(shards[i])
        loads[target] += shards[i].count
    return groups


def _train_quotas(num_batches: int, counts: list[int], batch_size: int) -> list[int]:
    """Batches per worker summing to `num_batches`: as many full batches as each worker's samples
    allow, trimmed from the fullest workers, or topped up where the fewest samples would repeat."""
    if sum(counts) == 0:
        raise DataError(f"cannot share {num_batches} batches among workers that have no samples")
    quotas = [count // batch_size for count in counts]
    while sum(quotas) > num_batches:
        quotas[max(range(len(quotas)), key=lambda i: (quotas[i], -i))] -= 1
    while sum(quotas) < num_batches:
        quotas[max(range(len(quotas)), key=lambda i: (counts[i] - quotas[i] * batch_size, -i))] += 1
    return quotas


def plan_epoch(shards, *, world_size: int, workers: int, train: bool, batch_size: int, seed: int,
               epoch: int) -> tuple[list[list[WorkerPlan]], int]:
    """Plans of every worker of every rank for one epoch, and the batches each rank yields."""
    shards = list(shards)
    if train:
        random.Random(f"shards-{seed}-{epoch}").shuffle(shards)
    total = sum(s.count for s in shards)
    if len(shards) >= world_size * workers:
        plans = [[WorkerPlan([s.url for s in group], None, sum(s.count for s in group),
                             verify={s.url: s.count for s in group})
                  for group in _balance(rank_shards, workers)]
                 for rank_shards in _balance(shards, world_size)]
    else:
        # slot w * world_size + r: position p goes to rank p % world_size, so ranks differ by <= 1 sample
        slots = world_size * workers
        urls = [s.url for s in shards]
        plans = [[WorkerPlan(urls, (slots, w * world_size + r), total // slots + (w * world_size + r < total % slots))
                  for w in range(workers)] for r in range(world_size)]
        plans[0][0].verify = {s.url: s.count for s in shards}  # everyone reads every shard; one checks them
    if train:
        num_batches = total // (world_size * batch_size)
        if num_batches == 0:
            raise DataError(f"{total} training samples cannot fill one batch of {batch_size} on each of "
                            f"{world_size} ranks")
        for rank_plans in plans:
            quotas = _train_quotas(num_batches, [p.num_samples for p in rank_plans], batch_size)
            for plan, quota in zip(rank_plans, quotas):
                plan.quota = quota
        return plans, num_batches
    for rank, rank_plans in enumerate(plans):
        if sum(p.num_samples for p in rank_plans) == 0:
            raise DataError(f"{total} evaluation samples leave rank {rank} of {world_size} without any")
        for plan in rank_plans:
            plan.quota = math.ceil(plan.num_samples / batch_size)
    num_batches = max(sum(p.quota for p in rank_plans) for rank_plans in plans)
    for rank_plans in plans:
        fullest = max(rank_plans, key=lambda p: p.num_samples)
        fullest.quota += num_batches - sum(p.quota for p in rank_plans)
    return plans, num_batches


def _count_per_shard(samples, counts: dict):
    """Pass samples through; counts[url] = samples of each shard the stream finished (a shard is
    finished when the next one starts, or at the natural end of the stream: counts[None] = True)."""
    current, seen = None, 0
    for sample in samples:
        url = sample.get("__url__")
        if url != current:
            if current is not None:
                counts[current] = counts.get(current, 0) + seen
            current, seen = url, 0
        seen += 1
        yield sample
    if current is not None:
        counts[current] = counts.get(current, 0) + seen
    counts[None] = True


def _select_slot(samples, slot):
    """Keep the samples whose stream position belongs to `slot` = (slots, mine)."""
    slots, mine = slot
    for position, sample in enumerate(samples):
        if position % slots == mine:
            yield sample


class EpochDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker yields (batch, worker id, its stats so far)."""

    def __init__(self, plans: list[WorkerPlan], transforms, *, train: bool, batch_size: int,
                 shuffle_buffer: int, seed: int, epoch: int, rank: int):
        super().__init__()
        self.plans, self.transforms, self.train = plans, transforms, train
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.stats = Counter()

    def _on_tar_error(self, exn) -> bool:
        self.stats["tar_errors"] += 1
        warnings.warn(f"skipping unreadable shard data: {exn!r}", CorruptSampleWarning, stacklevel=2)
        return True

    def _on_sample_error(self, exn) -> bool:
        self.stats["incomplete_samples" if isinstance(exn, IncompleteSample) else "corrupt_samples"] += 1
        warnings.warn(f"skipping corrupt sample: {exn!r}", CorruptSampleWarning, stacklevel=2)
        return True

    def _decode(self, sample, rng):
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None or "json" not in sample:
            raise IncompleteSample(f"sample {sample.get('__key__')} in {sample.get('__url__')} "
                                   f"has keys {sorted(k for k in sample if not k.startswith('__'))}")
        try:
            record = parse_record(sample["json"])
            image = decode_image(sample[image_key])
            target = prepare_target(record, record["annotations"])
        except Exception as err:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: {err!r}") from err
        if image.size != (record["width"], record["height"]):
            raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: image is "
                             f"{image.size}, record says {record['width']}x{record['height']}")
        image, target = self.transforms(image, target, rng)
        return image, target, (None if self.train else record)

    def _verify(self, plan: WorkerPlan, counts: dict) -> None:
        """Compare the samples read per finished shard with the index (see module docstring)."""
        finished = counts.pop(None, False)
        for url, expected in plan.verify.items():
            if url not in counts and not finished:
                continue  # not read to its end (training stopped at its quota)
            read = counts.get(url, 0)
            if read != expected:
                self.stats["index_mismatch"] += abs(read - expected)
                self.stats["index_mismatch_shards"] += 1
                warnings.warn(f"shard {url} holds {read} readable samples, its index says {expected}",
                              CorruptSampleWarning, stacklevel=2)

    def _samples(self, plan: WorkerPlan, worker: int, pass_index: int, counts: dict | None = None):
        """(image, target, record or None) of one pass over the worker's shards; `counts` (when
        given) receives the samples read per finished shard."""
        tag = f"{self.seed}-{self.epoch}-{self.rank}-{worker}-{pass_index}"
        urls = list(plan.urls)
        if self.train and pass_index > 0 and plan.slot is None:
            random.Random(f"reshuffle-{tag}").shuffle(urls)
        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=self._on_tar_error)]
        if counts is not None:
            stages.append(lambda samples: _count_per_shard(samples, counts))
        if plan.slot is not None:
            stages.append(lambda samples: _select_slot(samples, plan.slot))
        if self.train and self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      rng=random.Random(f"buffer-{tag}")))
        augment_rng = random.Random(f"augment-{tag}")
        stages.append(wds.map(lambda sample: self._decode(sample, augment_rng), handler=self._on_sample_error))
        return wds.DataPipeline(*stages)

    def _stream(self, plan: WorkerPlan, worker: int):
        """Exactly quota * batch_size samples (training: extra passes; evaluation: padding)."""
        needed = plan.quota * self.batch_size
        produced, pass_index, last = 0, 0, None
        while produced < needed:
            got = 0
            counts = {} if pass_index == 0 and plan.verify else None
            for sample in self._samples(plan, worker, pass_index, counts):
                if produced < needed:
                    yield sample
                    last, got, produced = sample, got + 1, produced + 1
                if produced == needed and self.train:
                    break  # evaluation reads on to the end, so that every shard is checked
            if counts is not None:
                self._verify(plan, counts)
            if pass_index == 0 and got < min(plan.num_samples, needed):
                self.stats["missing_samples"] += min(plan.num_samples, needed) - got
            if not self.train or got == 0:
                break
            pass_index += 1
        if produced < needed and last is None:
            raise DataError(f"no readable sample in {len(plan.urls)} shard(s) starting with {plan.urls[:1]}")
        image, target, _ = last
        pad_target = dict(target, image_id=PAD_IMAGE_ID, boxes=target["boxes"][:0], labels=target["labels"][:0],
                          area=target["area"][:0], iscrowd=target["iscrowd"][:0])
        for _ in range(needed - produced):
            yield image, pad_target, None

    def __iter__(self):
        """(batch, worker id, stats so far, records of the batch's real samples); a last item with
        batch None carries the worker's final stats (counted after its last batch)."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plans[worker]
        if plan.quota == 0:
            return
        batch = []
        for sample in self._stream(plan, worker):
            batch.append(sample)
            if len(batch) == self.batch_size:
                records = [record for _, _, record in batch if record is not None]
                yield collate_uint8([(image, target) for image, target, _ in batch]), worker, dict(self.stats), records
                batch = []
        yield None, worker, dict(self.stats), []


def _as_is(item):
    """Batches are collated inside the workers; the DataLoader passes them through unchanged."""
    return item


class ShardLoader:
    """Iterable over (images [B, 3, H, W] uint8, mask [B, H, W] bool, targets) for one rank; the
    consumer normalises the pixels on its device (`pipelines.transforms.normalize_batch`).

    len(loader) is the number of batches per epoch (equal on every rank); call set_epoch(e) before
    iterating to get epoch e's shuffle and augmentations. `stats` counts skipped data (see module
    docstring); `num_samples` is the dataset size from the index.
    """

    def __init__(self, source, *, train: bool, batch_size: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, scales=DEFAULT_SCALES,
                 max_size: int = 1333, val_scale: int = 800, random_crop: bool = True, pin_memory: bool = False):
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("world_size", world_size, 1), ("shuffle_buffer", shuffle_buffer, 0)):
            if not isinstance(value, int) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.shard_set = resolve_shards(source)
        if not self.shard_set.shards:
            raise DataError(f"shard index of {source} lists no shards")
        self.source, self.train, self.batch_size = str(source), train, batch_size
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.seed, self.shuffle_buffer, self.pin_memory = seed, shuffle_buffer, pin_memory
        self.transforms = make_transforms(train, scales=tuple(scales), max_size=max_size, val_scale=val_scale,
                                          random_crop=random_crop)
        self.epoch = 0
        self._stats_total, self._stats_epoch = Counter(), Counter()
        self._records: list[dict] = []
        self._expected = 0
        _, self._num_batches = self._plan(0)

    @property
    def index(self) -> dict:
        return self.shard_set.index

    @property
    def num_samples(self) -> int:
        return self.shard_set.num_samples

    @property
    def stats(self) -> dict:
        return dict(self._stats_total)

    def epoch_skips(self) -> dict[str, int]:
        """Counts of the latest iteration (STAT_KEYS, zeros included) and `expected`, the samples
        the index promised this rank: the same keys on every rank, ready for an all-reduce."""
        return {**{key: int(self._stats_epoch.get(key, 0)) for key in STAT_KEYS}, "expected": self._expected}

    def ground_truth_records(self) -> list[dict]:
        """Parsed records of the real samples the latest (evaluation) iteration yielded on this rank."""
        return list(self._records)

    def ground_truth(self) -> dict:
        """COCO ground truth of what the latest evaluation iteration yielded on this rank."""
        return records_to_coco(self._records, self.index["categories"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def _plan(self, epoch: int):
        return plan_epoch(self.shard_set.shards, world_size=self.world_size, workers=max(self.num_workers, 1),
                          train=self.train, batch_size=self.batch_size, seed=self.seed, epoch=epoch)

    def __iter__(self):
        plans, _ = self._plan(self.epoch)
        dataset = EpochDataset(plans[self.rank], self.transforms, train=self.train, batch_size=self.batch_size,
                               shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch, rank=self.rank)
        # its own generator: drawing the workers' base seed from the global RNG would shift the dropout
        # draws of a run resumed mid-epoch (the iterator is created at a different point of the stream)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch),
                            pin_memory=self.pin_memory)
        latest = {}
        self._records, self._stats_epoch = [], Counter()
        self._expected = sum(plan.num_samples for plan in plans[self.rank])
        try:
            for batch, worker, stats, records in loader:
                latest[worker] = stats
                self._records.extend(records)
                if batch is not None:
                    yield batch
        finally:
            for stats in latest.values():
                self._stats_epoch.update(stats)
            self._stats_total.update(self._stats_epoch)


def skip_fraction(counts: dict) -> float:
    """Share of the expected samples that were lost: (corrupt + incomplete + index mismatch) / expected."""
    return sum(counts.get(key, 0) for key in SKIP_KEYS) / max(counts.get("expected", 0), 1)


def check_skip_budget(counts: dict, max_fraction: float, what: str) -> None:
    """Raise SkipBudgetError naming `what` (e.g. "data.val_shards='...'") when epoch_skips()-style
    `counts` (possibly summed over ranks) lose more than `max_fraction` of the expected samples."""
    fraction = skip_fraction(counts)
    if fraction > max_fraction:
        detail = ", ".join(f"{key} {int(counts[key])}" for key in STAT_KEYS if counts.get(key))
        raise SkipBudgetError(f"{what}: {int(sum(counts.get(k, 0) for k in SKIP_KEYS))} of {int(counts['expected'])} "
                              f"samples lost this epoch ({fraction:.1%} > data.max_skip_fraction {max_fraction:g}): "
                              f"{detail}")


def make_loader(source, *, train: bool, batch_size: int, num_workers: int = 0, rank: int = 0,
                world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, scales=DEFAULT_SCALES,
                max_size: int = 1333, val_scale: int = 800, random_crop: bool = True,
                pin_memory: bool = False) -> ShardLoader:
    """A ShardLoader over `source` (shard dir with index.json, index.json path/URL, or brace pattern).

    train: augmentations (flip, multi-scale resize, random-size crop when `random_crop`), shard and
    sample shuffling, a fixed number of full batches per epoch; else resize to `val_scale`, every
    sample exactly once across ranks (padded batches, see module docstring). `pin_memory`: batches in
    page-locked memory, so that copies to a GPU run asynchronously.
    """
    return ShardLoader(source, train=train, batch_size=batch_size, num_workers=num_workers, rank=rank,
                       world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, scales=scales,
                       max_size=max_size, val_scale=val_scale, random_crop=random_crop, pin_memory=pin_memory)
