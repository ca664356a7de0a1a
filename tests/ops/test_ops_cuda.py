"""CUDA kernels against float64 references (run only where a GPU and the CUDA build are present).

Two sets of kernels, chosen by SDO_MSDA_CUDA=kernel=channel|vector (read at every call): the general
tests (dtypes, head dims, borders, layouts, gradcheck, bad input) run for both (the `kernel` fixture);
the tests of the vector kernels' own features run with kernel=vector. The default is the verified
channel kernel, which checks the level table on the host (test_cuda_default_kernel_is_channel).

Every vector kernel instance is reached: each dtype; head_dim a multiple of the 16-byte vector (32, 64,
8: vector path, 1 to 16 lanes per item; 40: vector path with idle lanes) or not (5: scalar path, one
channel per lane; 66: scalar path, lanes striding over channel chunks); 32-bit and 64-bit indices;
both item orders, points split over lane groups (automatic for the small cases here, forced in the
tuning test) and both grad_value accumulations of the 16-bit types; misaligned and non-contiguous
inputs; points outside the levels and on their borders; levels that do not fit in value.
"""
import pytest
import torch
from ops_inputs import forward_and_grads, make_inputs

from model.ms_deform_attn import ms_deform_attn_reference, native_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICE = "cuda"
GRAD_NAMES = ("value", "sampling_loc", "attn_weight")
KERNELS = ("channel", "vector")


@pytest.fixture(scope="module")
def cuda_op(native_op):
    assert native_available(DEVICE), "a GPU is present but the op was built without CUDA kernels"
    return native_op


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """The test runs once per set of CUDA kernels."""
    monkeypatch.setenv("SDO_MSDA_CUDA", f"kernel={request.param}")
    return request.param


@pytest.fixture
def vector_kernel(monkeypatch):
    monkeypatch.setenv("SDO_MSDA_CUDA", "kernel=vector")


def _max_rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _reference64(inputs, grad_output):
    """grid_sample reference in float64 on the same (rounded) values."""
    value, shapes, starts, loc, attn = inputs
    return forward_and_grads(ms_deform_attn_reference, [value.double(), shapes, starts, loc.double(), attn.double()],
                             grad_output.double())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("setting", ["kernel=channel", "kernel=vector,half_grad=native",
                                     "kernel=vector,half_grad=float32"])
def test_cuda_forward_backward_match_reference(cuda_op, dtype, tolerance, setting, monkeypatch):
    monkeypatch.setenv("SDO_MSDA_CUDA", setting)
    inputs = make_inputs(batch=2, n_heads=8, head_dim=32, shapes=((20, 27), (10, 14), (5, 7), (3, 4)), len_q=50,
                         n_points=4, spread=0.1, padded=True, dtype=torch.float32, seed=2, device=DEVICE)
    value, shapes, starts, loc, attn = inputs
    low = [value.to(dtype), shapes, starts, loc, attn]
    reference_inputs = [value.to(dtype).float(), shapes, starts, loc, attn]
    grad_output = torch.randn(2, 50, 256, device=DEVICE).to(dtype)
    out, grads = forward_and_grads(cuda_op, low, grad_output)
    out_ref, grads_ref = forward_and_grads(ms_deform_attn_reference, reference_inputs, grad_output.float())
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert (out.float() - out_ref).abs().max() <= tolerance * max(1.0, out_ref.abs().max().item())
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert (got.float() - want).abs().max() <= 10 * tolerance * max(1.0, want.abs().max().item()), name


# (output, gradients), relative to the largest reference magnitude: float64 exact up to rounding, float32
# as the official kernel (2e-5), the 16-bit types as in the test above (gradients 10x the output's).
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-2),
             torch.bfloat16: (1e-2, 1e-1)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 8, 5, 40, 66])
def test_cuda_matches_float64_reference(cuda_op, kernel, dtype, head_dim):
    inputs = make_inputs(batch=2, n_heads=3, head_dim=head_dim, shapes=((9, 13), (5, 7), (2, 3)), len_q=37,
                         n_points=3, spread=0.2, padded=True, dtype=torch.float32, seed=head_dim, device=DEVICE)
    value, shapes, starts, loc, attn = inputs
    inputs = [value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype)]
    grad_output = torch.randn(2, 37, 3 * head_dim, device=DEVICE).to(dtype)
    out, grads = forward_and_grads(cuda_op, inputs, grad_output)
    out_ref, grads_ref = _reference64(inputs, grad_output)
    out_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and _max_rel(out, out_ref) <= out_tolerance
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert _max_rel(got, want) <= grad_tolerance, name


def test_cuda_matches_cpu_native(cuda_op, kernel):
    inputs = make_inputs(batch=2, n_heads=4, head_dim=40, shapes=((9, 13), (5, 7), (1, 1)), len_q=33, n_points=3,
                         spread=0.3, dtype=torch.float32, seed=4)
    grad_output = torch.randn(2, 33, 160)
    out_cpu, grads_cpu = forward_and_grads(cuda_op, inputs, grad_output)
    out_gpu, grads_gpu = forward_and_grads(cuda_op, [t.to(DEVICE) for t in inputs], grad_output.to(DEVICE))
    assert torch.allclose(out_gpu.cpu(), out_cpu, atol=1e-5)
    for got, want in zip(grads_gpu, grads_cpu):
        assert torch.allclose(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tuning_settings_agree(cuda_op, dtype, monkeypatch):
    # Item orders, points split over 1 / 2 / 4 lane groups, both grad_value accumulations.
    inputs = make_inputs(batch=2, n_heads=4, head_dim=32, shapes=((12, 10), (6, 5)), len_q=30, n_points=4,
                         spread=0.1, dtype=torch.float32, seed=7, device=DEVICE)
    inputs[0] = inputs[0].to(dtype)
    grad_output = torch.randn(2, 30, 128, device=DEVICE).to(dtype)
    results = {}
    for setting in ("forward_inner=queries,backward_inner=queries,points_split=1,half_grad=native",
                    "forward_inner=heads,backward_inner=heads,points_split=1,half_grad=native",
                    "forward_inner=heads,backward_inner=queries,points_split=4,half_grad=float32",
                    "points_split=2", "points_split=auto"):
        monkeypatch.setenv("SDO_MSDA_CUDA", f"kernel=vector,{setting}")
        results[setting] = forward_and_grads(cuda_op, inputs, grad_output)
    (out0, grads0), (out1, _), *_ = results.values()
    assert torch.equal(out1, out0)  # one slice: every output element is summed in the same order
    out_tolerance, grad_tolerance = TOLERANCE[dtype]
    for out, grads in [results[s] for s in list(results)[1:]]:
        assert _max_rel(out, out0) <= out_tolerance / 10  # slices add partial sums in another order
        # Each point belongs to one lane group whatever the setting: the same location / weight gradients.
        assert torch.equal(grads[1], grads0[1]) and torch.equal(grads[2], grads0[2])
        assert _max_rel(grads[0], grads0[0]) <= (1e-6 if dtype == torch.float32 else grad_tolerance)


@pytest.mark.parametrize("setting", ["kernel=warp", "kernel", "forward_inner=diagonal", "points_split=3",
                                     "half_grad=float8"])
def test_cuda_rejects_unknown_tuning(cuda_op, monkeypatch, setting):
    # Every setting is checked, also those that apply to the vector kernels only while the default runs.
    monkeypatch.setenv("SDO_MSDA_CUDA", setting)
    inputs = make_inputs(dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="SDO_MSDA_CUDA"):
        cuda_op(*inputs, 64)


def _border_locations(shapes, batch, len_q, n_heads, n_points):
    """Locations on pixel centres, on the image edges, just inside / outside them and far outside."""
    width, height = shapes[0][1], shapes[0][0]
    xs = torch.tensor([0.0, 1.0, 0.5 / width, 1 - 0.5 / width, -0.5 / width, 1 + 0.5 / width, 1e-7, 1 - 1e-7,
                       -1e-7, 1 + 1e-7, 2.0 / width, -3.0, 4.0, 0.5, 0.25, 1.5 / width], dtype=torch.float64)
    ys = torch.tensor([0.0, 1.0, 0.5 / height, 1 - 0.5 / height, 1 + 0.5 / height, -0.5 / height, 0.5, 1e-7,
                       1 - 1e-7, -2.0, 3.0 / height, 0.75, -1e-7, 1 + 1e-7, 1.0 / height, 0.3], dtype=torch.float64)
    n_levels = len(shapes)
    count = batch * len_q * n_heads * n_levels * n_points
    index = torch.arange(count)
    loc = torch.stack([xs[index % len(xs)], ys[(index // len(xs)) % len(ys)]], -1)
    return loc.view(batch, len_q, n_heads, n_levels, n_points, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_points_on_borders_and_outside(cuda_op, kernel, dtype):
    shapes = ((6, 8), (3, 4))
    value, spatial_shapes, starts, _, attn = make_inputs(batch=2, n_heads=2, head_dim=8, shapes=shapes, len_q=20,
                                                         n_points=4, dtype=dtype, seed=9)
    loc = _border_locations(shapes, 2, 20, 2, 4).to(dtype)
    inputs = [value, spatial_shapes, starts, loc, attn]
    grad_output = torch.randn(2, 20, 16, dtype=dtype)
    out_gpu, grads_gpu = forward_and_grads(cuda_op, [t.to(DEVICE) for t in inputs], grad_output.to(DEVICE))
    # The CPU kernel shares the corner code: the same one-sided derivative at the kinks (pixel centres).
    out_cpu, grads_cpu = forward_and_grads(cuda_op, inputs, grad_output)
    out_ref, grads_ref = _reference64([t.to(DEVICE) for t in inputs], grad_output.to(DEVICE))
    tolerance = TOLERANCE[dtype][1]
    assert _max_rel(out_gpu, out_ref) <= tolerance
    assert _max_rel(grads_gpu[0], grads_ref[0]) <= tolerance and _max_rel(grads_gpu[2], grads_ref[2]) <= tolerance
    assert _max_rel(out_gpu.cpu(), out_cpu) <= tolerance
    for got, want in zip(grads_gpu, grads_cpu):
        assert _max_rel(got.cpu(), want) <= tolerance
    outside = (loc[..., 0] <= -1.0) | (loc[..., 0] >= 2.0) | (loc[..., 1] <= -1.0) | (loc[..., 1] >= 2.0)
    assert outside.any()
    assert torch.count_nonzero(grads_gpu[2].cpu()[outside]) == 0 and torch.count_nonzero(grads_gpu[1].cpu()[outside]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_misaligned_and_noncontiguous_inputs(cuda_op, kernel, dtype):
    inputs = make_inputs(batch=2, n_heads=4, head_dim=32, shapes=((8, 9), (4, 5)), len_q=12, n_points=2, spread=0.1,
                         dtype=torch.float32, seed=13, device=DEVICE)
    value, shapes, starts, loc, attn = inputs
    value = value.to(dtype)
    grad_output = torch.randn(2, 12, 128, device=DEVICE).to(dtype)
    out, grads = forward_and_grads(cuda_op, [value, shapes, starts, loc, attn], grad_output)
    # One element past an aligned allocation: contiguous but off the 16-byte grid (scalar path).
    shifted = torch.empty(value.numel() + 1, dtype=dtype, device=DEVICE)[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 != 0
    # Non-contiguous views of every floating input and of grad_output.
    strided_value = value.transpose(1, 2).contiguous().transpose(1, 2)
    strided_loc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    strided_attn = attn.transpose(1, 2).contiguous().transpose(1, 2)
    strided_grad = grad_output.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (strided_value.is_contiguous() or strided_loc.is_contiguous() or strided_grad.is_contiguous())
    for variant, grad in (([shifted, shapes, starts, loc, attn], grad_output),
                          ([strided_value, shapes, starts, strided_loc, strided_attn], strided_grad)):
        out_v, grads_v = forward_and_grads(cuda_op, variant, grad)
        out_tolerance, grad_tolerance = TOLERANCE[dtype]
        assert _max_rel(out_v, out) <= out_tolerance
        for name, got, want in zip(GRAD_NAMES, grads_v, grads):
            assert _max_rel(got, want) <= grad_tolerance, name


def _inputs_with_a_level_past_value():
    """Inputs whose level 2 (2x2) starts one token before the end of value; the starts that fit."""
    value, shapes, starts, loc, attn = make_inputs(batch=2, n_heads=2, head_dim=8, shapes=((6, 7), (3, 4), (2, 2)),
                                                   len_q=9, n_points=2, dtype=torch.float64, seed=17, device=DEVICE)
    bad_starts = starts.clone()
    bad_starts[2] = value.shape[1] - 1
    return [value, shapes, bad_starts, loc, attn], starts


@pytest.mark.parametrize("setting", [None, "kernel=channel", "points_split=2"])
def test_cuda_default_kernel_is_channel(cuda_op, monkeypatch, setting):
    # The default (no kernel= setting) is the verified channel kernel: like the CPU, it checks the
    # level table on the host and raises ValueError; the vector kernel does not (next test).
    if setting is None:
        monkeypatch.delenv("SDO_MSDA_CUDA", raising=False)
    else:
        monkeypatch.setenv("SDO_MSDA_CUDA", setting)
    inputs, _ = _inputs_with_a_level_past_value()
    grad_output = torch.randn(2, 9, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="level 2 .* exceeds value's S="):
        cuda_op(*inputs, 64)
    with pytest.raises(ValueError, match="level 2 .* exceeds value's S="):
        torch.ops.sdo.ms_deform_attn_backward(grad_output, *inputs, 64)
    monkeypatch.setenv("SDO_MSDA_CUDA", "kernel=vector" if setting is None else f"{setting},kernel=vector")
    assert cuda_op(*inputs, 64).shape == (2, 9, 16)


def test_cuda_levels_outside_value_are_empty(cuda_op, vector_kernel):
    # The vector kernels do not read the level table on the host: a level that does not fit in value
    # contributes nothing (the CPU and the channel kernel raise ValueError instead).
    (value, shapes, bad_starts, loc, attn), starts = _inputs_with_a_level_past_value()
    grad_output = torch.randn(2, 9, 16, dtype=torch.float64, device=DEVICE)
    out, grads = forward_and_grads(cuda_op, [value, shapes, bad_starts, loc, attn], grad_output)
    attn_without = attn.clone()
    attn_without[:, :, :, 2] = 0
    out_ref, grads_ref = forward_and_grads(ms_deform_attn_reference, [value, shapes, starts, loc, attn_without],
                                           grad_output)
    assert _max_rel(out, out_ref) <= 1e-10
    assert _max_rel(grads[0], grads_ref[0]) <= 1e-10
    assert torch.count_nonzero(grads[1][:, :, :, 2]) == 0 and torch.count_nonzero(grads[2][:, :, :, 2]) == 0
    assert _max_rel(grads[2][:, :, :, :2], grads_ref[2][:, :, :, :2]) <= 1e-10


def test_cuda_64bit_index_path(cuda_op, vector_kernel):
    # 60M items (batch * queries * heads): past the 32-bit limit of the fast path, so the 64-bit
    # instance runs; three chunks of 20M queries run the 32-bit one. float64 keeps the grad_value sums
    # exact enough to compare.
    len_q, chunks = 60_000_000, 3
    value, shapes, starts, _, _ = make_inputs(batch=1, n_heads=1, head_dim=4, shapes=((8, 8),), len_q=1, n_points=1,
                                              dtype=torch.float64, seed=19, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(19)
    loc = torch.rand(1, len_q, 1, 1, 1, 2, dtype=torch.float64, device=DEVICE, generator=g) * 1.2 - 0.1
    attn = torch.rand(1, len_q, 1, 1, 1, dtype=torch.float64, device=DEVICE, generator=g)
    grad_output = torch.randn(1, len_q, 4, dtype=torch.float64, device=DEVICE, generator=g)
    out = cuda_op(value, shapes, starts, loc, attn, 64)
    grad_value, grad_loc, grad_attn = torch.ops.sdo.ms_deform_attn_backward(grad_output, value, shapes, starts, loc,
                                                                            attn, 64)
    grad_value_sum = torch.zeros_like(value)
    step = len_q // chunks
    for first in range(0, len_q, step):
        part = slice(first, first + step)
        out_part = cuda_op(value, shapes, starts, loc[:, part], attn[:, part], 64)
        gv, gl, ga = torch.ops.sdo.ms_deform_attn_backward(grad_output[:, part], value, shapes, starts, loc[:, part],
                                                           attn[:, part], 64)
        assert torch.equal(out_part, out[:, part])
        assert torch.equal(gl, grad_loc[:, part]) and torch.equal(ga, grad_attn[:, part])
        grad_value_sum += gv
    assert _max_rel(grad_value, grad_value_sum) <= 1e-10


def test_cuda_graph_capture(cuda_op, vector_kernel):
    # No host synchronisation inside the vector kernels' op: forward and backward can be captured and
    # replayed (the channel kernel copies the level table to the host: not capturable).
    inputs = make_inputs(batch=2, n_heads=4, head_dim=32, shapes=((10, 12), (5, 6)), len_q=40, n_points=4,
                         spread=0.1, dtype=torch.float32, seed=23, device=DEVICE)
    value, shapes, starts, loc, attn = inputs
    grad_output = torch.randn(2, 40, 128, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graphs asks
        cuda_op(value, shapes, starts, loc, attn, 64)
        torch.ops.sdo.ms_deform_attn_backward(grad_output, value, shapes, starts, loc, attn, 64)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_op(value, shapes, starts, loc, attn, 64)
        grads = torch.ops.sdo.ms_deform_attn_backward(grad_output, value, shapes, starts, loc, attn, 64)
    fresh = make_inputs(batch=2, n_heads=4, head_dim=32, shapes=((10, 12), (5, 6)), len_q=40, n_points=4,
                        spread=0.1, dtype=torch.float32, seed=29, device=DEVICE)
    for target, source in zip((value, loc, attn), (fresh[0], fresh[3], fresh[4])):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    out_ref = cuda_op(value, shapes, starts, loc, attn, 64)
    grads_ref = torch.ops.sdo.ms_deform_attn_backward(grad_output, value, shapes, starts, loc, attn, 64)
    assert torch.equal(out, out_ref)
    assert _max_rel(grads[0], grads_ref[0]) <= 1e-6
    assert torch.equal(grads[1], grads_ref[1]) and torch.equal(grads[2], grads_ref[2])


@pytest.mark.parametrize("head_dim", [3, 4])  # scalar path; vector path (2 doubles, 2 lanes per item)
def test_cuda_gradcheck_float64(cuda_op, kernel, head_dim):
    value, shapes, starts, loc, attn = make_inputs(batch=1, n_heads=2, head_dim=head_dim, shapes=((4, 5), (2, 3)),
                                                   len_q=3, n_points=2, spread=0.2, seed=5, device=DEVICE,
                                                   requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, l, a: cuda_op(v, shapes, starts, l, a, 64), (value, loc, attn),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("culprit", ["value", "sampling_loc", "attn_weight", "spatial_shapes"])
def test_cuda_bad_input_raises_value_error_naming_it(cuda_op, kernel, culprit):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32, device=DEVICE)
    bad = {"value": (value[0], shapes, starts, loc, attn),
           "sampling_loc": (value, shapes, starts, loc[..., :1], attn),
           "attn_weight": (value, shapes, starts, loc, attn[:, :-1]),
           "spatial_shapes": (value, shapes[:1], starts, loc, attn)}[culprit]
    with pytest.raises(ValueError, match=culprit):
        cuda_op(*bad, 64)
