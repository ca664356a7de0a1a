"""Native ops of sdo, built from csrc/ by setup.py as `sdo_ops._C`.

Importing this package registers `torch.ops.sdo.ms_deform_attn` (+ its backward). torch is imported
first so that the extension binds to torch's own libc10/libtorch and OpenMP runtime.
Use it through model.ms_deform_attn, which adds autograd and the fake kernel.
"""
import torch  # noqa: F401  (must be loaded before the extension)

from sdo_ops import _C  # noqa: F401  (static initialisers register the op)
