"""Data for sdo: synthetic COCO, COCO -> WebDataset shards, the streaming loader, COCO evaluation.

- synth.generate        : synthetic COCO dataset of shapes (JPEGs + instances json)
- shard.write_shards    : COCO folder -> shard-*.tar ({__key__, jpg, json}) + index.json
- loader.make_loader    : shards (dir / index URL / brace pattern) -> padded, augmented batches per rank
- transforms            : DETR's augmentations in plain torch/PIL
- coco_eval             : ground truth from shards, PostProcess -> COCO json, pycocotools metrics

Never imports Ray or MLflow (docs/ARCHITECTURE.md; tests/test_layout.py checks it): the orchestrator drives
these functions.
"""
