"""Fixtures shared by several test folders: the native ms_deform_attn op (installed, else JIT-built once)."""
from __future__ import annotations

import pytest
import torch

from model import ms_deform_attn as msda


@pytest.fixture(scope="session")
def native_op():
    """torch.ops.sdo.ms_deform_attn on CPU: the installed `sdo_ops`, else a JIT build (once per session)."""
    if not msda.native_available("cpu"):
        from orchestrator import ops_build

        ops_build.build()
        msda.load_native(retry=True)
    assert msda.native_available("cpu"), f"native op not loaded (source: {msda.native_source()})"
    return torch.ops.sdo.ms_deform_attn
