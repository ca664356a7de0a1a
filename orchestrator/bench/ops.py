"""`sdo bench ops`: the native ms_deform_attn op against the pure-PyTorch reference, side by side.

Shapes are Sparse DETR's (B=2, d_model=256, 8 heads, 4 levels, 4 points) on an 800x1216 image:
the encoder with every token as query (dense, rho=0), the sparse encoder at rho=0.1 (int(0.1*S)+1
queries) and the decoder (300 queries). Times are medians over `repeat` runs after a warm-up.

Every row names its `kernel`: "cpu", or on CUDA the kernels SDO_MSDA_CUDA selects, "channel" (the
verified default) and "vector" (opt-in), each case measured with both, one after the other in one
process; `cuda_vector_over_channel` gives the vector kernels' speedups.

Peak memory (CPU) is measured in a fresh child process per implementation (so one cannot reuse
memory the other freed): per case, inputs are allocated, the kernel's high-water mark is reset
(/proc/self/clear_refs = 5), one forward + backward runs, and the peak is VmHWM minus the RSS
before the call. glibc is told to mmap every
block over 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS and the peak is that of live
memory. On CUDA the peak is torch.cuda.max_memory_allocated() above the allocation before the call.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from model import ms_deform_attn as msda

STRIDES = (8, 16, 32, 64)
FULL_IMAGE = (800, 1216)
QUICK_IMAGE = (128, 192)
FORWARD_BACKWARD_GOAL = 3.0
MMAP_THRESHOLD = 128 * 1024
CUDA_KERNELS = ("channel", "vector")  # SDO_MSDA_CUDA=kernel=...: the verified default, the opt-in vector kernels


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    n_heads: int
    head_dim: int
    n_points: int
    spatial_shapes: tuple
    len_q: int
    queries_on_tokens: bool = True  # encoder: queries are tokens; decoder: anywhere in the image

    @property
    def len_in(self) -> int:
        return sum(h * w for h, w in self.spatial_shapes)


def level_shapes(height: int, width: int) -> tuple:
    """(H_l, W_l) of the 4 levels: ResNet C3-C5 (strides 8, 16, 32) + one stride-2 conv (64).
    Every stride-2 layer of the backbone rounds up, hence repeated ceil-halving."""
    shapes, h, w = [], height, width
    for stride in (2, 4, 8, 16, 32, 64):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if stride in STRIDES:
            shapes.append((h, w))
    return tuple(shapes)


def sparse_detr_cases(image=FULL_IMAGE, batch=2, d_model=256, n_heads=8, n_points=4, rho=0.1,
                      decoder_queries=300) -> list[Case]:
    shapes = level_shapes(*image)
    tokens = sum(h * w for h, w in shapes)
    head_dim = d_model // n_heads
    return [Case("encoder_dense", batch, n_heads, head_dim, n_points, shapes, tokens),
            Case(f"encoder_rho{rho}", batch, n_heads, head_dim, n_points, shapes, int(tokens * rho) + 1),
            Case("decoder", batch, n_heads, head_dim, n_points, shapes, decoder_queries, queries_on_tokens=False)]


def make_inputs(case: Case, device: str = "cpu", dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """value [B, S, H, D], spatial_shapes [L, 2], level_start_index [L], sampling_loc [B, Q, H, L, P, 2],
    attn_weight [B, Q, H, L, P].

    Locations follow MSDeformAttn's initialisation: around each query's reference point (a token
    centre for encoder queries, in the dense case in token order; uniform for decoder queries),
    head h looks in its own direction, point p at p+1 pixels of every level, plus one pixel of noise.
    """
    g = torch.Generator().manual_seed(seed)
    n_levels = len(case.spatial_shapes)
    shapes = torch.tensor(case.spatial_shapes, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(case.batch, case.len_in, case.n_heads, case.head_dim, generator=g)
    if case.queries_on_tokens:
        centres = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                        indexing="xy"), -1).reshape(-1, 2)
                             for h, w in case.spatial_shapes])
        chosen = torch.arange(case.len_in) if case.len_q >= case.len_in else \
            torch.randperm(case.len_in, generator=g)[:case.len_q]
        reference = centres[chosen].expand(case.batch, -1, -1)
    else:
        reference = torch.rand(case.batch, case.len_q, 2, generator=g)
    angles = 2 * math.pi * torch.arange(case.n_heads) / case.n_heads
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    pixels = directions[:, None, :] * (torch.arange(case.n_points) + 1.0)[None, :, None]  # [H, P, 2]
    pixels = pixels[None, None, :, None] + torch.randn(case.batch, case.len_q, case.n_heads, n_levels,
                                                       case.n_points, 2, generator=g)
    level_wh = shapes.flip(-1).float()[None, None, None, :, None, :]  # (W_l, H_l)
    loc = reference[:, :, None, None, None, :] + pixels / level_wh
    attn = torch.randn(case.batch, case.len_q, case.n_heads, n_levels * case.n_points, generator=g).softmax(-1)
    attn = attn.view(case.batch, case.len_q, case.n_heads, n_levels, case.n_points)
    return [value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, dtype),
            attn.to(device, dtype)]


def implementations() -> dict:
    return {"native": torch.ops.sdo.ms_deform_attn, "reference": msda.ms_deform_attn_reference}


@contextlib.contextmanager
def cuda_kernel(kernel: str | None):
    """Runs the block with `kernel=<kernel>` appended to SDO_MSDA_CUDA (the op reads it at every call and
    the last setting wins, so other tuning settings stay); None leaves it alone."""
    saved = os.environ.get("SDO_MSDA_CUDA")
    if kernel is not None:
        os.environ["SDO_MSDA_CUDA"] = f"{saved},kernel={kernel}" if saved else f"kernel={kernel}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SDO_MSDA_CUDA", None)
        else:
            os.environ["SDO_MSDA_CUDA"] = saved


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forward_backward(fn, inputs, grad_output):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2], 64)
    out.backward(grad_output)
    return out.detach(), [leaf.grad for leaf in leaves]


def _median_seconds(call, repeat: int, device: str) -> float:
    if device == "cuda":  # GPU time between two events per call (the host's own timer would add launch gaps)
        pairs = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in pairs) / 1e3
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _max_diffs(native, reference) -> dict:
    """Largest differences, absolute and relative to the reference's largest magnitude, and the
    fraction of elements off by more than 1e-4 of it. Isolated grad_sampling_loc mismatches are
    points within float rounding of a pixel edge, where bilinear sampling has a kink and the two
    implementations take different (equally valid) one-sided derivatives."""
    (out_n, grads_n), (out_r, grads_r) = native, reference
    diffs = {}
    for name, a, b in zip(("output", "grad_value", "grad_sampling_loc", "grad_attn_weight"),
                          [out_n, *grads_n], [out_r, *grads_r]):
        diff = (a.float() - b.float()).abs()
        scale = max(b.float().abs().max().item(), 1e-30)
        diffs[name] = {"max_abs": diff.max().item(), "max_rel": diff.max().item() / scale,
                       "mismatch_fraction": (diff > 1e-4 * scale).float().mean().item()}
    return diffs


def _peak_memory_mib(cases: list[Case], impl: str) -> list[float]:
    """CPU peak memory of one forward + backward per case, in a fresh child process per implementation."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    request = json.dumps({"cases": [asdict(case) for case in cases], "impl": impl,
                          "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-c", "from orchestrator.bench.ops import _probe_main; _probe_main()",
                           request], check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {impl} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def _cuda_peak_memory_mib(case: Case, impl: str, dtype=torch.float32) -> float:
    inputs = _with_value_dtype(make_inputs(case, "cuda"), dtype)
    grad_output = torch.randn(case.batch, case.len_q, case.n_heads * case.head_dim, device="cuda").to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _forward_backward(implementations()[impl], inputs, grad_output)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _probe_main() -> None:
    """Child process: peak RSS growth of one forward + backward per case (see the module doc)."""
    request = json.loads(sys.argv[1])
    torch.set_num_threads(request["threads"])
    fn = implementations()[request["impl"]]
    tiny = Case("warmup", 1, 2, 8, 2, ((4, 6), (2, 3)), 3)  # one-time initialisation outside the measurement
    _forward_backward(fn, make_inputs(tiny), torch.ones(1, 3, 16))
    peaks = []
    for fields in request["cases"]:
        case = Case(**{**fields, "spatial_shapes": tuple(map(tuple, fields["spatial_shapes"]))})
        inputs = make_inputs(case)
        grad_output = torch.randn(case.batch, case.len_q, case.n_heads * case.head_dim)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _status_kib("VmRSS")
        _forward_backward(fn, inputs, grad_output)
        peaks.append((_status_kib("VmHWM") - before) / 1024)
        del inputs, grad_output
    print(json.dumps({"peak_mib": peaks}))


def _with_value_dtype(inputs: list, dtype) -> list:
    """value in dtype; locations and weights stay float32, as MSDeformAttn computes them."""
    return [inputs[0].to(dtype), *inputs[1:]]


def bench_case(case: Case, device: str, repeat: int, dtype=torch.float32, kernel: str | None = None) -> dict:
    """One row: native and reference timed on one case; kernel: the CUDA kernels of the native op."""
    with cuda_kernel(kernel):
        return _bench_case(case, device, repeat, dtype, kernel or device)


def _bench_case(case: Case, device: str, repeat: int, dtype, kernel: str) -> dict:
    inputs = _with_value_dtype(make_inputs(case, device), dtype)
    grad_output = torch.randn(case.batch, case.len_q, case.n_heads * case.head_dim,
                              generator=torch.Generator().manual_seed(1)).to(device, dtype)
    result = {**asdict(case), "len_in": case.len_in, "d_model": case.n_heads * case.head_dim,
              "dtype": str(dtype).removeprefix("torch."), "kernel": kernel}
    last = {}
    for impl, fn in implementations().items():
        with torch.no_grad():
            forward = _median_seconds(lambda fn=fn: fn(*inputs, 64), repeat, device)
        last[impl] = _forward_backward(fn, inputs, grad_output)  # also the warm-up of the timing below
        both = _median_seconds(lambda fn=fn: _forward_backward(fn, inputs, grad_output), repeat, device)
        result[impl] = {"forward_ms": round(forward * 1e3, 3), "forward_backward_ms": round(both * 1e3, 3)}
    native, reference = result["native"], result["reference"]
    result["speedup"] = {"forward": round(reference["forward_ms"] / native["forward_ms"], 2),
                         "forward_backward": round(reference["forward_backward_ms"] / native["forward_backward_ms"], 2)}
    result["native_vs_reference"] = _max_diffs(last["native"], last["reference"])
    return result


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _vector_over_channel(results: list[dict]) -> list[dict]:
    """Per (case, dtype) measured with both CUDA kernels: channel time / vector time."""
    rows = {(r["name"], r["dtype"], r["kernel"]): r["native"] for r in results}
    speedups = []
    for (name, dtype, kernel), vector in rows.items():
        channel = rows.get((name, dtype, "channel"))
        if kernel == "vector" and channel is not None:
            speedups.append({"name": name, "dtype": dtype, **{
                part: round(channel[f"{part}_ms"] / vector[f"{part}_ms"], 2) for part in ("forward", "forward_backward")}})
    return speedups


def run(*, quick: bool = False, repeat: int | None = None, memory: bool = True, cuda: bool | None = None,
        progress: bool = True, device: str = "auto", cuda_dtypes: tuple = ("float32",),
        cuda_kernels: tuple = CUDA_KERNELS) -> dict:
    """Benchmarks every case on CPU and/or CUDA. device: "auto" (CPU, plus CUDA when a GPU and the CUDA
    kernels are there; `cuda` True / False insists / refuses), "cpu" or "cuda". On CUDA every case runs
    in each of cuda_dtypes (value and grad_output in it; the CPU runs float32) with each of cuda_kernels."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    unknown = [d for d in cuda_dtypes if d not in DTYPES]
    if unknown or not cuda_dtypes:
        raise ValueError(f"--dtypes: expected a comma-separated subset of {','.join(DTYPES)}, got {list(cuda_dtypes)}")
    if not cuda_kernels or any(k not in CUDA_KERNELS for k in cuda_kernels):
        raise ValueError(f"--kernels: expected a comma-separated subset of {','.join(CUDA_KERNELS)}, "
                         f"got {list(cuda_kernels)}")
    if device in ("auto", "cpu") and not msda.native_available("cpu"):
        raise RuntimeError("the native op is not built: run `pip install -e .` or `sdo ops build` first")
    repeat = repeat if repeat is not None else (1 if quick else 7)
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    cases = sparse_detr_cases(QUICK_IMAGE if quick else FULL_IMAGE)
    devices = [] if device == "cuda" else ["cpu"]
    want_cuda = device == "cuda" or (device == "auto" and (torch.cuda.is_available() and msda.native_available("cuda")
                                                           if cuda is None else cuda))
    if want_cuda:
        if not (torch.cuda.is_available() and msda.native_available("cuda")):
            raise ValueError("--device cuda: no GPU or the op was built without CUDA kernels")
        devices.append("cuda")
    report = {"benchmark": "ops", "op": "sdo::ms_deform_attn", "dtype": "float32", "quick": quick, "repeat": repeat,
              "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "native_source": msda.native_source(),
              "image": list(QUICK_IMAGE if quick else FULL_IMAGE),
              "memory_method": ("cpu: one fresh process per implementation; per case VmHWM - VmRSS around one "
                                "forward+backward "
                                f"(peak reset via /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}); "
                                "cuda: torch.cuda.max_memory_allocated() growth") if memory else None}
    if "cuda" in devices:
        report["cuda_dtypes"] = list(cuda_dtypes)
        report["cuda_kernels"] = list(cuda_kernels)
        report["cuda_timing"] = "median of CUDA-event times around each call"
    from tqdm import tqdm

    for dev in devices:
        if dev == "cuda":
            report["gpu"] = torch.cuda.get_device_name()
        kernels = list(cuda_kernels) if dev == "cuda" else [None]
        warmup = Case("warmup", 1, 8, 32, 4, ((6, 8), (3, 4), (2, 2), (1, 1)), 5)
        for kernel in kernels:
            with cuda_kernel(kernel):
                for fn in implementations().values():
                    _forward_backward(fn, make_inputs(warmup, dev), torch.ones(1, 5, 256, device=dev))
        dtypes = [DTYPES[d] for d in cuda_dtypes] if dev == "cuda" else [torch.float32]
        runs = [(case, dtype, kernel) for dtype in dtypes for case in cases for kernel in kernels]
        results = [bench_case(case, dev, repeat, dtype, kernel) for case, dtype, kernel
                   in tqdm(runs, desc=f"bench ops ({dev})", disable=not progress, file=sys.stderr)]
        if memory:
            for impl in implementations():
                if dev == "cpu":
                    peaks = _peak_memory_mib(cases, impl)
                else:
                    peaks = []
                    for case, dtype, kernel in runs:
                        with cuda_kernel(kernel):
                            peaks.append(_cuda_peak_memory_mib(case, impl, dtype))
                for result, peak in zip(results, peaks):
                    result[impl]["peak_mem_mib"] = round(peak, 2)
            for result in results:
                result["memory_ratio_native_over_reference"] = round(
                    result["native"]["peak_mem_mib"] / result["reference"]["peak_mem_mib"], 3)
        report[dev] = results
        if dev == "cuda":
            report["cuda_vector_over_channel"] = _vector_over_channel(results)
    if "cpu" in report:
        speedups = [r["speedup"]["forward_backward"] for r in report["cpu"]]
        report["goal"] = {"cpu_forward_backward_speedup_at_least": FORWARD_BACKWARD_GOAL,
                          "min_cpu_forward_backward_speedup": min(speedups),
                          "met": min(speedups) >= FORWARD_BACKWARD_GOAL}
    return report
