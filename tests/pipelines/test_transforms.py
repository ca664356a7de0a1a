"""DETR augmentations in plain torch/PIL: boxes stay consistent with the pixels they describe."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.loader import collate_uint8
from pipelines.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToTensor,
    crop,
    hflip,
    make_transforms,
    normalize,
    normalize_batch,
    prepare_target,
    resize,
    resized_shape,
)


def _target(boxes_xyxy, width, height):
    boxes = torch.tensor(boxes_xyxy, dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.arange(1, len(boxes) + 1), "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
            "iscrowd": torch.zeros(len(boxes), dtype=torch.int64), "image_id": 1,
            "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}


@pytest.mark.parametrize("width,height,size,max_size,expected", [
    (640, 480, 800, 1333, (800, 1066)),
    (480, 640, 800, 1333, (1066, 800)),
    (1000, 200, 800, 1333, (267, 1335)),  # DETR's get_size: the long side may overshoot by rounding
    (800, 600, 600, 1333, (600, 800)),
    (64, 48, 64, None, (64, 85)),
])
def test_resized_shape_matches_detr_get_size(width, height, size, max_size, expected):
    assert resized_shape(width, height, size, max_size) == expected


def test_prepare_target_drops_crowd_and_empty_and_clamps():
    record = {"id": 7, "width": 50, "height": 40}
    annotations = [{"bbox": [10, 5, 20, 10], "category_id": 3, "area": 150.0, "iscrowd": 0},
                   {"bbox": [0, 0, 5, 5], "category_id": 4, "area": 25.0, "iscrowd": 1},
                   {"bbox": [45, 30, 20, 20], "category_id": 5, "area": 400.0, "iscrowd": 0},
                   {"bbox": [60, 0, 5, 5], "category_id": 6, "area": 25.0, "iscrowd": 0}]
    target = prepare_target(record, annotations)
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [45, 30, 50, 40]]
    assert target["labels"].tolist() == [3, 5]
    assert target["orig_size"].tolist() == [40, 50] and target["image_id"] == 7


def test_hflip_crop_resize_numbers():
    image = Image.new("RGB", (100, 60))
    _, flipped = hflip(image, _target([[10, 20, 30, 40]], 100, 60))
    assert flipped["boxes"].tolist() == [[70, 20, 90, 40]]

    cropped_image, cropped = crop(image, _target([[0, 0, 100, 60], [25, 15, 45, 35], [90, 50, 99, 59]], 100, 60),
                                  (10, 20, 30, 40))
    assert cropped_image.size == (40, 30)
    assert cropped["boxes"].tolist() == [[0, 0, 40, 30], [5, 5, 25, 25]]  # the third box fell outside
    assert cropped["labels"].tolist() == [1, 2] and cropped["area"].tolist() == [1200, 400]
    assert cropped["size"].tolist() == [30, 40]

    resized_image, resized = resize(image, _target([[10, 20, 30, 40]], 100, 60), 120, None)
    assert resized_image.size == (200, 120)
    assert resized["boxes"].tolist() == [[20, 40, 60, 80]]
    assert resized["area"].tolist() == [400 * 4] and resized["size"].tolist() == [120, 200]


def test_to_tensor_normalize_and_collate_values():
    image = Image.new("RGB", (20, 10), (255, 128, 0))
    pixels, target = ToTensor()(image, _target([[2, 4, 12, 8]], 20, 10), random.Random(0))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 10, 20)
    assert torch.allclose(target["boxes"], torch.tensor([[7 / 20, 6 / 10, 10 / 20, 4 / 10]]))
    assert torch.allclose(normalize(pixels), expected.view(3, 1, 1).expand(3, 10, 20), atol=1e-6)

    tall, _ = ToTensor()(Image.new("RGB", (8, 16), (0, 0, 255)), _target([[0, 0, 1, 1]], 8, 16), random.Random(0))
    images, mask, targets = collate_uint8([(pixels, target), (tall, target)])
    images = normalize_batch(images, mask)
    assert images.shape == (2, 3, 16, 20) and mask.shape == (2, 16, 20)
    assert torch.allclose(images[0, :, :10, :20], normalize(pixels)) and (images[0, :, 10:] == 0).all()
    assert torch.allclose(images[1, :, :16, :8], normalize(tall)) and (images[1, :, :, 8:] == 0).all()
    assert mask[0, :10, :20].logical_not().all() and mask[0, 10:].all() and mask[1, :, 8:].all()
    assert not mask[1, :, :8].any() and targets[1] is target



def _float_collate(samples):
    """The float32 batches the loader shipped before uint8: each image normalised, then zero padded."""
    height, width = max(p.shape[1] for p, _ in samples), max(p.shape[2] for p, _ in samples)
    images = torch.zeros(len(samples), 3, height, width)
    mask = torch.ones(len(samples), height, width, dtype=torch.bool)
    for i, (pixels, _) in enumerate(samples):
        images[i, :, :pixels.shape[1], :pixels.shape[2]] = normalize(pixels)
        mask[i, :pixels.shape[1], :pixels.shape[2]] = False
    return images, mask, [target for _, target in samples]


def test_uint8_batch_normalised_on_the_device_equals_the_float_path():
    """The loader ships uint8 and the consumer normalises: the same numbers as the float32 collate."""
    rng = np.random.default_rng(0)
    samples = [(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)), {"i": i})
               for i, (h, w) in enumerate([(37, 50), (48, 21), (12, 64)])]
    reference, reference_mask, _ = _float_collate(samples)
    pixels, mask, targets = collate_uint8(samples)
    assert pixels.dtype == torch.uint8 and torch.equal(mask, reference_mask) and [t["i"] for t in targets] == [0, 1, 2]
    assert pixels.element_size() * pixels.nelement() * 4 == reference.element_size() * reference.nelement()
    torch.testing.assert_close(normalize_batch(pixels, mask), reference, rtol=0, atol=1e-6)


def _red_extent(pixels):
    """Pixel box [x0, y0, x1, y1] of the red pixels of a uint8 [3, H, W] image, or None."""
    rgb = pixels.int()
    red = (rgb[0] > 128) & (rgb[1] < 128) & (rgb[2] < 128)
    if not red.any():
        return None
    rows, cols = np.nonzero(red.numpy())
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize("train", [True, False])
def test_augmented_boxes_follow_the_pixels(train):
    """A red rectangle on a blue image: after any augmentation its box must frame the red pixels."""
    pixels = np.zeros((90, 120, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    pixels[20:60, 30:80] = (255, 0, 0)
    image = Image.fromarray(pixels)
    transforms = make_transforms(train, scales=(64, 96, 128), max_size=160, val_scale=96, random_crop=True)
    checked = 0
    for seed in range(16 if train else 1):
        target = _target([[30, 20, 80, 60]], 120, 90)
        tensor, out = transforms(image, target, random.Random(seed))
        h, w = out["size"].tolist()
        assert tensor.shape[1:] == (h, w) and max(h, w) <= 160
        extent = _red_extent(tensor)
        if len(out["boxes"]) == 0:
            assert extent is None or (extent[2] - extent[0]) * (extent[3] - extent[1]) <= 4
            continue
        cx, cy, bw, bh = (out["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        assert np.allclose(box, extent, atol=1.5), (seed, box, extent)
        checked += 1
    assert checked >= (8 if train else 1)
