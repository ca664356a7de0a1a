"""DETR's detection augmentations (datasets/transforms.py + make_coco_transforms) in plain torch/PIL.

Every transform is called as `t(image, target, rng)` with a PIL RGB image, a target dict
(`boxes` [N, 4] absolute xyxy float32, `labels` [N] int64, `area` [N], `iscrowd` [N], `size`
[2] (h, w)), and a `random.Random` so that augmentations are reproducible per worker and epoch.
`ToTensor` ends the chain: image -> uint8 [3, H, W], boxes -> normalised cxcywh; the loader batches
the pixels as uint8 and the consumer normalises them (ImageNet mean/std, float32) on its device with
`normalize_batch`.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def prepare_target(record: dict, annotations: list[dict]) -> dict:
    """COCO image record + annotations -> DETR target (ConvertCocoPolysToMask without masks).

    Crowd annotations are dropped, boxes become absolute xyxy clamped to the image, empty boxes
    are dropped. Labels are the COCO category ids.
    """
    width, height = record["width"], record["height"]
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    area = torch.tensor([a["area"] for a in annotations], dtype=torch.float32)
    return {
        "boxes": boxes[keep], "labels": labels[keep], "area": area[keep],
        "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        "image_id": int(record["id"]),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }


def crop(image: Image.Image, target: dict, region: tuple[int, int, int, int]):
    """Crop to region = (top, left, height, width); boxes are clipped, boxes left empty are dropped."""
    top, left, height, width = region
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    target["boxes"] = boxes.reshape(-1, 4)[keep]
    for field in ("labels", "area", "iscrowd"):
        target[field] = target[field][keep]
    return image, target


def hflip(image: Image.Image, target: dict):
    """Mirror left-right; x0' = w - x1, x1' = w - x0."""
    width = image.width
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    return image, target


def resized_shape(width: int, height: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the shorter side `size`, shrunk so the longer side is <= max_size (DETR's get_size)."""
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = round(max_size * short / long)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Image.Image, target: dict, size: int, max_size: int | None):
    """Resize (bilinear) so the shorter side is `size`; boxes and areas scale with the image."""
    new_h, new_w = resized_shape(image.width, image.height, size, max_size)
    ratio_w, ratio_h = new_w / image.width, new_h / image.height
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
    target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: random.Random):
        return hflip(image, target) if rng.random() < self.p else (image, target)


class RandomResize:
    """Shorter side drawn from `sizes`, longer side capped at `max_size`."""

    def __init__(self, sizes, max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng: random.Random):
        return resize(image, target, rng.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop of random height/width in [min_size, min(image side, max_size)] at a random place."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng: random.Random):
        width = rng.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = rng.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = rng.randint(0, image.height - height)
        left = rng.randint(0, image.width - width)
        return crop(image, target, (top, left, height, width))


class RandomSelect:
    """`first` with probability p, else `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng: random.Random):
        return self.first(image, target, rng) if rng.random() < self.p else self.second(image, target, rng)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: random.Random):
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target


class ToTensor:
    """PIL -> uint8 [3, H, W] tensor; boxes -> normalised cxcywh.

    Pixels stay uint8 through the loader; `normalize_batch` makes floats of them on the device.
    """

    def __call__(self, image, target, rng: random.Random):
        planes = np.empty((3, image.height, image.width), dtype=np.uint8)
        for channel, band in enumerate(image.split()):  # planar copy in C: cheaper than a transpose
            planes[channel] = np.asarray(band)
        pixels = torch.from_numpy(planes)
        target = dict(target)
        height, width = pixels.shape[-2:]
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
        target["boxes"] = (boxes / torch.tensor([width, height, width, height], dtype=torch.float32)).float()
        return pixels, target


_SCALE = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_NEG_SHIFT = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def normalize_into(out: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """out (float32, [..., 3, H, W]) = (pixels / 255 - mean) / std for uint8 pixels of that shape."""
    return out.copy_(pixels).mul_(_SCALE).add_(_NEG_SHIFT)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> ImageNet-normalised float32 [3, H, W]."""
    return normalize_into(torch.empty(pixels.shape, dtype=torch.float32), pixels)


def normalize_batch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] + mask [B, H, W] (True = pad) -> float32 [B, 3, H, W], ImageNet-normalised and
    zero at the padding, on the tensors' device: per image, the numbers of `normalize`."""
    # non-blocking: a blocking host -> device copy would wait for everything queued on the device
    scale, shift = _SCALE.to(images.device, non_blocking=True), _NEG_SHIFT.to(images.device, non_blocking=True)
    return images.float().mul_(scale).add_(shift).masked_fill_(mask.unsqueeze(1), 0.0)


def make_transforms(train: bool, scales=DEFAULT_SCALES, max_size: int = 1333, val_scale: int = 800,
                    random_crop: bool = True) -> Compose:
    """DETR's make_coco_transforms: flip + (multi-scale resize | resize-crop-resize) for training,
    a single resize to `val_scale` for evaluation; then ToTensor (uint8; normalize_batch normalises)."""
    if not train:
        return Compose([RandomResize([val_scale], max_size=max_size), ToTensor()])
    multi_scale = RandomResize(scales, max_size=max_size)
    if random_crop:
        multi_scale = RandomSelect(multi_scale, Compose([RandomResize([400, 500, 600]), RandomSizeCrop(384, 600),
                                                         RandomResize(scales, max_size=max_size)]))
    return Compose([RandomHorizontalFlip(), multi_scale, ToTensor()])
