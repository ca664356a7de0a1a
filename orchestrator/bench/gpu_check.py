"""`sdo bench gpu-check` (`just gpu-check`): everything that needs a GPU, in one run of a few minutes.

Stages, in order, each in its own child process with its own time limit, so that one that fails, hangs
or crashes costs only itself:

- ``env``:     torch, CUDA, the GPU and its compute capability, nvcc, the optional packages;
- ``build``:   `sdo ops build --cuda` for the visible GPU only (TORCH_CUDA_ARCH_LIST = its capability);
- ``tests``:   the tests that need CUDA (`-k cuda` over tests/ops and the model's device tests);
- ``ops``:     `sdo bench ops` on the GPU;
- ``model``:   `sdo bench model` cells at 850 x 1040, rho 0.1, batch 1 and 4: eager fp32 and the best setting;
- ``train``:   `sdo bench train --device cuda` (fp32, tf32, bf16 and the levers; a reference checkout's
  fp32 and bf16 when one is named);
- ``overfit``: a 150-step fixed-batch overfit in fp32, tf32 and bf16 (loss curve, AP50 on the batch).

The report (JSON) is rewritten after every stage, so a run cut short still leaves what it measured
(each stage's own JSON is copied into it; the stages' output goes to a .log beside it: two files in all);
a table of the figures that matter ends the run. ``cpu_dry_run`` runs every stage on tiny CPU sizes
(CUDA-only parts are skipped or say so): the harness checked without spending GPU time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("env", "build", "tests", "ops", "model", "train", "overfit")
# the tests that need a GPU (each of their names says cuda)
CUDA_TESTS = ("tests/ops", "tests/model/test_device_sync.py")
# seconds per stage on an H200 (expected: build 40, tests 30, ops 30, model 110, train 80, overfit 40)
TIME_LIMITS = {"env": 60, "build": 240, "tests": 180, "ops": 150, "model": 240, "train": 240, "overfit": 180}
BEST_INFERENCE = "native-cudagraphs-bf16"


class GpuCheckFailed(RuntimeError):
    """Some stage failed (its entry in the report says why)."""


class Context:
    """Where a gpu-check run writes, and how its stages run."""

    def __init__(self, out: Path, *, dry_run: bool, build: bool, reference: str | None, python: str = sys.executable):
        self.out = out
        self.work = Path(tempfile.mkdtemp(prefix="sdo-gpu-check-"))  # the stages' own files, copied into the report
        self.log = out.with_suffix(".log")
        self.dry_run = dry_run
        self.build = build
        self.reference = reference
        self.python = python
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def sdo(self, *args: str) -> list[str]:
        return [self.python, "-m", "orchestrator.cli", *args]

    def call(self, stage: str, command: list[str], *, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `command` with the stage's time limit; its output goes to the log -> the finished process."""
        with self.log.open("a") as log:
            log.write(f"\n===== {stage}: {' '.join(command)}\n")
            log.flush()
            try:
                return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                      timeout=TIME_LIMITS[stage], check=False, text=True)
            except subprocess.TimeoutExpired:
                log.write(f"\n===== {stage}: stopped after {TIME_LIMITS[stage]} s\n")
                raise

    def tail(self, lines: int = 15) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()[-lines:] if self.log.is_file() else []


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- stages


def stage_env(ctx: Context) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc"),
            "packages": {name: _importable(name)
                         for name in ("pycocotools", "webdataset", "braceexpand", "ray", "mlflow", "scipy", "timm")}}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST for the visible GPU alone (a build for every architecture takes minutes)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def stage_build(ctx: Context) -> dict:
    if not ctx.build:
        proc = ctx.call("build", ctx.sdo("ops", "status"))
        return {"skipped": "--no-build: the op already built under SDO_OPS_CACHE", "returncode": proc.returncode}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or arch_list()
    env = dict(ctx.env, **({"TORCH_CUDA_ARCH_LIST": arch} if arch else {}))
    command = ctx.sdo("ops", "build", "--no-cuda" if ctx.dry_run else "--cuda")
    started = time.perf_counter()
    proc = ctx.call("build", command, env=env)
    status = ctx.call("build", ctx.sdo("ops", "status"))
    return {"arch_list": arch, "seconds": round(time.perf_counter() - started, 1),
            "returncode": proc.returncode or status.returncode}


def stage_tests(ctx: Context) -> dict:
    report = ctx.work / "tests.xml"
    proc = ctx.call("tests", [ctx.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k", "cuda",
                              f"--junitxml={report}", *CUDA_TESTS])
    counts = _junit_counts(report)
    return {**counts, "returncode": proc.returncode if proc.returncode != 5 else 0}  # 5: nothing selected


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"junit": "missing"}
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**total, "failed": failed}


def stage_ops(ctx: Context) -> dict:
    out = ctx.work / "ops.json"
    help_text = subprocess.run(ctx.sdo("bench", "ops", "--help"), capture_output=True, text=True, env=ctx.env,
                               check=False).stdout
    args = ["bench", "ops", "--out", str(out)]
    if "--device" in help_text:  # the op's own benchmark gained a device option
        args += ["--device", "cpu" if ctx.dry_run else "cuda"]
    else:  # it times the CPU too: keep that part short
        args += ["--no-memory", "--repeat", "3"]
    if ctx.dry_run:
        args += ["--quick"]
    proc = ctx.call("ops", ctx.sdo(*args))
    return {"returncode": proc.returncode, "report": _json_or_none(out)}


def model_bench_args(dry_run: bool) -> list[str]:
    """The FPS cells: eager fp32 (the base) and the best setting, rho 0.1, batch 1 and 4, 850 x 1040."""
    if dry_run:
        return ["--device", "cpu", "--height", "96", "--width", "128", "--rhos", "0.1", "--batch-sizes", "1",
                "--settings", "native-eager-fp32,native-eager-bf16", "--iters", "1", "--backbone", "resnet18"]
    return ["--device", "cuda", "--rhos", "0.1", "--batch-sizes", "1,4", "--ops", "native",
            "--settings", f"native-eager-fp32,{BEST_INFERENCE}", "--warmup", "3", "--iters", "20"]


def stage_model(ctx: Context) -> dict:
    out = ctx.work / "model.json"
    proc = ctx.call("model", ctx.sdo("bench", "model", *model_bench_args(ctx.dry_run), "--out", str(out)))
    report = _json_or_none(out)
    return {"returncode": proc.returncode, "report": report}


def train_bench_args(dry_run: bool, reference: str | None) -> list[str]:
    if dry_run:
        args = ["--device", "cpu", "--modes", "fp32,fp32+foreach,fp32+channels_last", "--height", "128",
                "--width", "160", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                "--set", "model.backbone.name=resnet18"]
    else:
        args = ["--device", "cuda", "--modes", "fp32,tf32,bf16,tf32+channels_last,bf16+channels_last",
                "--steps", "10", "--warmup", "3"]
    if reference:
        args += ["--reference", reference, "--reference-modes", "fp32" if dry_run else "fp32,bf16"]
    return args


def stage_train(ctx: Context) -> dict:
    out = ctx.work / "train.json"
    proc = ctx.call("train", ctx.sdo("bench", "train", *train_bench_args(ctx.dry_run, ctx.reference),
                                     "--out", str(out)))
    return {"returncode": proc.returncode, "report": _json_or_none(out)}


def stage_overfit(ctx: Context) -> dict:
    out = ctx.work / "overfit.json"
    args = ["--device", "cpu", "--steps", "3", "--images", "2", "--size", "64", "--precisions", "fp32,bf16",
            "--set", "model.backbone.name=resnet18"] if ctx.dry_run else ["--device", "cuda", "--precisions",
                                                                          "fp32,tf32,bf16"]
    proc = ctx.call("overfit", ctx.sdo("bench", "overfit", *args, "--out", str(out)))
    return {"returncode": proc.returncode, "report": _json_or_none(out)}


STAGE_FUNCTIONS = {"env": stage_env, "build": stage_build, "tests": stage_tests, "ops": stage_ops,
                   "model": stage_model, "train": stage_train, "overfit": stage_overfit}


# ---------------------------------------------------------------- run and summary


def run(out: str | Path, *, stages=STAGES, dry_run: bool = False, build: bool = True,
        reference: str | None = None, echo=print) -> dict:
    """Every stage in order -> the report (also in `out`, rewritten after each stage; the stages' output
    in `out` with the suffix .log). Without CUDA and without `dry_run` it stops at once (ValueError)."""
    import torch

    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown:
        raise ValueError(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    if not dry_run and not torch.cuda.is_available():
        raise ValueError("gpu-check: no CUDA GPU here (use --cpu-dry-run to check the harness on the CPU)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, dry_run=dry_run, build=build, reference=reference)
    ctx.log.write_text("")
    report = {"benchmark": "gpu_check", "dry_run": dry_run, "stages": {}}
    started = time.perf_counter()
    for stage in stages:
        echo(f"gpu-check: {stage} ...")
        began = time.perf_counter()
        try:
            result = STAGE_FUNCTIONS[stage](ctx)
            ok = result.get("returncode", 0) == 0 and not result.get("failed")
        except subprocess.TimeoutExpired:
            result, ok = {"error": f"stopped after {TIME_LIMITS[stage]} s"}, False
        except Exception as err:  # noqa: BLE001 - a stage that breaks is a result; the next stage still runs
            result, ok = {"error": f"{type(err).__name__}: {err}"[:500]}, False
        result.update(ok=ok, seconds=round(time.perf_counter() - began, 1))
        if not ok:
            result["log_tail"] = ctx.tail()
        report["stages"][stage] = result
        report["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")
        echo(f"gpu-check: {stage} {'ok' if ok else 'FAILED'} ({result['seconds']} s)")
    report["summary"] = summary_rows(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(ctx.work, ignore_errors=True)
    echo(format_table(report["summary"]))
    return report


def summary_rows(report: dict) -> list[list[str]]:
    """[what, figure] rows: the numbers the issue asks for, from whichever stages ran."""
    stages = report["stages"]
    rows = [[f"stage {name}", ("ok" if s.get("ok") else "FAILED") + f" {s.get('seconds')} s"]
            for name, s in stages.items()]
    env = stages.get("env", {})
    if env.get("gpu"):
        rows.append(["gpu", f"{env['gpu']} (sm {env.get('capability')}), torch {env.get('torch')}"])
    tests = stages.get("tests", {})
    if "tests" in tests:
        rows.append(["cuda tests", (f"{tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
                                   f"{tests['skipped']} skipped")])
    for cell in ((stages.get("model") or {}).get("report") or {}).get("cells", []):
        rows.append([f"infer {cell['setting']} rho{cell['rho']:g} b{cell['batch']}", f"{cell['fps']:.1f} FPS"])
    for mode in ((stages.get("train") or {}).get("report") or {}).get("modes", []):
        if "error" in mode:
            rows.append([f"train {mode['mode']}", "error: " + mode["error"][:80]])
            continue
        figures = [f"{mode['images_per_s']:.1f} img/s"]
        if "gpu_busy_pct" in mode:
            figures += [f"busy {mode['gpu_busy_pct']:.0f}%", f"{mode['cuda_launches']} launches",
                        f"{mode['cuda_syncs']} syncs", f"{mode.get('peak_memory_gib', 0):.1f} GiB"]
        figures += [f"{mode['aten_ops']} aten ops", f"{mode['local_scalar_dense']} host reads",
                    f"loss {mode['loss_first']:.2f}->{mode['loss_last']:.2f}"]
        rows.append([f"train {mode['mode']}", ", ".join(figures)])
    for entry in ((stages.get("overfit") or {}).get("report") or {}).get("runs", []):
        if "error" in entry:
            rows.append([f"overfit {entry['precision']}", "error: " + entry["error"][:80]])
            continue
        curve = entry["loss_curve"]
        rows.append([f"overfit {entry['precision']}", (f"AP50 {entry['AP50']:.3f}, AP {entry['AP']:.3f}, loss "
                                                      f"{curve[0][1]:.2f}->{curve[-1][1]:.2f}, "
                                                      f"{entry['median_step_s'] * 1000:.0f} ms/step")])
    return rows


def format_table(rows: list[list[str]]) -> str:
    width = max((len(what) for what, _ in rows), default=0)
    return "\n".join(f"{what:<{width}}  {figure}" for what, figure in rows)
