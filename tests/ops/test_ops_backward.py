"""Backward of the native op: gradcheck in float64 and equality with the reference's autograd."""
import pytest
import torch
from ops_inputs import forward_and_grads, make_inputs

from model.ms_deform_attn import ms_deform_attn_reference


def test_gradcheck_float64(native_op):
    value, shapes, starts, loc, attn = make_inputs(batch=2, n_heads=2, head_dim=3, shapes=((4, 5), (2, 3), (1, 1)),
                                                   len_q=3, n_points=2, spread=0.2, seed=11, requires_grad=True)

    def op(value, loc, attn):
        return native_op(value, shapes, starts, loc, attn, 64)

    assert torch.autograd.gradcheck(op, (value, loc, attn), eps=1e-6, atol=1e-7)


def test_gradcheck_float64_padded(native_op):
    value, shapes, starts, loc, attn = make_inputs(batch=2, n_heads=1, head_dim=2, shapes=((3, 4), (2, 2)),
                                                   len_q=4, n_points=2, padded=True, seed=12, requires_grad=True)

    def op(value, loc, attn):
        return native_op(value, shapes, starts, loc, attn, 64)

    assert torch.autograd.gradcheck(op, (value, loc, attn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads_dim", [(8, 32), (3, 5)])
def test_backward_matches_reference_float32(native_op, heads_dim):
    n_heads, head_dim = heads_dim
    inputs = make_inputs(batch=2, n_heads=n_heads, head_dim=head_dim, shapes=((10, 13), (5, 7), (3, 4), (1, 2)),
                         len_q=40, n_points=4, spread=0.1, padded=True, dtype=torch.float32, seed=head_dim)
    grad_output = torch.randn(2, 40, n_heads * head_dim, generator=torch.Generator().manual_seed(0))
    out_native, grads_native = forward_and_grads(native_op, inputs, grad_output)
    out_ref, grads_ref = forward_and_grads(ms_deform_attn_reference, inputs, grad_output)
    assert (out_native - out_ref).abs().max() <= 1e-5
    for name, native, reference in zip(("value", "sampling_loc", "attn_weight"), grads_native, grads_ref):
        scale = reference.abs().max().clamp_min(1.0)
        assert (native - reference).abs().max() / scale <= 2e-5, name


def test_backward_bfloat16_close_to_float32(native_op):
    value, shapes, starts, loc, attn = make_inputs(batch=2, n_heads=4, head_dim=8, shapes=((8, 9), (4, 5), (2, 2)),
                                                   len_q=10, n_points=3, dtype=torch.float32, seed=21)
    grad_output = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    inputs_bf16 = (value.bfloat16(), shapes, starts, loc, attn)
    inputs_f32 = (value.bfloat16().float(), shapes, starts, loc, attn)
    _, grads_bf16 = forward_and_grads(native_op, inputs_bf16, grad_output.bfloat16())
    _, grads_f32 = forward_and_grads(ms_deform_attn_reference, inputs_f32, grad_output.bfloat16().float())
    assert grads_bf16[0].dtype == torch.bfloat16 and grads_bf16[1].dtype == torch.float32
    for name, low, full in zip(("value", "sampling_loc", "attn_weight"), grads_bf16, grads_f32):
        scale = full.abs().max()
        assert (low.float() - full).abs().max() / scale <= 2e-2, name


def test_grad_only_flows_where_asked(native_op):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32, seed=4)
    value.requires_grad_(True)
    native_op(value, shapes, starts, loc, attn, 64).square().sum().backward()
    assert value.grad is not None and loc.grad is None and attn.grad is None
    assert torch.count_nonzero(value.grad) > 0


def test_backward_with_channel_blocks_matches_reference(native_op):
    # One (batch, head) pair and more threads than pairs: the backward splits channels into blocks
    # and sums the per-block location / weight gradients.
    inputs = make_inputs(batch=1, n_heads=1, head_dim=32, shapes=((7, 9), (4, 5)), len_q=25, n_points=3,
                         spread=0.1, dtype=torch.float32, seed=31)
    grad_output = torch.randn(1, 25, 32, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _, grads_native = forward_and_grads(native_op, inputs, grad_output)
    finally:
        torch.set_num_threads(threads)
    _, grads_ref = forward_and_grads(ms_deform_attn_reference, inputs, grad_output)
    for name, native, reference in zip(("value", "sampling_loc", "attn_weight"), grads_native, grads_ref):
        assert (native - reference).abs().max() / reference.abs().max() <= 2e-5, name
