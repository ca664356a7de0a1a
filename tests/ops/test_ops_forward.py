"""Forward of the native op against the reference, and the reference against a naive loop."""
import math

import pytest
import torch
from ops_inputs import make_inputs

from model.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_loc, attn_weight):
    """Bilinear sampling written out point by point (zero outside, pixel centres at +0.5)."""
    batch, _, n_heads, head_dim = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_loc.shape
    out = torch.zeros(batch, len_q, n_heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(len_q):
            for h in range(n_heads):
                for level in range(n_levels):
                    height, width = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(n_points):
                        x = float(sampling_loc[b, q, h, level, p, 0]) * width - 0.5
                        y = float(sampling_loc[b, q, h, level, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < height and 0 <= xx < width:
                                    token = start + yy * width + xx
                                    out[b, q, h] += attn_weight[b, q, h, level, p] * wy * wx * value[b, token, h]
    return out.flatten(2)


def test_reference_matches_naive_loop():
    inputs = make_inputs(batch=2, n_heads=2, head_dim=3, shapes=((3, 5), (2, 2), (1, 1)), len_q=4,
                         n_points=3, spread=0.3, seed=1)
    expected = naive_ms_deform_attn(*inputs)
    assert torch.allclose(ms_deform_attn_reference(*inputs, 64), expected, atol=1e-12)


CASES = {
    # name: (batch, n_heads, head_dim, level shapes, len_q, n_points, spread, padded)
    "one_level": (1, 1, 8, ((7, 5),), 9, 1, 0.0, False),
    "four_levels_with_1x1": (2, 8, 4, ((12, 17), (6, 9), (3, 5), (1, 1)), 23, 4, 0.0, False),
    "non_square_out_of_range": (3, 2, 16, ((5, 11), (11, 5), (2, 7)), 17, 3, 0.5, False),
    "padded_batch": (2, 4, 8, ((10, 14), (5, 7), (3, 4), (2, 2)), 31, 4, 0.1, True),
    "many_points": (1, 3, 5, ((9, 4), (1, 6)), 7, 8, 0.2, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_forward_matches_reference(native_op, name, dtype):
    batch, n_heads, head_dim, shapes, len_q, n_points, spread, padded = CASES[name]
    inputs = make_inputs(batch=batch, n_heads=n_heads, head_dim=head_dim, shapes=shapes, len_q=len_q,
                         n_points=n_points, spread=spread, padded=padded, dtype=dtype, seed=len(name))
    native = native_op(*inputs, 64)
    reference = ms_deform_attn_reference(*inputs, 64)
    assert native.shape == (batch, len_q, n_heads * head_dim) and native.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert (native - reference).abs().max().item() <= tolerance


def test_points_outside_every_level_give_zero(native_op):
    value, shapes, starts, loc, attn = make_inputs(shapes=((4, 4), (2, 3)), dtype=torch.float32)
    far = torch.where(loc > 0.5, loc + 2.0, loc - 2.0)
    assert torch.count_nonzero(native_op(value, shapes, starts, far, attn, 64)) == 0


def test_non_contiguous_inputs(native_op):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32, len_q=6, seed=3)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_t = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_t.is_contiguous() and not loc_t.is_contiguous()
    expected = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    assert torch.allclose(native_op(value_t, shapes, starts, loc_t, attn, 64), expected, atol=1e-5)


def test_bfloat16_within_tolerance(native_op):
    value, shapes, starts, loc, attn = make_inputs(batch=2, n_heads=4, head_dim=8,
                                                   shapes=((8, 10), (4, 5), (2, 3), (1, 1)),
                                                   len_q=12, n_points=4, spread=0.1, dtype=torch.float32)
    value_bf16 = value.bfloat16()
    out = native_op(value_bf16, shapes, starts, loc, attn, 64)
    assert out.dtype == torch.bfloat16
    # Same rounded values in float32: what is left is bf16 rounding of the output (~2^-8 relative).
    expected = ms_deform_attn_reference(value_bf16.float(), shapes, starts, loc, attn)
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)
    # All-bf16 inputs (locations rounded too) stay close to the float32 result.
    out_all = native_op(value_bf16, shapes, starts, loc.bfloat16(), attn.bfloat16(), 64)
    reference_all = ms_deform_attn_reference(value_bf16.float(), shapes, starts, loc.bfloat16().float(),
                                             attn.bfloat16().float())
    assert torch.allclose(out_all.float(), reference_all, rtol=2e-2, atol=2e-2)


def test_dispatch_uses_native_and_logs_once(native_op, caplog, monkeypatch):
    from model import ms_deform_attn as msda

    monkeypatch.setattr(msda._state, "logged", set())
    inputs = make_inputs(dtype=torch.float32, seed=5)
    with caplog.at_level("INFO", logger="model.ms_deform_attn"):
        first = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == "model.ms_deform_attn"]
    assert messages == ["ms_deform_attn on cpu: native sdo::ms_deform_attn"]
    assert torch.equal(first, native_op(*inputs, 64))


def test_dispatch_falls_back_to_reference(native_op, caplog, monkeypatch):
    from model import ms_deform_attn as msda

    monkeypatch.setattr(msda._state, "devices", frozenset())
    monkeypatch.setattr(msda._state, "logged", set())
    inputs = make_inputs(dtype=torch.float32, seed=6)
    with caplog.at_level("INFO", logger="model.ms_deform_attn"):
        out = ms_deform_attn(*inputs)
    assert not msda.native_available("cpu")
    assert "reference" in caplog.records[-1].getMessage()
    assert torch.equal(out, ms_deform_attn_reference(*inputs))


@pytest.mark.parametrize("culprit", ["value", "sampling_loc", "attn_weight", "spatial_shapes", "level_start_index"])
def test_bad_input_raises_value_error_naming_it(native_op, culprit):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    bad = {"value": (value[0], shapes, starts, loc, attn),
           "sampling_loc": (value, shapes, starts, loc[..., :1], attn),
           "attn_weight": (value, shapes, starts, loc, attn[:, :-1]),
           "spatial_shapes": (value, shapes[:1], starts, loc, attn),
           "level_start_index": (value, shapes, starts + 100, loc, attn)}[culprit]
    with pytest.raises(ValueError, match=culprit if culprit != "level_start_index" else "level 0"):
        native_op(*bad, 64)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("culprit", ["value", "sampling_locations", "attention_weights", "spatial_shapes",
                                     "level_start_index"])
def test_wrapper_checks_ranks_and_sizes_first(native_op, monkeypatch, culprit, native):
    # model.ms_deform_attn checks in Python before the native op or the reference sees the input.
    from model import ms_deform_attn as msda

    if not native:
        monkeypatch.setattr(msda._state, "devices", frozenset())
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    bad = {"value": (value[0], shapes, starts, loc, attn),
           "sampling_locations": (value, shapes, starts, loc[:, :, :1], attn),
           "attention_weights": (value, shapes, starts, loc, attn[..., :1]),
           "spatial_shapes": (value, shapes.float(), starts, loc, attn),
           "level_start_index": (value, shapes, starts[None], loc, attn)}[culprit]
    with pytest.raises(ValueError, match=f"ms_deform_attn: {culprit} must be"):
        ms_deform_attn(*bad)
