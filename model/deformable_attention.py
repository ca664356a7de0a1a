"""Multi-scale deformable attention module (Deformable DETR), parameters and init as official."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.ms_deform_attn import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled locations per head and level around its reference point.

    forward(query [B, Len_q, C], reference_points [B, Len_q, L, 2] (x, y) or [B, Len_q, L, 4] (cx, cy, w, h)
            normalised to the padded map, input_flatten [B, S, C], spatial_shapes [L, 2] (H_l, W_l),
            level_start_index [L], input_padding_mask [B, S] bool (True = padding) or None,
            spatial_shape_list [(H_l, W_l)] * L or None: spatial_shapes as ints, when the caller has them)
        -> output [B, Len_q, C],
           sampling_locations [B, Len_q, n_heads, L, n_points, 2] in [0, 1] coords of the padded map,
           attention_weights [B, Len_q, n_heads, L, n_points] (softmax over L * n_points)
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 im2col_step: int = 64):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}")
        self.im2col_step = im2col_step
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # offsets start as a fixed star: head h points in direction 2*pi*h/n_heads, point i at distance i+1
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
        grid_init = grid_init.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, spatial_shapes, level_start_index,
                input_padding_mask=None, spatial_shape_list=None):
        batch, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # padded tokens contribute zeros, exactly like grid_sample's zero padding outside the image
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, len_in, self.n_heads, self.d_model // self.n_heads)

        sampling_offsets = self.sampling_offsets(query).view(
            batch, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(
            batch, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(
            batch, len_q, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + sampling_offsets / offset_normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box: at most half its size
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4 coordinates, "
                             f"got shape {tuple(reference_points.shape)}")

        output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights, self.im2col_step, spatial_shape_list)
        return self.output_proj(output), sampling_locations, attention_weights
