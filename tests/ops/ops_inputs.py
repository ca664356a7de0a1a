"""Random inputs of the ms_deform_attn op for the tests in this folder."""
from __future__ import annotations

import torch


def make_inputs(*, batch=2, n_heads=2, head_dim=4, shapes=((4, 6), (2, 3)), len_q=5, n_points=2,
                dtype=torch.float64, seed=0, spread=0.0, padded=False, device="cpu", requires_grad=False):
    """Random op inputs. Shapes: value [B, S, H, D], sampling_loc [B, Q, H, L, P, 2], attn [B, Q, H, L, P].

    spread > 0 draws locations from [-spread, 1 + spread], so some points fall outside the level.
    padded=True zeroes the bottom/right part of every level of the last image, as MSDeformAttn does
    for padding; with uniform locations about 3/4 of its points then sample padding.
    """
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n_levels, total = len(shapes), int(sizes.sum())
    value = torch.randn(batch, total, n_heads, head_dim, generator=g, dtype=dtype)
    loc = torch.rand(batch, len_q, n_heads, n_levels, n_points, 2, generator=g, dtype=dtype)
    loc = loc * (1 + 2 * spread) - spread
    logits = torch.randn(batch, len_q, n_heads, n_levels * n_points, generator=g, dtype=dtype)
    attn = logits.softmax(-1).view(batch, len_q, n_heads, n_levels, n_points)
    if padded:
        for level, (height, width) in enumerate(shapes):
            grid = torch.zeros(height, width, dtype=torch.bool)
            grid[(height + 1) // 2:, :] = True
            grid[:, (width + 1) // 2:] = True
            start = int(level_start_index[level])
            value[-1, start:start + height * width][grid.flatten()] = 0
    tensors = [value, spatial_shapes, level_start_index, loc, attn]
    tensors = [t.to(device) for t in tensors]
    if requires_grad:
        for index in (0, 3, 4):
            tensors[index].requires_grad_(True)
    return tensors


def forward_and_grads(fn, inputs, grad_output):
    """Run ``fn`` (an ms_deform_attn implementation) on fresh leaves of ``inputs`` and backprop ``grad_output``
    -> (output, [grad_value, grad_sampling_loc, grad_attn_weight])."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2], 64)
    out.backward(grad_output)
    return out.detach(), [leaf.grad for leaf in leaves]
