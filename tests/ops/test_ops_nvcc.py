"""Both sets of CUDA kernels compile with nvcc for every architecture from sm_70 to sm_90 that the toolkit
offers: the default ones (csrc/cuda/ms_deform_attn_kernels.cuh) and the vector ones
(ms_deform_attn_vector_kernels.cuh, SDO_MSDA_CUDA=kernel=vector), in one nvcc call.

No CUDA build of torch is needed: the two headers include only CUDA headers.
CUDA 13 dropped sm_70 (Volta); then the test compiles sm_75..sm_90. SDO_REQUIRE_NVCC_CHECK=1 turns
a missing nvcc into a failure instead of a skip.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
WANTED_ARCHS = (70, 75, 80, 86, 89, 90)
# (scalar_t, acc_t, grad_t) triples the torch binding dispatches to: grad_value accumulates in acc_t, or
# (vector kernels) in the 16-bit type itself (paired atomics on sm_90+).
TYPES = (("float", "float", "float"), ("double", "double", "double"), ("__half", "float", "float"),
         ("__half", "float", "__half"), ("__nv_bfloat16", "float", "float"),
         ("__nv_bfloat16", "float", "__nv_bfloat16"))


def _nvcc() -> str | None:
    """nvcc on PATH, else under the CUDA toolkit torch would build with (CUDA_HOME)."""
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path(CUDA_HOME) / "bin" / "nvcc" if CUDA_HOME else None
    return str(candidate) if candidate is not None and candidate.is_file() else None


def _instantiations() -> str:
    lines = [f'#include "{(KERNELS / name).as_posix()}"'
             for name in ("ms_deform_attn_kernels.cuh", "ms_deform_attn_vector_kernels.cuh")]
    pairs = dict.fromkeys((scalar, acc) for scalar, acc, _ in TYPES)
    lines.append("namespace sdo { namespace cuda {")  # the default kernels
    for scalar, acc in pairs:
        lines += [
            (f"template cudaError_t launch_forward<{scalar}, {acc}>(const {scalar}*, const int64_t*, const int64_t*,"
             f" const {acc}*, const {acc}*, {scalar}*, Dims, cudaStream_t);"),
            (f"template cudaError_t launch_backward<{scalar}, {acc}>(const {scalar}*, const {scalar}*, const int64_t*,"
             f" const int64_t*, const {acc}*, const {acc}*, {acc}*, {acc}*, {acc}*, Dims, cudaStream_t);"),
        ]
        if scalar != acc:
            lines.append(f"template cudaError_t launch_cast<{scalar}, {acc}>(const {acc}*, {scalar}*, int64_t,"
                         " cudaStream_t);")
    lines.append("}}")
    lines.append("namespace sdo { namespace cuda_vector {")
    for scalar, acc in pairs:
        lines.append(f"template cudaError_t launch_forward<{scalar}, {acc}>(const {scalar}*, const int64_t*,"
                     f" const int64_t*, const {acc}*, const {acc}*, {scalar}*, Dims, bool, int, cudaStream_t);")
    for scalar, acc, grad in TYPES:
        lines.append(f"template cudaError_t launch_backward<{scalar}, {acc}, {grad}>(const {scalar}*, const {scalar}*,"
                     f" const int64_t*, const int64_t*, const {acc}*, const {acc}*, {grad}*, {acc}*, {acc}*, Dims,"
                     " bool, int, cudaStream_t);")
    lines.append("}}")
    return "\n".join(lines) + "\n"


NVCC = _nvcc()
requires_nvcc = pytest.mark.skipif(NVCC is None and os.environ.get("SDO_REQUIRE_NVCC_CHECK") != "1",
                                   reason="no nvcc on this machine")


@requires_nvcc
def test_kernels_compile_for_sm70_to_sm90(tmp_path):
    assert NVCC is not None, "SDO_REQUIRE_NVCC_CHECK=1 but nvcc was not found"
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    archs = [arch for arch in WANTED_ARCHS if f"compute_{arch}" in listed]
    assert {75, 80, 86, 90} <= set(archs), f"nvcc offers only {listed}"
    source = tmp_path / "kernels.cu"
    source.write_text(_instantiations())
    gencode = [flag for arch in archs for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    obj = tmp_path / "kernels.o"
    proc = subprocess.run([NVCC, "-c", "-O3", "-std=c++17", "-Werror", "all-warnings", *gencode, str(source),
                           "-o", str(obj)], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
