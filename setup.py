"""sdo: the Sparse DETR orchestrator.

This file is the single place that knows how to build the native ops (`csrc/`):
`ops_extension()` is used here by `pip install` (setuptools + torch BuildExtension + ninja) and by
`sdo ops build` (JIT, `torch.utils.cpp_extension.load` with the same sources and flags).

Install into an environment that already has torch (`pip install -e . --no-build-isolation`),
so that a GPU user's CUDA torch is built against and no second torch is downloaded.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OPS_NAME = "sdo_ops._C"  # the package sdo_ops/ imports torch, then this extension


def cuda_available_for_build() -> bool:
    """CUDA sources are compiled only with a CUDA toolkit *and* a CUDA build of torch."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("SDO_OPS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def ops_sources(cuda: bool) -> list[str]:
    """C++ sources always; `.cu` sources only for a CUDA build."""
    sources = sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")))
    if cuda:
        sources += sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    return sources


def ops_compile_args(cuda: bool) -> dict[str, list[str]]:
    """Compiler flags; torch adds the C++ standard it needs (-std=c++20 for torch 2.13).

    -fopenmp: `at::parallel_for` is inlined into our code and runs on OpenMP like torch itself.
    The CUDA architectures follow torch: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else every
    architecture torch was built for.
    """
    args = {"cxx": ["-O3", "-fopenmp"]}
    if cuda:
        args["cxx"].append("-DSDO_WITH_CUDA")
        args["nvcc"] = ["-O3", "-DSDO_WITH_CUDA", "-lineinfo"]
    return args


def ops_extension():
    """The setuptools Extension of the ms_deform_attn op, or None when there are no sources."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cuda = cuda_available_for_build()
    sources = ops_sources(cuda)
    if not sources:
        return None
    kind = CUDAExtension if cuda else CppExtension
    return kind(name=OPS_NAME, sources=[os.path.relpath(s, ROOT) for s in sources],
                extra_compile_args=ops_compile_args(cuda), extra_link_args=["-fopenmp"])


def _setup() -> None:
    from setuptools import find_packages, setup

    ext_modules, cmdclass = [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:  # metadata-only runs (e.g. `pip download`): no torch, no ops
        BuildExtension = None
    if BuildExtension is not None and os.environ.get("SDO_SKIP_OPS") != "1":
        extension = ops_extension()
        if extension is not None:
            ext_modules = [extension]
            cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

    setup(
        name="sdo",
        version="0.1.0",
        description="Sparse DETR orchestrator: train and sweep Sparse DETR on Ray, tracked in MLflow",
        long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["model", "model.*", "pipelines", "pipelines.*",
                                        "orchestrator", "orchestrator.*", "sdo_ops"]),
        include_package_data=True,
        install_requires=[
            "torch>=2.11",  # tested: 2.13 (CPU, CI), 2.11 (CUDA, H200); see README
            "ray[default,train,tune]>=2.50,<3",
            "mlflow>=3.0,<4",
            "webdataset>=0.2.100,<2",
            "pycocotools>=2.0.7",
            "click>=8.1",
            "pyyaml>=6.0",
            "ninja>=1.11",
            "scipy>=1.10",
            "numpy>=1.24",
            "pillow>=10.0",
            "simplejpeg>=1.7",  # the loader's JPEG decoder (libjpeg-turbo, no PIL object in between)
            "tqdm>=4.66",
            "matplotlib>=3.7",
            "kubernetes>=29.0",
            "jsonschema>=4.18",
            "psutil>=5.9",
            "nvidia-ml-py>=12.0",  # GPU utilisation / memory in MLflow system metrics
        ],
        extras_require={"dev": ["pytest>=8.0", "ruff>=0.5", "rust-just>=1.30", "boto3>=1.34", "moto[server]>=5.0,<6",
                                "kubernetes-validate>=1.30", "optuna>=3.0",  # multi-objective sweeps in the tests
                                "playwright>=1.40"],  # the MLflow UI browser test (system Chromium)
                        "optuna": ["optuna>=3.0"], "swin": ["timm>=0.9"],
                        "s3": ["boto3>=1.34"],  # `sdo data upload|cat` (pipelines/remote.py)
                        # `sdo export --format onnx` and its onnxruntime tests
                        "export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5"]},
        entry_points={"console_scripts": ["sdo=orchestrator.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    _setup()
