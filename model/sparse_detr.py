"""Sparse DETR detector: backbone -> input projections -> transformer -> detection heads.

Head lists follow the official layout (n = dec_layers, m = enc_layers):
    class_embed / bbox_embed = [dec_0 .. dec_{n-1}, two-stage proposals, enc_0 .. enc_{m-2}]
with the decoder's and encoder's views of the same modules registered under
`transformer.decoder.{class,bbox}_embed` and `transformer.encoder.{class,bbox}_embed`, so official
checkpoints (which carry these alias keys) load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import MLP, clones, inverse_sigmoid
from model.transformer import DeformableTransformer


class SparseDETR(nn.Module):
    """forward(images [B, 3, H, W], mask [B, H, W] bool (True = padding)) -> outputs dict:

    - 'pred_logits' [B, Q, num_classes], 'pred_boxes' [B, Q, 4] sigmoid cxcywh relative to the valid image
    - 'aux_outputs': list (dec_layers - 1) of {'pred_logits', 'pred_boxes'}   (aux_loss)
    - 'enc_outputs': {'pred_logits' [B, S, C], 'pred_boxes' [B, S, 4]}   (two_stage)
    - 'aux_outputs_enc': list (enc_layers - 1) of {'pred_logits' [B, K, C], 'pred_boxes' [B, K, 4]}
      on the selected tokens (all S tokens when rho = 0)   (use_enc_aux_loss)
    - 'backbone_mask_prediction' [B, S] (padding = dtype min), 'sparse_token_nums' [B] int64,
      'backbone_topk_proposals' [B, K] int64, K = max(sparse_token_nums)   (rho > 0); an image's
      entries past its own sparse_token_nums are surplus picks (possibly padding) that the encoder
      runs but never writes back, as official
    - 'mask_flatten' [B, S], 'spatial_shapes' [L, 2], 'level_start_index' [L], 'valid_ratios' [B, L, 2]
    - 'sampling_locations_dec' [B, n_dec, Q, n_heads, L, P, 2], 'attn_weights_dec' [B, n_dec, Q, n_heads, L, P]
      (detached: they only feed the DAM target and pictures)
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = True,
                 two_stage: bool = True, use_enc_aux_loss: bool = False):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        # placeholders fix the registration order (state-dict key order) to the official one
        self.class_embed = nn.ModuleList()
        self.bbox_embed = nn.ModuleList()
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        # C3..C5 (the last ones when fewer levels), then stride-2 3x3 convs for the remaining levels
        num_backbone_outs = min(num_feature_levels, len(backbone.num_channels))
        self.backbone_levels = list(range(len(backbone.num_channels)))[-num_backbone_outs:]
        input_proj = [nn.Sequential(nn.Conv2d(backbone.num_channels[i], hidden_dim, kernel_size=1),
                                    nn.GroupNorm(32, hidden_dim))
                      for i in self.backbone_levels]
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - num_backbone_outs):
            input_proj.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                            nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(input_proj)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.use_enc_aux_loss = use_enc_aux_loss

        # focal-loss prior: every class starts at probability 0.01
        prior_prob = 0.01
        class_embed.bias.data = torch.ones(num_classes) * -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        num_pred = transformer.decoder.num_layers
        if two_stage:
            num_pred += 1
        if use_enc_aux_loss:
            num_pred += transformer.encoder.num_layers - 1
        if with_box_refine or use_enc_aux_loss:
            # independent heads with the same initial values
            self.class_embed = clones(class_embed, num_pred)
            self.bbox_embed = clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])

        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            transformer.decoder.bbox_embed = self.bbox_embed
            for box_embed in transformer.decoder.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)
        elif with_box_refine:
            transformer.decoder.bbox_embed = self.bbox_embed
        if use_enc_aux_loss:
            num_enc_aux = transformer.encoder.num_layers - 1
            transformer.encoder.class_embed = self.class_embed[-num_enc_aux:]
            transformer.encoder.bbox_embed = self.bbox_embed[-num_enc_aux:]
            for box_embed in transformer.encoder.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

    def project_features(self, images, mask):
        """-> (srcs list L of [B, C, H_l, W_l], masks list L of [B, H_l, W_l], pos list L of [B, C, H_l, W_l])"""
        features, pos = self.backbone(images, mask)
        features = [features[i] for i in self.backbone_levels]
        pos = [pos[i] for i in self.backbone_levels]
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, features)]
        masks = [m for _, m in features]
        for level in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[level](features[-1][0] if level == len(features) else srcs[-1])
            level_mask = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))
        return srcs, masks, pos

    def forward(self, images, mask):
        return self.detect(*self.project_features(images, mask))

    def detect(self, srcs, masks, pos):
        """Transformer + heads on projected features (see project_features) -> the outputs dict."""
        query_embed = None if self.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query_embed)

        outputs_classes, outputs_coords = [], []
        for layer_id, hs in enumerate(t["hs"]):
            coord = self.bbox_embed[layer_id](hs)
            reference = inverse_sigmoid(t["references"][layer_id])
            if reference.shape[-1] == 4:
                coord = coord + reference
            else:
                coord = torch.cat([coord[..., :2] + reference, coord[..., 2:]], -1)
            outputs_classes.append(self.class_embed[layer_id](hs))
            outputs_coords.append(coord.sigmoid())

        out = {
            "pred_logits": outputs_classes[-1],
            "pred_boxes": outputs_coords[-1],
            "mask_flatten": t["mask_flatten"],
            "spatial_shapes": t["spatial_shapes"],
            "level_start_index": t["level_start_index"],
            "valid_ratios": t["valid_ratios"],
            "sampling_locations_dec": t["sampling_locations_dec"].detach(),
            "attn_weights_dec": t["attn_weights_dec"].detach(),
        }
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": t["enc_outputs_class"],
                                  "pred_boxes": t["enc_outputs_coord_unact"].sigmoid()}
        num_kept = None
        if "backbone_mask_prediction" in t:
            # the transformer selects the most tokens an image of this size can keep; cut to the batch's most.
            # Reading it from the device here, with the whole forward queued, stalls nothing (mid-forward it
            # would); exported graphs take whole images, which keep exactly that many
            num_kept = None if torch.compiler.is_exporting() else int(t["sparse_token_nums"].max())
            out["backbone_mask_prediction"] = t["backbone_mask_prediction"]
            out["sparse_token_nums"] = t["sparse_token_nums"]
            out["backbone_topk_proposals"] = t["backbone_topk_proposals"][:, :num_kept]
        if self.use_enc_aux_loss:
            out["aux_outputs_enc"] = [{"pred_logits": c[:, :num_kept], "pred_boxes": b[:, :num_kept]}
                                      for c, b in zip(t["enc_aux_logits"], t["enc_aux_boxes"])]
        return out
