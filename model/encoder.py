"""Deformable encoder with optional token sparsification (Sparse DETR).

Dense (Deformable DETR): every token is a query and every layer updates the whole map.
Sparse: only the selected tokens are queries; they attend to the whole current map (values) and
their outputs are scattered back, so unselected tokens keep their backbone features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.deformable_attention import MSDeformAttn
from model.layers import clones


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (queries may be a subset of the map) + FFN, post-norm.

    forward(query [B, Q, C], pos [B, Q, C], reference_points [B, Q, L, 2], src [B, S, C],
            spatial_shapes [L, 2], level_start_index [L], padding_mask [B, S])
        -> (query [B, Q, C], sampling_locations [B, Q, n_heads, L, P, 2], attn_weights [B, Q, n_heads, L, P])
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, im2col_step: int = 64):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, im2col_step)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query, pos, reference_points, src, spatial_shapes, level_start_index, padding_mask=None,
                spatial_shape_list=None):
        attended, sampling_locations, attn_weights = self.self_attn(
            query + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, spatial_shape_list)
        query = self.norm1(query + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(query))))
        query = self.norm2(query + self.dropout3(ffn))
        return query, sampling_locations, attn_weights


def encoder_reference_points(spatial_shapes: list[tuple], valid_ratios, device):
    """Token centres as reference points, one per level, in coordinates of the padded map.

    Centres are normalised by the valid extent of their own level and re-scaled by each level's
    valid ratio, so the same image point is referenced on every level (Deformable DETR).

    spatial_shapes: [(H_l, W_l)] * L; valid_ratios [B, L, 2] (w, h) -> [B, S, L, 2] (x, y)
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        # arange + 0.5 is linspace(0.5, size - 0.5, size) exactly, and keeps sizes symbolic in exported graphs
        ref_y, ref_x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=device) + 0.5,
            torch.arange(width, dtype=torch.float32, device=device) + 0.5, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


def _gather_tokens(x, index):
    """x [B, S, ...], index [B, K] -> [B, K, ...]"""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


class DeformableEncoder(nn.Module):
    """A stack of encoder layers; sparse when `topk_inds` is given.

    `class_embed` / `bbox_embed` are set by the detector to its encoder auxiliary heads (aliases of
    the detector's lists, as official, so the state dict carries `transformer.encoder.class_embed.*`).

    forward(src [B, S, C], spatial_shapes [L, 2], spatial_shape_list [(H_l, W_l)] * L, level_start_index [L],
            valid_ratios [B, L, 2], pos [B, S, C], padding_mask [B, S],
            topk_inds [B, K] or None, sparse_token_nums [B] or None, output_proposals [B, S, 4] or None)
        -> dict(memory [B, S, C],
                aux_logits: list (num_layers-1) of [B, K, num_classes]  (when aux heads are set),
                aux_boxes: list (num_layers-1) of [B, K, 4] sigmoid cxcywh)
    """

    def __init__(self, encoder_layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.class_embed: nn.ModuleList | None = None
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, src, spatial_shapes, spatial_shape_list, level_start_index, valid_ratios, pos,
                padding_mask, topk_inds=None, sparse_token_nums=None, output_proposals=None):
        aux_heads = self.class_embed is not None
        if aux_heads and output_proposals is None:
            raise ValueError("DeformableEncoder: auxiliary heads need output_proposals")
        output = src
        reference_points = encoder_reference_points(spatial_shape_list, valid_ratios, src.device)
        sparse = topk_inds is not None
        if sparse:
            reference_points = _gather_tokens(reference_points, topk_inds)
            query = _gather_tokens(output, topk_inds)
            pos = _gather_tokens(pos, topk_inds)
            if output_proposals is not None:
                output_proposals = _gather_tokens(output_proposals, topk_inds)
            # images selecting fewer than K tokens run the surplus queries but never write them back
            keep = torch.arange(topk_inds.shape[1], device=src.device)[None] < sparse_token_nums[:, None]
            scatter_index = topk_inds[..., None].expand(-1, -1, src.shape[-1])
        else:
            query = output

        aux_logits, aux_boxes = [], []
        for layer_id, layer in enumerate(self.layers):
            query, _, _ = layer(query, pos, reference_points, output, spatial_shapes, level_start_index, padding_mask,
                                spatial_shape_list)
            if sparse:
                # surplus queries write their own old value back, so the scatter has no duplicates to resolve
                written = torch.where(keep[..., None], query, torch.gather(output, 1, scatter_index))
                output = output.scatter(1, scatter_index, written)
            else:
                output = query
            if aux_heads and layer_id < self.num_layers - 1:
                aux_logits.append(self.class_embed[layer_id](query))
                aux_boxes.append((output_proposals + self.bbox_embed[layer_id](query)).sigmoid())
        return {"memory": output, "aux_logits": aux_logits, "aux_boxes": aux_boxes}
