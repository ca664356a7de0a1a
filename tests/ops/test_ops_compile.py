"""The op under torch.compile (fullgraph: no graph break) and under FakeTensor / FlopCounterMode."""
import torch
from ops_inputs import make_inputs
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from model.ms_deform_attn import ms_deform_attn


def _attention_block(value, shapes, starts, loc, attn):
    # Dense ops around the op, as in MSDeformAttn, so the graph holds more than the op alone.
    out = ms_deform_attn(value * 2.0, shapes, starts, loc.clamp(-0.5, 1.5), attn.softmax(-1), 64)
    return torch.tanh(out).sum(-1)


def test_torch_compile_fullgraph_forward_and_backward(native_op):
    torch._dynamo.reset()
    compiled = torch.compile(_attention_block, fullgraph=True, backend="aot_eager")
    inputs = make_inputs(dtype=torch.float32, len_q=7, n_points=3, spread=0.2, seed=7)
    eager_leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    compiled_leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    expected = _attention_block(*eager_leaves)
    got = compiled(*compiled_leaves)
    assert torch.allclose(got, expected, atol=1e-6)
    expected.sum().backward()
    got.sum().backward()
    for eager, comp in zip(eager_leaves, compiled_leaves):
        if eager.is_floating_point():
            assert torch.allclose(comp.grad, eager.grad, atol=1e-5)


def test_torch_compile_inductor_forward(native_op):
    torch._dynamo.reset()
    compiled = torch.compile(_attention_block, fullgraph=True)
    inputs = make_inputs(dtype=torch.float32, len_q=6, seed=8)
    with torch.no_grad():
        assert torch.allclose(compiled(*inputs), _attention_block(*inputs), atol=1e-6)


def test_fake_tensors_and_flop_counter(native_op):
    real = make_inputs(batch=2, n_heads=8, head_dim=32, shapes=((20, 30), (10, 15)), len_q=50, n_points=4,
                       dtype=torch.float32, seed=9)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        for index in (0, 3, 4):
            fake[index].requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            out = ms_deform_attn(*fake, 64)
            projected = out @ torch.ones(256, 4)
            projected.sum().backward()
        assert out.shape == (2, 50, 256) and out.dtype == torch.float32
        assert fake[0].grad.shape == real[0].shape and fake[3].grad.shape == real[3].shape
    # The matmul around the op is counted, so tracing went through the op's fake kernels.
    assert counter.get_total_flops() >= 2 * 2 * 50 * 256 * 4
