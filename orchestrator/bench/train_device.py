"""`sdo bench train --device cpu|cuda`: one process's training step on one device (no Ray, no MLflow).

Every mode trains the same model (by default the R50 Sparse DETR rho 0.1 recipe, random weights: nothing
is downloaded) on the same synthetic batch (random pixels, 7 random boxes per image, images of decreasing
size padded to one size, as the multi-scale loader pads them) with the project's own optimisation step
(`orchestrator.train.step`: forward, criterion, backward, clip, AdamW). After `warmup` steps, `steps`
steps are timed (the device synchronised around each) and one more step runs under torch.profiler.

A mode is ``<precision>[+<lever>...]``:

- precision ``fp32`` (torch's defaults: float32 matmuls; cuDNN convolutions in TF32, torch's default),
  ``tf32`` (matmuls in TF32 too) or ``bf16`` (autocast; GPU only);
- levers ``channels_last`` (the model in NHWC memory format), ``foreach`` (AdamW's foreach
  implementation instead of the fused one the recipe uses) and ``compile`` (torch.compile of the
  model's forward; its compile time is reported and not timed).

Reported per mode: images/s and seconds per step (median of the timed steps), the peak device memory,
the first and last training loss (every mode starts from the same weights and batch, so they must
agree), and from the profiled step: top-level aten ops (a proxy for kernel launches that also works
on the CPU), ``aten::_local_scalar_dense`` calls (values read on the host: on a GPU, a wait for the
device), and on CUDA the kernel launches, host<->device copies and synchronisations the CUDA runtime
saw, the GPU time (kernels, copies, memsets; their union) and the share of the step the GPU was busy
(GPU time over the median step time), with what took the GPU the most time.

``reference`` runs modes on another checkout of sdo (a path): each in a child process that imports
that checkout's `model` and `orchestrator` (this file's harness, that code), so that a change's
before and after are measured side by side on one machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

PRECISIONS = ("fp32", "tf32", "bf16")
LEVERS = ("channels_last", "foreach", "compile")
DEFAULT_CONFIG = "configs/r50_sparse_detr_rho0.1.yaml"
BOXES_PER_IMAGE = 7  # COCO's mean
# CUDA runtime / driver calls counted from the profiler's trace
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
COPY_CALLS = ("cudaMemcpy", "cudaMemcpyAsync", "cudaMemcpy2DAsync", "cuMemcpyAsync", "cuMemcpyHtoDAsync_v2",
              "cuMemcpyDtoHAsync_v2")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuEventSynchronize", "cuCtxSynchronize")


@dataclass(frozen=True)
class Mode:
    precision: str
    levers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "+".join((self.precision, *self.levers))


def parse_modes(text: str) -> list[Mode]:
    """'fp32,bf16+channels_last' -> [Mode('fp32'), Mode('bf16', ('channels_last',))]; ValueError names the bad one."""
    modes = []
    for item in (m.strip() for m in text.split(",")):
        if not item:
            continue
        precision, *levers = item.split("+")
        unknown = [x for x in levers if x not in LEVERS]
        if precision not in PRECISIONS or unknown or len(set(levers)) != len(levers):
            raise ValueError(f"--modes: {item!r} is not <precision>[+<lever>...] with a precision of "
                             f"{', '.join(PRECISIONS)} and levers of {', '.join(LEVERS)}")
        modes.append(Mode(precision, tuple(levers)))
    if not modes:
        raise ValueError(f"--modes: name at least one mode, got {text!r}")
    return modes


def synthetic_batch(batch: int, height: int, width: int, *, num_classes: int, seed: int = 0):
    """(images uint8 [B, 3, H, W], mask [B, H, W] True = padding, targets) as the loader yields them:
    image b is (H - 32 b) x (W - 48 b) (clamped to half the size) at the top left, with BOXES_PER_IMAGE
    boxes (normalised cxcywh, labels in [1, num_classes))."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, height, width, dtype=torch.uint8)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    targets = []
    for b in range(batch):
        h, w = max(height - 32 * b, height // 2), max(width - 48 * b, width // 2)
        images[b, :, :h, :w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        mask[b, :h, :w] = False
        centre = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (BOXES_PER_IMAGE,), generator=generator),
                        "boxes": torch.cat([centre, size], 1), "image_id": b,
                        "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])})
    return images, mask, targets


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: Mode, *, config_path: str, overrides: list[str], batch_size: int, height: int, width: int,
            device: str, warmup: int, steps: int, profile: bool = True) -> dict:
    """One mode, in this process, with the `model` and `orchestrator` importable here -> its report entry."""
    import torch

    from model.build import build_model
    from model.criterion import build_criterion
    from orchestrator.config import load_config
    from orchestrator.train import step as train_step_module

    device = torch.device(device)
    if device.type != "cuda" and mode.precision != "fp32":
        raise ValueError(f"mode {mode.name}: {mode.precision} is a GPU precision (CPU trains in fp32)")
    cfg = load_config(config_path, [f"data.batch_size={batch_size}", "model.backbone.weights=null",
                                    f"train.amp={'bf16' if mode.precision == 'bf16' else 'none'}", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    criterion = build_criterion(cfg.model, cfg.loss).to(device)
    if "channels_last" in mode.levers:
        model = model.to(memory_format=torch.channels_last)
    optimizer, _ = train_step_module.make_optimizer(cfg, model, world_size=1)
    if "foreach" in mode.levers:  # the same groups and rates, without the recipe's implementation flags
        groups = [{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay, foreach=True)
    forward = torch.compile(model) if "compile" in mode.levers else model
    amp = torch.bfloat16 if mode.precision == "bf16" else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    batch = synthetic_batch(batch_size, height, width, num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    if device.type == "cuda":  # pinned, as the loader's (pin_memory) batches arrive
        batch = (batch[0].pin_memory(), batch[1].pin_memory(), batch[2])

    def one_step() -> dict:
        return train_step_module.train_step(forward, criterion, optimizer, scaler, batch, device, amp,
                                            cfg.train.clip_max_norm)

    losses, times = [], []
    with matmul_precision(mode.precision == "tf32"):
        _sync(device)
        started = time.perf_counter()
        losses.append(one_step()["loss"])
        _sync(device)
        first_step = time.perf_counter() - started
        for _ in range(max(warmup - 1, 0)):
            losses.append(one_step()["loss"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            _sync(device)
            started = time.perf_counter()
            losses.append(one_step()["loss"])
            _sync(device)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        entry = {"mode": mode.name, "images_per_s": round(batch_size / median, 2), "median_step_s": round(median, 4),
                 "step_s": [round(t, 4) for t in times], "first_step_s": round(first_step, 3),
                 "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
        if device.type == "cuda":
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        if "compile" in mode.levers:
            entry["compile_s"] = round(max(first_step - median, 0.0), 1)
        if profile:
            entry.update(profile_step(one_step, device, median))
    from model import ms_deform_attn as msda

    entry["native_op"] = msda.native_available(device)
    return entry


def profile_step(one_step, device, median_step_s: float) -> dict:
    """One step under torch.profiler -> op, launch, copy and sync counts, GPU time and GPU busy share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        one_step()
        _sync(device)
        wall = time.perf_counter() - started
    events = prof.events()
    out = {"aten_ops": 0, "local_scalar_dense": 0}
    for event in events:
        if event.name == "aten::_local_scalar_dense":
            out["local_scalar_dense"] += 1
        if event.name.startswith("aten::") and not _under_aten(event):
            out["aten_ops"] += 1
    if device.type != "cuda":
        return out
    from torch.autograd import DeviceType

    launches = copies = syncs = 0
    device_work = []  # kernels, copies and memsets as the GPU ran them
    for event in events:
        if event.name in LAUNCH_CALLS:
            launches += 1
        elif event.name in COPY_CALLS:
            copies += 1
        elif event.name in SYNC_CALLS:
            syncs += 1
        if event.device_type == DeviceType.CUDA:
            device_work.append((event.name, event.time_range.start, event.time_range.end))
    busy_us = _union_us([(start, end) for _, start, end in device_work])
    totals: dict[str, list] = {}
    for name, start, end in device_work:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    top = sorted(totals.items(), key=lambda item: -item[1][0])[:10]
    out.update({"cuda_launches": launches, "cuda_copies": copies,
                "cuda_syncs": max(syncs - 1, 0),  # less the harness's own synchronize that ends the step
                "gpu_ms": round(busy_us / 1000, 2), "profiled_step_s": round(wall, 4),
                "gpu_busy_pct": round(min(100.0, 100 * busy_us / 1e6 / median_step_s), 1),
                "top_gpu_work": [{"name": name[:90], "ms": round(us / 1000, 2), "count": count}
                                 for name, (us, count) in top]})
    return out


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (kernels of several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _error(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return lines[-1].strip()[:500]


def measure_in_child(mode: Mode, reference: str, kwargs: dict, timeout: float) -> dict:
    """`measure` in a fresh process whose `model` and `orchestrator` are the reference checkout's."""
    code = ("import json, runpy, sys; ns = runpy.run_path(sys.argv[1]); args = json.loads(sys.argv[2]); "
            "mode = ns['parse_modes'](args.pop('mode'))[0]; "
            "print('SDO_BENCH_RESULT ' + json.dumps(ns['measure'](mode, **args)))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (reference, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code, os.path.abspath(__file__), json.dumps({"mode": mode.name, **kwargs})],
                          cwd=reference, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("SDO_BENCH_RESULT "):
            return json.loads(line[len("SDO_BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"reference run exited {proc.returncode}: {' | '.join(tail)}")


def run(*, modes: list[Mode], device: str, config_path: str = DEFAULT_CONFIG, overrides: tuple[str, ...] = (),
        batch_size: int = 4, height: int = 800, width: int = 1066, warmup: int = 3, steps: int = 10,
        reference: str | None = None, reference_modes: list[Mode] | None = None, profile: bool = True,
        on_entry=None) -> dict:
    """Every mode (this checkout's, then the reference's) -> the JSON-ready report. A mode that fails is
    reported with its error and the others still run; ``on_entry(report)`` sees the report after every mode
    (to write it as it grows)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU here")
    kwargs = {"config_path": os.path.abspath(config_path), "overrides": list(overrides), "batch_size": batch_size,
              "height": height, "width": width, "device": device, "warmup": warmup, "steps": steps, "profile": profile}
    report = {"benchmark": "train_device",
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "threads": torch.get_num_threads(),
                          "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()},
              "config": {**kwargs, "modes": [m.name for m in modes], "reference": reference,
                         "reference_modes": [m.name for m in reference_modes or []],
                         "boxes_per_image": BOXES_PER_IMAGE},
              "modes": []}
    plan = [(m, None) for m in modes] + [(m, reference) for m in (reference_modes or []) if reference]
    for mode, tree in plan:
        name = mode.name if tree is None else f"reference:{mode.name}"
        try:
            entry = measure(mode, **kwargs) if tree is None else measure_in_child(mode, tree, kwargs, timeout=900)
        except Exception as err:  # noqa: BLE001 - one failing mode is a result; the others still run
            entry = {"error": _error(err)}
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        entry["mode"] = name
        report["modes"].append(entry)
        if on_entry is not None:
            on_entry(report)
    add_speedups(report["modes"])
    return report


def add_speedups(entries: list[dict]) -> None:
    """vs_first: images/s over the first mode's (the list's base), when both ran."""
    base = next((e for e in entries if "images_per_s" in e), None)
    for entry in entries:
        if base is not None and "images_per_s" in entry:
            entry["vs_first"] = round(entry["images_per_s"] / base["images_per_s"], 3)
