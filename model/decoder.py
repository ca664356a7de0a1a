"""Deformable decoder with iterative box refinement (Deformable DETR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.deformable_attention import MSDeformAttn
from model.layers import clones, inverse_sigmoid


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the encoder memory, FFN (post-norm).

    forward(tgt [B, Q, C], query_pos [B, Q, C], reference_points [B, Q, L, 2 or 4], src [B, S, C],
            spatial_shapes [L, 2], level_start_index [L], src_padding_mask [B, S])
        -> (tgt [B, Q, C], sampling_locations [B, Q, n_heads, L, P, 2], attn_weights [B, Q, n_heads, L, P])
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, im2col_step: int = 64):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, im2col_step)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index,
                src_padding_mask=None, spatial_shape_list=None):
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))

        attended, sampling_locations, attn_weights = self.cross_attn(
            tgt + query_pos, reference_points, src, spatial_shapes, level_start_index, src_padding_mask,
            spatial_shape_list)
        tgt = self.norm1(tgt + self.dropout1(attended))

        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(ffn))
        return tgt, sampling_locations, attn_weights


class DeformableDecoder(nn.Module):
    """Decoder layers; with box refinement each layer's box head moves the next layer's reference.

    `bbox_embed` / `class_embed` are set by the detector (aliases of its head lists, as official).

    forward(tgt [B, Q, C], reference_points [B, Q, 2 or 4] normalised to the valid image, src [B, S, C],
            spatial_shapes [L, 2], level_start_index [L], valid_ratios [B, L, 2], query_pos [B, Q, C],
            src_padding_mask [B, S])
        -> dict(hs [n_layers, B, Q, C], references: list (n_layers) of [B, Q, 2 or 4] (each layer's input
                reference; 2 -> 4 coordinates after the first layer when refining point references),
                sampling_locations [B, n_layers, Q, n_heads, L, P, 2], attn_weights [B, n_layers, Q, n_heads, L, P])
    """

    def __init__(self, decoder_layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios,
                query_pos, src_padding_mask=None, spatial_shape_list=None):
        output = tgt
        hs, references, sampling_locations_all, attn_weights_all = [], [], [], []
        for layer_id, layer in enumerate(self.layers):
            references.append(reference_points)
            # references are relative to the valid image; the op wants them relative to each padded level
            if reference_points.shape[-1] == 4:
                reference_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_input = reference_points[:, :, None] * valid_ratios[:, None]
            output, sampling_locations, attn_weights = layer(
                output, query_pos, reference_input, src, spatial_shapes, level_start_index, src_padding_mask,
                spatial_shape_list)
            sampling_locations_all.append(sampling_locations)
            attn_weights_all.append(attn_weights)

            if self.bbox_embed is not None:
                delta = self.bbox_embed[layer_id](output)
                if reference_points.shape[-1] == 4:
                    new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                # refinement is supervised per layer; gradients do not flow through the chain of references
                reference_points = new_reference.detach()
            hs.append(output)
        return {
            "hs": torch.stack(hs),
            "references": references,
            "sampling_locations": torch.stack(sampling_locations_all, dim=1),
            "attn_weights": torch.stack(attn_weights_all, dim=1),
        }
