"""`sdo bench ...`: benchmarks that print JSON (ops, data, train, model, flops, demo, sweep)."""
import click


@click.group()
def bench() -> None:
    """Benchmarks; each prints one JSON document (and writes it with --out)."""


@bench.command("data")
@click.option("--images", default=192, show_default=True, type=click.IntRange(min=8), help="synthetic images")
@click.option("--image-size", default=640, show_default=True, type=click.IntRange(min=32), help="longer side (px)")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="loader worker processes")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="interleaved runs (median)")
@click.option("--modes", default="decode,train", show_default=True, help="comma-separated: decode, train")
@click.option("--storage", default="local,http", show_default=True,
              help="comma-separated: local (files on disk), http (served from 127.0.0.1, one GET per file/shard)")
@click.option("--quick", is_flag=True, help="tiny run (16 small images, 1 repeat) to check the pipeline")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def data_command(images, image_size, batch_size, workers, repeats, modes, storage, quick, out) -> None:
    """Images/s: WebDataset shard loader vs folder + pycocotools loader vs bare JPEG decode."""
    import json
    from pathlib import Path

    from orchestrator.bench import data as bench_data

    def choices(option: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        picked = tuple(m.strip() for m in text.split(",") if m.strip())
        if not picked or any(m not in allowed for m in picked):
            raise ValueError(f"{option}: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return picked

    mode_list = choices("--modes", modes, bench_data.MODES)
    storage_list = choices("--storage", storage, bench_data.STORAGES)
    kwargs = {}
    if quick:
        images, image_size, repeats, workers = 16, 96, 1, 1
        kwargs = {"scales": (64, 80), "max_size": 128}
    report = bench_data.run(images=images, image_size=image_size, batch_size=batch_size, workers=workers,
                            repeats=repeats, modes=mode_list, storages=storage_list, **kwargs)
    report["config"]["quick"] = quick
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")


@bench.command("flops")
@click.option("--height", default=850, show_default=True, help="image height (the official benchmark uses 850)")
@click.option("--width", default=1040, show_default=True, help="image width (the official benchmark uses 1040)")
@click.option("--configs", "names", default="deformable_topk_bbr,sparse_rho0.1,sparse_rho0.2,sparse_rho0.3,sparse_rho0.5",
              show_default=True, help="comma-separated: deformable_topk_bbr and/or sparse_rho<R>")
@click.option("--backbone", default="resnet50", show_default=True, help="backbone of every config")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def flops_command(height: int, width: int, names: str, backbone: str, out: str | None) -> None:
    """GFLOPs of one forward pass (fvcore convention, as the paper), compared with the official counter."""
    import json
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from model.build import build_model
    from model.flops import (
        OFFICIAL_GFLOPS_850x1040,
        count_flops,
        official_model_settings,
    )
    from orchestrator.config import BackboneConfig, ModelConfig

    configs = [n.strip() for n in names.split(",") if n.strip()]
    if not configs:
        raise ValueError("--configs: name at least one config")
    settings = {name: official_model_settings(name) for name in configs}  # validate all names first
    torch.manual_seed(0)
    report = {"height": height, "width": width, "backbone": backbone, "configs": {}}
    for name in tqdm(configs, desc="flops", unit="config"):
        model_cfg = ModelConfig(backbone=BackboneConfig(name=backbone, weights=None), **settings[name])
        counted = count_flops(build_model(model_cfg), height, width)
        entry = {"gflops": round(counted["total_gflops"], 2),
                 "by_operator": {op: round(g, 3) for op, g in sorted(counted["by_operator"].items())}}
        reference = OFFICIAL_GFLOPS_850x1040.get(name)
        if reference is not None and (height, width) == (850, 1040) and backbone == "resnet50":
            entry["official_gflops"] = reference
            entry["ratio"] = round(counted["total_gflops"] / reference, 4)
        report["configs"][name] = entry
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")


@bench.command("ops")
@click.option("--quick", is_flag=True, help="Small shapes, one repeat: checks the harness, not the speed.")
@click.option("--repeat", type=click.IntRange(min=1), default=None, help="Timed runs per measurement (median; default 7: a 2-core machine is noisy).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probes (one child process per run).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: the CPU, plus CUDA where a GPU and the CUDA kernels are present.")
@click.option("--dtypes", default="float32", show_default=True,
              help="CUDA runs: comma-separated subset of float32,bfloat16,float16 (the CPU runs float32).")
@click.option("--kernels", default="channel,vector", show_default=True,
              help="CUDA runs: the op's kernels to measure (SDO_MSDA_CUDA kernel=), each case with each.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None, help="Also write the JSON here.")
def ops_bench(quick: bool, repeat, no_memory: bool, device: str, dtypes: str, kernels: str, out) -> None:
    """Native ms_deform_attn vs the pure-PyTorch reference at Sparse DETR's shapes (time, peak memory)."""
    import json
    from pathlib import Path

    from orchestrator.bench import ops as bench_ops

    dtype_list = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    kernel_list = tuple(k.strip() for k in kernels.split(",") if k.strip())
    text = json.dumps(bench_ops.run(quick=quick, repeat=repeat, memory=not no_memory, device=device,
                                    cuda_dtypes=dtype_list, cuda_kernels=kernel_list), indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


@bench.command("train")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Model/loss config to benchmark [default: configs/demo.yaml; with --device, "
                   "configs/r50_sparse_detr_rho0.1.yaml].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
              help="Time one process's training step on this device (images/s, GPU busy, launches, syncs, memory "
                   "per precision mode) instead of comparing Ray Train with bare and DDP loops on the CPU.")
@click.option("--modes", default=None,
              help="With --device: comma-separated <precision>[+<lever>...], precisions fp32, tf32, bf16, levers "
                   "channels_last, foreach, compile [default: fp32,tf32,bf16 on cuda, fp32 on cpu].")
@click.option("--reference", "reference", default=None, type=click.Path(file_okay=False, exists=True),
              help="With --device: also run --reference-modes on this other sdo checkout (before vs after).")
@click.option("--reference-modes", default="fp32,bf16", show_default=True, help="Modes of the --reference checkout.")
@click.option("--height", default=800, show_default=True, type=click.IntRange(min=64), help="With --device: image height.")
@click.option("--width", default=1066, show_default=True, type=click.IntRange(min=64), help="With --device: image width.")
@click.option("--no-profile", is_flag=True, help="With --device: skip the profiled step (counts, GPU busy).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=2), help="processes of ddp / ray")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="timed steps per mode [default: 20; 10 with --device]")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="untimed steps first")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1), help="interleaved rounds of all modes")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="images per process [default: 2; 4 with --device]")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=32),
              help="synthetic image side (px); also caps the train scales")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="also write the JSON here (with --device, rewritten after every mode)")
def train_command(config_path, overrides, device, modes, reference, reference_modes, height, width, no_profile,
                  workers, steps, warmup, repeats, batch_size, image_size, out) -> None:
    """Seconds per step: Ray Train loop vs bare single process vs torch DDP (gloo), same model and data;
    with --device, one process's training step per precision mode on that device."""
    import json
    from pathlib import Path

    def write(report: dict) -> None:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2) + "\n")

    if device is None and (modes or reference):
        raise ValueError("--modes and --reference go with --device (the one-process step benchmark)")
    if device is not None:
        from orchestrator.bench import train_device

        mode_list = train_device.parse_modes(modes or ("fp32,tf32,bf16" if device == "cuda" else "fp32"))
        reference_list = train_device.parse_modes(reference_modes) if reference else []
        report = train_device.run(modes=mode_list, device=device, config_path=config_path or train_device.DEFAULT_CONFIG,
                                  overrides=overrides, batch_size=batch_size or 4, height=height, width=width,
                                  warmup=warmup, steps=steps or 10, reference=reference,
                                  reference_modes=reference_list, profile=not no_profile, on_entry=write)
    else:
        from orchestrator.bench import train as bench_train

        scales = [f"data.train_scales=[{image_size}]", f"data.max_size={image_size}"]
        report = bench_train.run(config_path=config_path or "configs/demo.yaml", overrides=(*scales, *overrides),
                                 workers=workers, steps=steps or 20, warmup=warmup, batch_size=batch_size or 2,
                                 image_size=image_size, repeats=repeats)
    text = json.dumps(report, indent=2)
    click.echo(text)
    write(report)


@bench.command("demo")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory of the demo run (runs/<name>).")
@click.option("--started-at", type=float, default=None,
              help="Unix time the demo started (`date +%s.%N` before `just demo`); gives the wall time.")
@click.option("--min-ap50", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Fail when the final AP50 is below this.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None,
              help="Fail when the wall time is over this (default: no limit).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def demo_command(run_dir, started_at, min_ap50, max_seconds, out) -> None:
    """`just demo-check`: the demo run's AP curve and wall time; exit 1 when it did not learn (or was too slow)."""
    import json
    from pathlib import Path

    from orchestrator.bench import demo as bench_demo

    report = bench_demo.report(Path(run_dir), started_at=started_at, min_ap50=min_ap50, max_seconds=max_seconds)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    if not report["passed"]:
        raise bench_demo.DemoCheckFailed("demo check: " + "; ".join(report["failures"]))


def _floats(option: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"{option}: expected comma-separated keep ratios in [0, 1] (0 = dense), got {text!r}")
    return values


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option}: expected comma-separated integers >= 1, got {text!r}")
    return values


def _subset(option: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    picked = tuple(v.strip() for v in text.split(",") if v.strip())
    if not picked or any(v not in allowed for v in picked):
        raise ValueError(f"{option}: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return picked


@bench.command("model")
@click.option("--height", default=850, show_default=True, type=click.IntRange(min=64), help="image height (official: 850)")
@click.option("--width", default=1040, show_default=True, type=click.IntRange(min=64), help="image width (official: 1040)")
@click.option("--shards", default=None, help="time the first validation images of these shards instead of random pixels")
@click.option("--rhos", default="0,0.1,0.2,0.3,0.5", show_default=True, help="keep ratios; 0 = dense (Deformable DETR)")
@click.option("--batch-sizes", default="1,4", show_default=True)
@click.option("--ops", "ops_", default="native,reference", show_default=True, help="deformable-attention op (first = base)")
@click.option("--modes", default="eager,compile", show_default=True,
              help="eager, compile (torch.compile) and/or cudagraphs (torch.compile with CUDA graphs) (first = base)")
@click.option("--dtypes", default="fp32,bf16", show_default=True,
              help="fp32 and/or bf16 autocast, where the device computes in bf16 (first = base)")
@click.option("--cross", is_flag=True, help="every op x mode x dtype [default: the base and one axis changed at a time]")
@click.option("--settings", default=None,
              help="comma-separated <op>-<mode>-<dtype> (e.g. native-eager-fp32,native-cudagraphs-bf16), each at "
                   "every rho and batch size, instead of --ops/--modes/--dtypes")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=1), help="untimed iterations per cell")
@click.option("--iters", default=2, show_default=True, type=click.IntRange(min=1), help="timed iterations per cell")
@click.option("--backbone", default="resnet50", show_default=True)
@click.option("--device", default=None, help="cpu | cuda [default: cuda when there is one]")
@click.option("--quick", is_flag=True, help="dense and rho 0.1, batch 1, one timed iteration: checks the harness")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def model_command(height, width, shards, rhos, batch_sizes, ops_, modes, dtypes, cross, settings, warmup, iters,
                  backbone, device, quick, out) -> None:
    """Detector FPS (paper convention) with GFLOPs: dense vs rho, native vs reference op, eager vs
    torch.compile, fp32 vs bf16."""
    import json
    from pathlib import Path

    from orchestrator.bench import model as bench_model

    rho_list, batch_list = _floats("--rhos", rhos), _ints("--batch-sizes", batch_sizes)
    op_list = _subset("--ops", ops_, bench_model.OPS)
    mode_list = _subset("--modes", modes, bench_model.MODES)
    dtype_list = _subset("--dtypes", dtypes, bench_model.DTYPES)
    setting_list = [bench_model.Setting.parse(n.strip()).name for n in settings.split(",") if n.strip()] \
        if settings else None
    if quick:
        rho_list, batch_list, iters = (0.0, 0.1), (1,), 1
    report = bench_model.run(height=height, width=width, rhos=rho_list, batch_sizes=batch_list, ops=op_list,
                             modes=mode_list, dtypes=dtype_list, cross=cross, warmup=warmup, iters=iters,
                             backbone=backbone, shards=shards, device=device, settings=setting_list,
                             on_cell=lambda cells: out and Path(out).write_text(
                                 json.dumps({"benchmark": "model", "partial": True, "cells": cells}, indent=2)))
    report["config"]["quick"] = quick
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")


@bench.command("overfit")
@click.option("--device", default=None, help="cpu | cuda [default: cuda when there is one]")
@click.option("--precisions", default="fp32,bf16", show_default=True, help="comma-separated: fp32, tf32, bf16")
@click.option("--steps", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--images", default=8, show_default=True, type=click.IntRange(min=1), help="synthetic images in the batch")
@click.option("--size", default=160, show_default=True, type=click.IntRange(min=32), help="synthetic image side (px)")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Model/loss config [default: configs/r50_sparse_detr_rho0.1.yaml].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def overfit_command(device, precisions, steps, images, size, config_path, overrides, out) -> None:
    """Fixed-batch overfit per precision: loss curve and AP50 on the batch (does bf16 learn what fp32 learns?)."""
    import json
    from pathlib import Path

    import torch

    from orchestrator.bench import overfit as bench_overfit
    from orchestrator.bench.train_device import DEFAULT_CONFIG

    chosen = _subset("--precisions", precisions, bench_overfit.PRECISIONS)
    report = bench_overfit.run(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), precisions=chosen,
                               steps=steps, num_images=images, size=size, config_path=config_path or DEFAULT_CONFIG,
                               overrides=overrides)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


@bench.command("gpu-check")
@click.option("--out", default="runs/gpu_check/gpu_check.json", show_default=True, type=click.Path(dir_okay=False),
              help="The report (rewritten after every stage); the stages' output goes next to it (.log).")
@click.option("--stages", default="env,build,tests,ops,model,train,overfit",
              show_default=True, help="comma-separated subset, run in this order")
@click.option("--reference", default=None, type=click.Path(file_okay=False, exists=True),
              help="Another sdo checkout whose training step the train stage also times (before vs after).")
@click.option("--no-build", is_flag=True, help="Use the op already built under $SDO_OPS_CACHE.")
@click.option("--cpu-dry-run", is_flag=True, help="Every stage on tiny CPU sizes: checks the harness, not the GPU.")
def gpu_check_command(out, stages, reference, no_build, cpu_dry_run) -> None:
    """Everything that needs a GPU in one run of a few minutes (`just gpu-check`): build for this GPU, CUDA
    tests, op / model / training benchmarks, fp32 and bf16 overfits; one JSON and a summary table."""
    from orchestrator.bench import gpu_check

    chosen = _subset("--stages", stages, gpu_check.STAGES)
    report = gpu_check.run(out, stages=chosen, dry_run=cpu_dry_run, build=not no_build, reference=reference,
                           echo=click.echo)
    failed = [name for name, stage in report["stages"].items() if not stage["ok"]]
    if failed:
        raise gpu_check.GpuCheckFailed(f"gpu-check: stages failed: {', '.join(failed)} (see {out})")


@bench.command("sweep")
@click.option("--trials", default=200, show_default=True, type=click.IntRange(min=4), help="trials of the sweep")
@click.option("--concurrent", default=4, show_default=True, type=click.IntRange(min=1), help="trials at once")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=32), help="synthetic image side (px)")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="folder for the shards, runs and MLflow store [default: a new temp folder, kept]")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the JSON here")
def sweep_command(trials: int, concurrent: int, image_size: int, root: str | None, out: str | None) -> None:
    """A many-trial sweep of a tiny model on the embedded cluster: time, and what it leaks (driver RSS and file
    descriptors, Ray placement groups and actors, MLflow rows and disk per trial)."""
    import json
    from pathlib import Path

    from orchestrator.sweep import benchmark as bench_sweep

    report = bench_sweep.run(trials=trials, concurrent=concurrent, image_size=image_size, root=root)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")
