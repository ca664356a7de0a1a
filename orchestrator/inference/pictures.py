"""Pictures of detections: the original image with boxes, class names and scores."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def draw_detections(image_path: Path, detections: dict, names: dict[int, str], out: Path) -> Path:
    """detections: 'boxes' [K, 4] xyxy pixels of the original image, 'scores' [K], 'labels' [K] -> the JPEG written."""
    with Image.open(image_path) as source:
        image = source.convert("RGB")
    draw = ImageDraw.Draw(image)
    for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        colour = PALETTE[int(label) % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=2)
        text = f"{names.get(int(label), f'class {label}')} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text)
        draw.rectangle((left, top, right + 2, bottom), fill=colour)
        draw.text((box[0] + 1, box[1]), text, fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, quality=90)
    return out
