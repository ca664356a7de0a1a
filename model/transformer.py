"""Sparse DETR transformer: scoring network, (sparse) deformable encoder, two-stage queries, decoder.

With rho = 0 this is the two-stage Deformable DETR transformer; with rho > 0 the scoring network
(`enc_mask_predictor`) ranks the backbone tokens and the encoder refines only the top
int(valid_tokens * rho) + 1 of each image.

Differences from the official code, all confined to padded batches (an unpadded image gives the
same numbers): the scoring network's global half averages valid tokens only, padding tokens get
the dtype's minimum score (never selected), and two-stage query selection never picks padding.
They make an image's outputs independent of the padding its batch adds, from the projected
features on.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.decoder import DeformableDecoder, DeformableDecoderLayer
from model.deformable_attention import MSDeformAttn
from model.encoder import DeformableEncoder, DeformableEncoderLayer
from model.mask_predictor import MaskPredictor


def valid_ratio(mask):
    """mask [B, H, W] (True = padding) -> [B, 2] (valid width / W, valid height / H)"""
    _, height, width = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def proposal_pos_embed(proposals, num_pos_feats: int):
    """Sine embedding of (unsigmoided) boxes: [B, K, 4] -> [B, K, 4 * num_pos_feats]"""
    temperature, scale = 10000, 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid() * scale
    pos = pos[:, :, :, None] / dim_t
    pos = torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4)
    return pos.flatten(2)


class DeformableTransformer(nn.Module):
    """forward(srcs: list L of [B, C, H_l, W_l], masks: list L of [B, H_l, W_l], pos_embeds: list L of
    [B, C, H_l, W_l], query_embed [num_queries, 2C] (only without two_stage)) -> dict:

    - hs [n_dec, B, Q, C]; init_reference [B, Q, 2 or 4]; references list n_dec of [B, Q, 2 or 4]
      (the input reference of every decoder layer, normalised to the valid image)
    - enc_outputs_class [B, S, num_classes], enc_outputs_coord_unact [B, S, 4]   (two_stage)
    - backbone_mask_prediction [B, S], sparse_token_nums [B], backbone_topk_proposals [B, K]   (rho > 0),
      K = min(int(S * rho) + 1, S): the most tokens an image of S tokens keeps (an image's picks past its
      own sparse_token_nums are surplus: the encoder runs them but never writes them back)
    - enc_aux_logits / enc_aux_boxes: lists (n_enc - 1) of [B, K, num_classes] / [B, K, 4]   (use_enc_aux_loss)
    - sampling_locations_dec [B, n_dec, Q, n_heads, L, P, 2], attn_weights_dec [B, n_dec, Q, n_heads, L, P]
    - mask_flatten [B, S], spatial_shapes [L, 2], level_start_index [L], valid_ratios [B, L, 2]
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = True, two_stage_num_proposals: int = 300, rho: float = 0.0,
                 use_enc_aux_loss: bool = False, eff_query_init: bool = False, eff_specific_head: bool = False,
                 im2col_step: int = 64):
        super().__init__()
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"model.rho: {rho} must be in [0, 1)")
        if (rho > 0 or use_enc_aux_loss or eff_query_init) and not two_stage:
            raise ValueError("model.rho / model.use_enc_aux_loss / model.eff_query_init need model.two_stage=true")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.rho = rho
        self.use_enc_aux_loss = use_enc_aux_loss
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head

        # registration order follows the official module so that state-dict keys come out in its order
        self.enc_mask_predictor = MaskPredictor(d_model, d_model) if rho > 0 else None
        encoder_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                               enc_n_points, im2col_step)
        self.encoder = DeformableEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                               dec_n_points, im2col_step)
        self.decoder = DeformableDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            pos_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, pos_dim)
            self.pos_trans_norm = nn.LayerNorm(pos_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def encoder_output_proposals(self, memory, padding_mask, spatial_shape_list, process_output: bool = True):
        """One proposal box per token: its centre (relative to the valid image) and size 0.05 * 2^level.

        memory [B, S, C], padding_mask [B, S] -> (projected memory [B, S, C] (or memory unchanged),
        proposals [B, S, 4] unsigmoided cxcywh; +inf for padding and for centres within 1% of the border)
        """
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (height, width) in enumerate(spatial_shape_list):
            mask = padding_mask[:, start:start + height * width].view(batch, height, width)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            # arange is linspace(0, size - 1, size) exactly, and keeps sizes symbolic in exported graphs
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=memory.device),
                torch.arange(width, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))

        output_memory = memory
        if process_output:
            output_memory = output_memory.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            output_memory = output_memory.masked_fill(~valid, 0.0)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required without two_stage")
        src_flatten, mask_flatten, lvl_pos_flatten, spatial_shape_list = [], [], [], []
        for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shape_list.append((src.shape[2], src.shape[3]))
            # [B, C, H, W] -> [B, HW, C]: a view in both memory formats (flatten(2) copies a channels_last map)
            src_flatten.append(src.permute(0, 2, 3, 1).flatten(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_flatten = torch.cat(lvl_pos_flatten, 1)
        if torch.compiler.is_exporting():
            # a tensor made from a list of symbolic sizes would pin them to the example input's values
            spatial_shapes = torch.stack([torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=src_flatten.device)
                                                       for size in shape]) for shape in spatial_shape_list])
        else:
            # built on the host, copied without waiting: a blocking copy would wait for the device
            spatial_shapes = torch.as_tensor(spatial_shape_list, dtype=torch.long).to(src_flatten.device,
                                                                                      non_blocking=True)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        batch, num_tokens, channels = src_flatten.shape
        out = {"mask_flatten": mask_flatten, "spatial_shapes": spatial_shapes,
               "level_start_index": level_start_index, "valid_ratios": valid_ratios}

        # scoring network on the projected backbone tokens; keep the top tokens of each image
        topk_inds = sparse_token_nums = backbone_proposals = None
        if self.rho > 0 or self.use_enc_aux_loss:
            backbone_memory, backbone_proposals = self.encoder_output_proposals(
                src_flatten + lvl_pos_flatten, mask_flatten, spatial_shape_list, process_output=self.rho > 0)
        if self.rho > 0:
            valid_token_nums = (~mask_flatten).sum(-1)
            # float64 so that int(valid * rho) matches Python's arithmetic exactly (float32 may round 9.0 to 8.99)
            sparse_token_nums = torch.minimum((valid_token_nums.double() * self.rho).long() + 1, valid_token_nums)
            # the encoder runs the most tokens an image of this size can keep, a number the shapes tell: the
            # batch's own most, max(sparse_token_nums), is a value on the device, and reading it here would
            # stall the forward; the picks past it are surplus (never written back) and SparseDETR cuts them
            if torch.compiler.is_exporting():  # sizes stay symbolic in exported graphs
                num_selected = torch.sym_min(torch.sym_int(num_tokens * self.rho) + 1, num_tokens)
            else:
                num_selected = min(int(num_tokens * self.rho) + 1, num_tokens)
            mask_prediction = self.enc_mask_predictor(backbone_memory, mask_flatten).squeeze(-1)
            # padding scores below every real token, so an image's first sparse_token_nums picks are valid
            mask_prediction = mask_prediction.masked_fill(mask_flatten, torch.finfo(mask_prediction.dtype).min)
            topk_inds = torch.topk(mask_prediction, num_selected, dim=1)[1]
            out.update(backbone_mask_prediction=mask_prediction, sparse_token_nums=sparse_token_nums,
                       backbone_topk_proposals=topk_inds)

        encoded = self.encoder(src_flatten, spatial_shapes, spatial_shape_list, level_start_index, valid_ratios,
                               lvl_pos_flatten, mask_flatten, topk_inds=topk_inds,
                               sparse_token_nums=sparse_token_nums,
                               output_proposals=backbone_proposals if self.use_enc_aux_loss else None)
        memory = encoded["memory"]
        if self.use_enc_aux_loss:
            out.update(enc_aux_logits=encoded["aux_logits"], enc_aux_boxes=encoded["aux_boxes"])

        if self.two_stage:
            output_memory, output_proposals = self.encoder_output_proposals(memory, mask_flatten, spatial_shape_list)
            # the heads after the decoder's own (index n_dec) score and regress the encoder proposals
            head = self.decoder.num_layers
            enc_outputs_class = self.decoder.class_embed[head](output_memory)
            enc_outputs_coord_unact = output_proposals + self.decoder.bbox_embed[head](output_memory)
            out.update(enc_outputs_class=enc_outputs_class, enc_outputs_coord_unact=enc_outputs_coord_unact)

            if self.eff_specific_head:
                objectness = enc_outputs_class.max(dim=2).values
            else:
                objectness = enc_outputs_class[..., 0]
            # never propose padding: the official code may, which makes results depend on batch padding
            objectness = objectness.masked_fill(mask_flatten, float("-inf"))
            num_queries = min(self.two_stage_num_proposals, num_tokens)
            topk_proposals = torch.topk(objectness, num_queries, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1,
                                             topk_proposals.unsqueeze(-1).expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(topk_coords_unact, channels // 2)))
            if self.eff_query_init:
                # Efficient DETR: queries start from the selected encoder tokens themselves
                tgt = torch.gather(memory, 1, topk_proposals.unsqueeze(-1).expand(-1, -1, channels))
                query_pos = pos_trans_out
            else:
                query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        decoded = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                               query_pos, mask_flatten, spatial_shape_list)
        out.update(hs=decoded["hs"], init_reference=reference_points, references=decoded["references"],
                   sampling_locations_dec=decoded["sampling_locations"], attn_weights_dec=decoded["attn_weights"])
        return out
