"""`sdo bench model`: detector FPS in the paper's convention (kakaobrain/sparse-detr util/benchmark.py).

Eval mode, no grad, a fixed set of images (random pixels at --height x --width, 850 x 1040 as the
official benchmark, or the first validation images of a shard set), `warmup` untimed iterations and
then `iters` timed ones per cell; FPS = images / timed seconds (the device synchronised around every
iteration). One model per keep ratio (dense = Deformable DETR two-stage + box refinement, rho > 0 =
Sparse DETR), the official R50 settings; weights are random (speed does not depend on them, but
sparsity does not either: the token count is rho x valid tokens).

A cell is one (setting, rho, batch): setting = (op, mode, dtype) with op native | reference,
mode eager | compile (torch.compile, default inductor) | cudagraphs (torch.compile with CUDA graphs,
mode reduce-overhead: one launch replays the whole graph) and dtype fp32 | bf16 (autocast). Every cell
of a setting runs in this process, so `vs_dense` (the FPS of each rho over the dense FPS of the same
setting and batch) compares like with like. A compiled cell also reports `compile_seconds` (its
first call, which traces and compiles, minus one eager-speed call) and `break_even_images` (how many
images the compiled model must process before the compile time is paid back).

GFLOPs per image come from `model.flops.count_flops` (the paper's fvcore counting, `sdo bench flops`).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.train.cost import batches, random_images, time_calls

OPS = ("native", "reference")
MODES = ("eager", "compile", "cudagraphs")
COMPILE_MODES = {"compile": "default", "cudagraphs": "reduce-overhead"}  # bench mode -> torch.compile mode
DTYPES = ("fp32", "bf16")
DEFAULT_RHOS = (0.0, 0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Setting:
    op: str = "native"
    mode: str = "eager"
    dtype: str = "fp32"

    @property
    def name(self) -> str:
        return f"{self.op}-{self.mode}-{self.dtype}"

    @classmethod
    def parse(cls, name: str) -> Setting:
        """'native-cudagraphs-bf16' -> Setting; ValueError names a bad one."""
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in OPS or parts[1] not in MODES or parts[2] not in DTYPES:
            raise ValueError(f"--settings: {name!r} is not <op>-<mode>-<dtype> with an op of {', '.join(OPS)}, "
                             f"a mode of {', '.join(MODES)} and a dtype of {', '.join(DTYPES)}")
        return cls(*parts)


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    """(supported, why): bf16 autocast where the hardware computes in bf16 (CUDA with bf16, CPU with
    AVX512-BF16 or AMX); elsewhere it is emulated and its speed means nothing."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "cuda bf16" if ok else "this GPU has no bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    ok = "avx512_bf16" in flags or "amx_bf16" in flags
    return ok, f"cpu {capability}, {'AVX512-BF16/AMX' if ok else 'no AVX512-BF16/AMX'}"


def settings_for(ops, modes, dtypes, *, cross: bool) -> list[Setting]:
    """The base setting (first op, mode, dtype) and, unless `cross`, each other value of one axis
    with the others at their base (the contrasts); `cross` gives the full product."""
    if cross:
        return [Setting(o, m, d) for o in ops for m in modes for d in dtypes]
    base = Setting(ops[0], modes[0], dtypes[0])
    out = [base]
    out += [Setting(o, base.mode, base.dtype) for o in ops[1:]]
    out += [Setting(base.op, m, base.dtype) for m in modes[1:]]
    out += [Setting(base.op, base.mode, d) for d in dtypes[1:]]
    return out


def plan_cells(settings: list[Setting], rhos, batch_sizes, *, cross: bool) -> list[tuple[Setting, float, int]]:
    """Which (setting, rho, batch) cells to measure.

    ``cross``: all of them. Otherwise what answers the questions at the cost a CPU can afford (the full
    product of the defaults is ~40 min there): the base setting at every rho and batch (rho vs dense
    at batch 1 and 4, the paper's table); the op and dtype contrasts at every rho, first batch size
    only; torch.compile at dense and the smallest rho > 0 only (each compiled cell pays ~1.5 min of
    compile on a CPU), first batch size.
    """
    if cross:
        return [(s, r, b) for s in settings for r in rhos for b in batch_sizes]
    base, first = settings[0], batch_sizes[0]
    sparse = sorted(r for r in rhos if r > 0)
    compiled_rhos = {r for r in rhos if r == 0} | set(sparse[:1])
    def wanted(setting: Setting, rho: float, batch: int) -> bool:
        if setting == base:
            return True
        return batch == first and (setting.mode == base.mode or rho in compiled_rhos)

    return [(s, r, b) for s in settings for r in rhos for b in batch_sizes if wanted(s, r, b)]


def model_settings(rho: float) -> dict:
    from model.flops import official_model_settings

    return official_model_settings("deformable_topk_bbr" if rho == 0 else f"sparse_rho{rho:g}")


def build(rho: float, backbone: str, device: torch.device, seed: int = 0, **overrides) -> torch.nn.Module:
    from model.build import build_model
    from orchestrator.config import BackboneConfig, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BackboneConfig(name=backbone, weights=None), **{**model_settings(rho), **overrides})
    return build_model(cfg).to(device).eval()


def shard_images(source: str, count: int, *, val_scale: int = 800, max_size: int = 1333) -> list[torch.Tensor]:
    """The first `count` validation images of a shard set, resized as `sdo eval` resizes them."""
    from pipelines.loader import make_loader

    loader = make_loader(source, train=False, batch_size=1, num_workers=0, shuffle_buffer=0, val_scale=val_scale,
                         max_size=max_size)
    images = []
    for pixels, mask, _ in loader:
        h, w = (~mask[0]).nonzero().max(0).values.add(1).tolist()
        images.append(pixels[0, :, :h, :w].clone())
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"--shards {source}: no readable image")
    return images


@contextlib.contextmanager
def op_choice(op: str):
    from model import ms_deform_attn as msda

    with msda.reference_only() if op == "reference" else contextlib.nullcontext():
        yield


def measure_cell(model, setting: Setting, inputs, device: torch.device, *, warmup: int, iters: int) -> dict:
    """One (setting, rho, batch) cell: warm-up, then `iters` timed calls -> FPS and times."""
    amp = torch.bfloat16 if setting.dtype == "bf16" else None
    compiled = setting.mode in COMPILE_MODES
    forward_module = torch.compile(model, mode=COMPILE_MODES[setting.mode]) if compiled else model

    @torch.no_grad()
    def forward(images, mask):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return forward_module(images, mask)

    batch = inputs[0][0].shape[0]
    with op_choice(setting.op):
        first = time_calls(forward, inputs, device, 1)[0]
        time_calls(forward, inputs, device, max(warmup - 1, 0))
        timed = time_calls(forward, inputs, device, iters)
    total = sum(timed)
    cell = {"fps": round(batch * iters / total, 4), "seconds_per_image": round(total / (batch * iters), 6),
            "median_seconds_per_iter": round(statistics.median(timed), 4), "first_call_seconds": round(first, 3),
            "timed_iters": iters, "warmup_iters": max(warmup, 1)}
    if compiled:
        # the first call compiles and then runs once at compiled speed (with CUDA graphs: and records them)
        cell["compile_seconds"] = round(max(first - statistics.median(timed), 0.0), 3)
    return cell


def add_ratios(cells: list[dict]) -> None:
    """vs_dense = FPS / FPS of rho 0 in the same setting and batch (when measured)."""
    dense = {(c["setting"], c["batch"]): c["fps"] for c in cells if c["rho"] == 0}
    for c in cells:
        reference = dense.get((c["setting"], c["batch"]))
        if reference:
            c["vs_dense"] = round(c["fps"] / reference, 4)


def add_compile_payback(cells: list[dict]) -> None:
    """break_even_images of compiled cells: compile seconds / seconds saved per image against the eager
    cell of the same op, dtype, rho and batch (None when compiling saves nothing)."""
    eager = {(c["op"], c["dtype"], c["rho"], c["batch"]): c for c in cells if c["mode"] == "eager"}
    for c in cells:
        if c["mode"] not in COMPILE_MODES:
            continue
        base = eager.get((c["op"], c["dtype"], c["rho"], c["batch"]))
        if base is None:
            continue
        saved = base["seconds_per_image"] - c["seconds_per_image"]
        c["speedup_vs_eager"] = round(base["seconds_per_image"] / c["seconds_per_image"], 4)
        c["saved_seconds_per_image"] = round(saved, 4)
        c["break_even_images"] = round(c["compile_seconds"] / saved) if saved > 0 else None


def run(*, height: int = 850, width: int = 1040, rhos=DEFAULT_RHOS, batch_sizes=(1, 4), ops=OPS, modes=MODES,
        dtypes=DTYPES, cross: bool = False, warmup: int = 1, iters: int = 2, backbone: str = "resnet50",
        shards: str | None = None, device: str | None = None, threads: int | None = None,
        model_overrides: dict | None = None, progress: bool = True, settings: list[str] | None = None,
        on_cell=None) -> dict:
    """Measure every cell; returns the JSON-able report (see the module docstring). `settings` (names such as
    'native-cudagraphs-bf16') replaces the ops / modes / dtypes axes: each is measured at every rho and batch.
    ``on_cell(cells)`` sees the cells measured so far after each one (to keep them if the run is cut short)."""
    from tqdm import tqdm

    from model import ms_deform_attn as msda
    from model.flops import count_flops

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    msda.load_native()
    skipped = []
    bf16_ok, bf16_why = bf16_supported(device)
    if "bf16" in dtypes and not bf16_ok:
        skipped.append(f"bf16: {bf16_why}")
        dtypes = tuple(d for d in dtypes if d != "bf16") or ("fp32",)
    if "native" in ops and not msda.native_available(device):
        skipped.append(f"native op: not built for {device.type} (sdo ops build)")
        ops = tuple(o for o in ops if o != "native") or ("reference",)
    if settings:
        chosen = [Setting.parse(name) for name in settings]
        available = [s for s in chosen if (s.dtype != "bf16" or bf16_ok)
                     and (s.op != "native" or msda.native_available(device))]
        skipped += [f"{s.name}: not available on {device.type}" for s in chosen if s not in available]
        settings = available or [Setting(ops[0], "eager", "fp32")]
        cross = True
    else:
        settings = settings_for(ops, modes, dtypes, cross=cross)
    need = max(batch_sizes) * max(warmup, 1) if shards else max(batch_sizes)
    images = shard_images(shards, need) if shards else random_images(max(batch_sizes), height, width)
    inputs = {b: batches(images, b, device) for b in batch_sizes if len(images) >= b}
    cells, gflops = [], {}
    steps = plan_cells(settings, rhos, list(inputs), cross=cross)
    bar = tqdm(total=len(steps), desc="bench model", unit="cell", disable=not progress)
    for rho in rhos:
        model = build(rho, backbone, device, **(model_overrides or {}))
        h, w = images[0].shape[1:]
        gflops[rho] = round(count_flops(model, h, w, device=device)["total_gflops"], 2)
        for setting in settings:
            for batch, batch_inputs in inputs.items():
                if (setting, rho, batch) not in steps:
                    continue
                bar.set_postfix(setting=setting.name, rho=rho, batch=batch)
                cell = measure_cell(model, setting, batch_inputs, device, warmup=warmup, iters=iters)
                cells.append({"setting": setting.name, "op": setting.op, "mode": setting.mode, "dtype": setting.dtype,
                              "rho": rho, "batch": batch, **cell, "gflops": gflops[rho]})
                bar.update(1)
                if on_cell is not None:
                    on_cell(cells)
                if setting.mode in COMPILE_MODES:
                    torch._dynamo.reset()  # every compiled cell pays its own compile time
        del model
    bar.close()
    add_ratios(cells)
    add_compile_payback(cells)
    return {
        "benchmark": "model",
        "convention": "sparse-detr util/benchmark.py: eval, no_grad, warm-up then timed iterations, "
                      "FPS = images / timed seconds",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": str(device), "threads": torch.get_num_threads(),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "load_average_1_5_15min": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}},
        "config": {"height": int(images[0].shape[1]), "width": int(images[0].shape[2]), "shards": shards,
                   "backbone": backbone, "rhos": list(rhos), "batch_sizes": list(inputs), "warmup": warmup,
                   "iters": iters, "settings": [s.name for s in settings], "cross": cross,
                   "native_op": msda.native_source(), "model_overrides": model_overrides or {}},
        "skipped": skipped,
        "gflops": {f"{rho:g}": g for rho, g in gflops.items()},
        "cells": cells,
    }
