"""`sdo ops status` reports what is built and what each device uses; ops_build reads setup.py."""
import json
from pathlib import Path

from click.testing import CliRunner

from orchestrator import ops_build
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_setup_py_is_the_source_of_sources_and_flags():
    setup_module = ops_build.load_setup_module()
    cpu_sources = [Path(s).relative_to(ROOT).as_posix() for s in setup_module.ops_sources(False)]
    assert cpu_sources == ["csrc/ms_deform_attn.cpp", "csrc/ms_deform_attn_cpu.cpp"]
    cuda_sources = [Path(s).relative_to(ROOT).as_posix() for s in setup_module.ops_sources(True)]
    assert cuda_sources == cpu_sources + ["csrc/cuda/ms_deform_attn_cuda.cu"]
    assert "-fopenmp" in setup_module.ops_compile_args(False)["cxx"]
    assert "nvcc" in setup_module.ops_compile_args(True)


def test_load_setup_module_names_missing_file(tmp_path):
    try:
        ops_build.load_setup_module(tmp_path)
    except FileNotFoundError as err:
        assert "setup.py" in str(err)
    else:
        raise AssertionError("a folder without setup.py must raise FileNotFoundError")


def test_ops_status_json(native_op):
    result = CliRunner().invoke(main, ["ops", "status"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["native"]["cpu"] is True and status["implementation"]["cpu"] == "native"
    assert status["loaded_from"]
    assert status["installed_extension"] or status["jit_build"]
    import torch

    assert status["native"]["cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key("sdo::ms_deform_attn", "CUDA")
