"""JIT build of the native ops (`sdo ops build`) and what is built for which device (`sdo ops status`).

The sources and flags come from setup.py (`ops_sources`, `ops_compile_args`), the one place that
knows how to build the op; setup.py is imported as a module (it calls setup() only as __main__).
The library lands in model.ms_deform_attn.jit_build_dir() (under $SDO_OPS_CACHE or
~/.cache/sdo/ops), where model/ finds it when the `sdo_ops` extension is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import ms_deform_attn as msda

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_INFO = "build_info.json"


class OpsBuildError(RuntimeError):
    """The compiler failed; the message holds the tail of its output."""


def load_setup_module(root: Path = REPO_ROOT):
    """setup.py of the source checkout as a module (ops_sources, ops_compile_args, ...)."""
    path = Path(root) / "setup.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `sdo ops build` needs the sdo source checkout")
    spec = importlib.util.spec_from_file_location("sdo_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(*, cuda: bool | None = None, force: bool = False, verbose: bool = False) -> dict:
    """Compiles the op with torch.utils.cpp_extension.load into jit_build_dir().

    cuda: None = CUDA sources when torch is a CUDA build and a toolkit is found; True insists.
    The compile runs in a child process so that this process keeps whatever op it already
    loaded (a library can register the `sdo` namespace only once per process).
    Returns {"library", "cuda", "sources", "seconds", "build_dir"}.
    """
    setup_module = load_setup_module()
    can_cuda = setup_module.cuda_available_for_build()
    if cuda and not can_cuda:
        raise ValueError("--cuda needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME / nvcc); "
                         f"torch {torch.__version__} has CUDA {torch.version.cuda}")
    use_cuda = can_cuda if cuda is None else cuda
    sources = setup_module.ops_sources(use_cuda)
    if not sources:
        raise FileNotFoundError(f"no op sources under {REPO_ROOT / 'csrc'}")
    flags = setup_module.ops_compile_args(use_cuda)
    build_dir = msda.jit_build_dir()
    if force and build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": msda.LIBRARY_NAME, "sources": sources, "extra_cflags": flags["cxx"],
            "extra_cuda_cflags": flags.get("nvcc", []), "extra_ldflags": ["-fopenmp"],
            "build_directory": str(build_dir), "with_cuda": use_cuda, "verbose": verbose}
    env = dict(os.environ, SDO_DISABLE_NATIVE_OPS="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], check=False, env=env, cwd=str(REPO_ROOT),
                          capture_output=not verbose, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        output = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()
        raise OpsBuildError("building the ms_deform_attn op failed:\n" + "\n".join(output[-40:]))
    library = msda.jit_library_path()
    info = {"library": str(library), "cuda": use_cuda, "sources": [str(Path(s).relative_to(REPO_ROOT))
                                                                   for s in sources],
            "torch": torch.__version__, "seconds": round(seconds, 1), "build_dir": str(build_dir)}
    (build_dir / BUILD_INFO).write_text(json.dumps(info, indent=2))
    return info


# Runs in the child: compile + load (which also proves the library loads and registers the op).
_CHILD = """
import json, sys
import torch
from torch.utils.cpp_extension import load
spec = json.loads(sys.argv[1])
load(is_python_module=False, **spec)
assert torch._C._dispatch_has_kernel_for_dispatch_key("sdo::ms_deform_attn", "CPU")
"""


def _installed_extension() -> str | None:
    """Path of the setup.py-built extension sdo_ops._C, without importing it."""
    package = importlib.util.find_spec("sdo_ops")
    if package is None or not package.submodule_search_locations:
        return None
    for folder in package.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            return str(candidate)
    return None


def _jit_build() -> dict | None:
    library = msda.jit_library_path()
    if not library.is_file():
        return None
    info_path = library.parent / BUILD_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"library": str(library)}
    newest_source = max((p.stat().st_mtime for p in (REPO_ROOT / "csrc").rglob("*") if p.is_file()), default=0)
    info["stale"] = newest_source > library.stat().st_mtime
    return info


def status() -> dict:
    """What is built (installed extension, JIT build), what this process loaded, per device."""
    from torch.utils.cpp_extension import CUDA_HOME

    source = msda.load_native()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu_available": torch.cuda.is_available(),
        "nvcc": shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None),
        "installed_extension": _installed_extension(),
        "jit_build": _jit_build(),
        "jit_build_dir": str(msda.jit_build_dir()),
        "loaded_from": source,
        "native": {device: msda.native_available(device) for device in ("cpu", "cuda")},
        "implementation": {device: ("native" if msda.native_available(device) else "reference")
                           for device in ("cpu", "cuda")},
    }
