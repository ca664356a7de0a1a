"""Decoder cross-Attention Map (DAM): where the decoder looks, as a target for the scoring network,
and how much of it the scoring network selects (`dam_recall`).

Every decoder sampling point spreads its attention weight bilinearly onto the four encoder tokens
around it; summing over decoder layers and heads gives one saliency value per token. The top
`sparse_token_nums` tokens of each image become the binary target of the scoring network (paper §3.2).
"""
import torch
from torch import Tensor


def attn_map_to_flat_grid(spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor, num_tokens: int | None = None) -> Tensor:
    """Splat attention weights onto the flattened multi-level token grid.

    spatial_shapes [L, 2] (H_l, W_l); level_start_index [L];
    sampling_locations [B, n_layers, Len_q, n_heads, L, P, 2] normalised (x, y) in [0, 1];
    attention_weights [B, n_layers, Len_q, n_heads, L, P]
    num_tokens: S = sum_l H_l * W_l when the caller knows it (else read from spatial_shapes: a device sync)
    -> [B, S] float32, summed over layers, queries, heads and points.

    As the official util/dam.py, a location x maps to column x * W_l (no half-pixel shift) and
    corners that fall outside the level contribute nothing.
    """
    batch, n_levels = sampling_locations.shape[0], sampling_locations.shape[-3]
    if spatial_shapes.shape != (n_levels, 2):
        raise ValueError(f"attn_map_to_flat_grid: spatial_shapes {tuple(spatial_shapes.shape)} does not match "
                         f"{n_levels} levels of sampling_locations {tuple(sampling_locations.shape)}")
    spatial_shapes = spatial_shapes.to(sampling_locations.device)
    level_start_index = level_start_index.to(sampling_locations.device)
    # [B, N, L, 2] and [B, N, L] with N = every (layer, query, head, point)
    locations = sampling_locations.float().transpose(-2, -3).reshape(batch, -1, n_levels, 2)
    weights = attention_weights.float().transpose(-1, -2).reshape(batch, -1, n_levels)

    height, width = spatial_shapes.unbind(-1)  # [L] each, broadcast over [B, N, L]
    col_row = locations * spatial_shapes.flip(-1)  # (x * W_l, y * H_l)
    col_row_low = col_row.floor()
    frac = col_row - col_row_low  # [B, N, L, 2]
    col_low, row_low = col_row_low.long().unbind(-1)

    if num_tokens is None:
        num_tokens = int((height * width).sum())
    flat_grid = torch.zeros(batch, num_tokens, dtype=torch.float32, device=weights.device)
    for dx in (0, 1):
        for dy in (0, 1):
            col, row = col_low + dx if dx else col_low, row_low + dy if dy else row_low
            bilinear = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            index = torch.where(inside, row * width + col + level_start_index, 0)
            flat_grid.scatter_add_(1, index.flatten(1), (weights * bilinear * inside).flatten(1))
    return flat_grid


@torch.no_grad()
def dam_target(outputs: dict) -> Tensor:
    """Binary DAM target [B, S]: 1 on the `sparse_token_nums[b]` tokens of image b the decoder attends most.

    outputs needs 'sampling_locations_dec', 'attn_weights_dec', 'spatial_shapes', 'level_start_index',
    'sparse_token_nums' [B] and optionally 'mask_flatten' [B, S] (True = padding, never selected).
    """
    for key in ("sampling_locations_dec", "attn_weights_dec", "spatial_shapes", "level_start_index", "sparse_token_nums"):
        if key not in outputs:
            raise KeyError(f"dam_target: model outputs lack {key!r} (is rho > 0?)")
    num_tokens = outputs["mask_flatten"].shape[1] if "mask_flatten" in outputs else None
    attn_map = attn_map_to_flat_grid(outputs["spatial_shapes"], outputs["level_start_index"],
                                     outputs["sampling_locations_dec"], outputs["attn_weights_dec"], num_tokens)
    if "mask_flatten" in outputs:
        # below every real token, so padding is never in the top-k of valid tokens
        attn_map = attn_map.masked_fill(outputs["mask_flatten"], float("-inf"))
    sparse_token_nums = outputs["sparse_token_nums"].to(attn_map.device)
    # the model's selection has max(sparse_token_nums) columns: its shape says it without asking the device
    topk = outputs.get("backbone_topk_proposals")
    num_topk = topk.shape[1] if topk is not None else int(sparse_token_nums.max())
    topk_index = attn_map.topk(num_topk, dim=1).indices  # [B, k]
    keep = torch.arange(num_topk, device=attn_map.device)[None] < sparse_token_nums[:, None]
    target = torch.zeros_like(attn_map)
    target.scatter_(1, topk_index, keep.float())
    return target


@torch.no_grad()
def dam_recall(outputs: dict, target: Tensor | None = None) -> Tensor:
    """How much of the DAM target the scoring network selects: per image, the fraction of its DAM-target
    tokens that are among its `sparse_token_nums[b]` selected tokens (the ones the sparse encoder
    updates) -> [B] float32 in [0, 1].

    outputs as for `dam_target`, plus 'backbone_topk_proposals' [B, K] (an image's picks past its own
    sparse_token_nums are surplus and do not count); target [B, S] in {0, 1}, `dam_target(outputs)`
    when None. Selection and target have the same size, so this recall is also the selection's precision.
    """
    if "backbone_topk_proposals" not in outputs:
        raise KeyError("dam_recall: model outputs lack 'backbone_topk_proposals' (is rho > 0?)")
    if target is None:
        target = dam_target(outputs)
    topk = outputs["backbone_topk_proposals"].to(target.device)
    sparse_token_nums = outputs["sparse_token_nums"].to(target.device)
    own = torch.arange(topk.shape[1], device=target.device)[None] < sparse_token_nums[:, None]
    hits = (target.float().gather(1, topk) * own).sum(1)
    return hits / target.float().sum(1).clamp(min=1)
