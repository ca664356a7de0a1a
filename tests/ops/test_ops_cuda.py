"""CUDA kernels against the reference (run only where a GPU and the CUDA build are present)."""
import pytest
import torch
from ops_inputs import forward_and_grads, make_inputs

from model.ms_deform_attn import ms_deform_attn_reference, native_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def cuda_op(native_op):
    assert native_available("cuda"), "a GPU is present but the op was built without CUDA kernels"
    return native_op


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_cuda_forward_backward_match_reference(cuda_op, dtype, tolerance):
    inputs = make_inputs(batch=2, n_heads=8, head_dim=32, shapes=((20, 27), (10, 14), (5, 7), (3, 4)), len_q=50,
                         n_points=4, spread=0.1, padded=True, dtype=torch.float32, seed=2, device="cuda")
    value, shapes, starts, loc, attn = inputs
    low = [value.to(dtype), shapes, starts, loc, attn]
    reference_inputs = [value.to(dtype).float(), shapes, starts, loc, attn]
    grad_output = torch.randn(2, 50, 256, device="cuda").to(dtype)
    out, grads = forward_and_grads(cuda_op, low, grad_output)
    out_ref, grads_ref = forward_and_grads(ms_deform_attn_reference, reference_inputs, grad_output.float())
    assert out.dtype == dtype
    assert (out.float() - out_ref).abs().max() <= tolerance * max(1.0, out_ref.abs().max().item())
    for name, got, want in zip(("value", "sampling_loc", "attn_weight"), grads, grads_ref):
        assert (got.float() - want).abs().max() <= 10 * tolerance * max(1.0, want.abs().max().item()), name


def test_cuda_matches_cpu_native(cuda_op):
    inputs = make_inputs(batch=2, n_heads=4, head_dim=40, shapes=((9, 13), (5, 7), (1, 1)), len_q=33, n_points=3,
                         spread=0.3, dtype=torch.float32, seed=4)
    grad_output = torch.randn(2, 33, 160)
    out_cpu, grads_cpu = forward_and_grads(cuda_op, inputs, grad_output)
    out_gpu, grads_gpu = forward_and_grads(cuda_op, [t.cuda() for t in inputs], grad_output.cuda())
    assert torch.allclose(out_gpu.cpu(), out_cpu, atol=1e-5)
    for got, want in zip(grads_gpu, grads_cpu):
        assert torch.allclose(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_cuda_gradcheck_float64(cuda_op):
    value, shapes, starts, loc, attn = make_inputs(batch=1, n_heads=2, head_dim=3, shapes=((4, 5), (2, 3)), len_q=3,
                                                   n_points=2, spread=0.2, seed=5, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, l, a: cuda_op(v, shapes, starts, l, a, 64), (value, loc, attn),
                                    eps=1e-6, atol=1e-7)
