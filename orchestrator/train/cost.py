"""What a model costs, measured one way everywhere: GFLOPs of one image at the paper's size, and eval latency.

GFLOPs are counted once per model config at FLOPS_SIZE (850x1040, the official benchmark's and the paper's
GFLOPs column) with model.flops.count_flops, whatever size the run trains or evaluates at, so that a
training run, a sweep's trial and `sdo bench flops` show the same figure for the same network. A count
takes seconds for a big model, so it is kept on disk ($SDO_CACHE or ~/.cache/sdo, keyed by the model
config, the size, torch and the source of model/).

Latency is what `sdo bench model` measures (eval, no grad, fp32, warm-up then timed calls, the device
synchronised around each call): milliseconds per forward pass of a batch of 1 and of 4 random images,
on the device named in the result. Weights do not change it (Sparse DETR keeps rho x the valid tokens).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLOPS_SIZE = (850, 1040)  # (height, width): one image as the official benchmark counts it
FLOPS_TAG = "sdo.flops_size"
LATENCY_BATCHES = (1, 4)


def size_name(size) -> str:
    return f"{size[0]}x{size[1]}"


def bare_model_config(model_cfg):
    """``model_cfg`` without the weights it would load: cost does not depend on them."""
    return dataclasses.replace(model_cfg, checkpoint=None, init_from=None,
                               backbone=dataclasses.replace(model_cfg.backbone, weights=None))


def _cache_root() -> Path:
    return Path(os.environ.get("SDO_CACHE") or Path.home() / ".cache" / "sdo")


def _model_source_digest() -> str:
    import model

    digest = hashlib.sha256()
    for path in sorted(Path(model.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _cache_key(model_cfg, size) -> str:
    text = json.dumps({"model": dataclasses.asdict(bare_model_config(model_cfg)), "size": list(size),
                       "torch": torch.__version__.split("+")[0], "source": _model_source_digest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reference_gflops(model_cfg, size=FLOPS_SIZE) -> float:
    """GFLOPs of ``model_cfg``'s network on one image of ``size`` (default FLOPS_SIZE); counted once per config."""
    path = _cache_root() / "gflops" / f"{_cache_key(model_cfg, size)}.json"
    try:
        return float(json.loads(path.read_text())["gflops"])
    except (OSError, ValueError, KeyError):
        pass
    from model.build import build_model
    from model.flops import count_flops

    torch.manual_seed(0)
    gflops = float(count_flops(build_model(bare_model_config(model_cfg)), *size)["total_gflops"])
    try:  # many trials may count at once: each writes its own temp file, the rename is atomic
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"gflops": gflops, "size": size_name(size)}, f)
        os.replace(tmp, path)
    except OSError as err:  # a read-only home only costs the next run a recount
        log.info("GFLOPs not cached in %s: %s", path.parent, err)
    return gflops


# ------------------------------------------------------------------ latency (and `sdo bench model`'s timing)


def random_images(count: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` uint8 images [3, height, width] (the loader's format; normalised on the device)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(count)]


def batches(images: list[torch.Tensor], batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded, normalised batches on `device` (made before timing: the time is the model's alone)."""
    from pipelines.loader import collate_uint8
    from pipelines.transforms import normalize_batch

    out = []
    for start in range(0, len(images) - batch + 1, batch):
        pixels, mask, _ = collate_uint8([(image, None) for image in images[start:start + batch]])
        mask = mask.to(device)
        out.append((normalize_batch(pixels.to(device), mask), mask))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(forward, inputs, device: torch.device, count: int) -> list[float]:
    """Seconds of each of `count` calls, cycling over `inputs`."""
    seconds = []
    for i in range(count):
        images, mask = inputs[i % len(inputs)]
        sync(device)
        start = time.perf_counter()
        forward(images, mask)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def device_name(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu (N threads)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def latency(model_cfg, size=FLOPS_SIZE, device: str | torch.device | None = None, *, warmup: int = 1,
            iters: int = 3) -> dict:
    """Eval latency of ``model_cfg``'s network on random ``size`` images ->
    {'latency_ms': median ms per call at batch 1, 'latency_ms_b4': at batch 4, 'device': device_name}."""
    from model import ms_deform_attn
    from model.build import build_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ms_deform_attn.load_native()
    torch.manual_seed(0)
    network = build_model(bare_model_config(model_cfg)).to(device).eval()
    images = random_images(max(LATENCY_BATCHES), *size)
    out = {"device": device_name(device), "size": size_name(size)}
    with torch.no_grad():
        for batch in LATENCY_BATCHES:
            inputs = batches(images, batch, device)
            time_calls(network, inputs, device, warmup)
            timed = time_calls(network, inputs, device, iters)
            out["latency_ms" if batch == 1 else f"latency_ms_b{batch}"] = round(statistics.median(timed) * 1e3, 3)
    return out
