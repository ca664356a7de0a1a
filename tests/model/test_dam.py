import math

import pytest
import torch

from model.dam import attn_map_to_flat_grid, dam_recall, dam_target

SHAPES = torch.tensor([[4, 5], [2, 3]])
START = torch.tensor([0, 20])


def naive_flat_grid(shapes, starts, locations, weights):
    """Per sampling point: bilinear weights on the four neighbouring tokens (x * W, no half-pixel shift)."""
    batch, layers, queries, heads, levels, points, _ = locations.shape
    grid = torch.zeros(batch, int((shapes[:, 0] * shapes[:, 1]).sum()), dtype=torch.float64)
    for b in range(batch):
        for i in range(layers):
            for q in range(queries):
                for m in range(heads):
                    for lvl in range(levels):
                        h, w = shapes[lvl].tolist()
                        for p in range(points):
                            x = float(locations[b, i, q, m, lvl, p, 0]) * w
                            y = float(locations[b, i, q, m, lvl, p, 1]) * h
                            x0, y0 = math.floor(x), math.floor(y)
                            for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                                if 0 <= cx < w and 0 <= cy < h:
                                    share = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                    grid[b, int(starts[lvl]) + cy * w + cx] += share * float(weights[b, i, q, m, lvl, p])
    return grid


def random_attention(seed, batch=2, layers=2, queries=3, heads=2, points=2):
    g = torch.Generator().manual_seed(seed)
    # some points fall outside [0, 1] to exercise the border
    locations = torch.rand(batch, layers, queries, heads, 2, points, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(batch, layers, queries, heads, 2, points, generator=g)
    return locations, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_grid_equals_naive_loop(seed):
    locations, weights = random_attention(seed)
    fast = attn_map_to_flat_grid(SHAPES, START, locations, weights)
    assert fast.shape == (2, 26)
    assert torch.allclose(fast.double(), naive_flat_grid(SHAPES, START, locations, weights), atol=1e-5)


def test_point_on_a_token_lands_on_that_token():
    locations = torch.zeros(1, 1, 1, 1, 2, 1, 2)
    locations[..., 1, 0, :] = torch.tensor([2 / 3, 1 / 2])  # level 1 (2x3): column 2, row 1
    locations[..., 0, 0, :] = torch.tensor([0.2, 0.25])      # level 0 (4x5): column 1, row 1
    weights = torch.tensor([0.7, 0.3]).reshape(1, 1, 1, 1, 2, 1)
    grid = attn_map_to_flat_grid(SHAPES, START, locations, weights)[0]
    expected = torch.zeros(26)
    expected[1 * 5 + 1] = 0.7
    expected[20 + 1 * 3 + 2] = 0.3
    assert torch.allclose(grid, expected, atol=1e-6)


def test_dam_target_selects_top_tokens_per_image_and_never_padding():
    locations, weights = random_attention(3, queries=6)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, 15:20] = True
    mask[1, 24:] = True
    nums = torch.tensor([5, 3])
    outputs = {"sampling_locations_dec": locations, "attn_weights_dec": weights, "spatial_shapes": SHAPES,
               "level_start_index": START, "sparse_token_nums": nums, "mask_flatten": mask}
    target = dam_target(outputs)
    attn = naive_flat_grid(SHAPES, START, locations, weights)
    assert target.dtype == torch.float32 and set(target.unique().tolist()) <= {0.0, 1.0}
    for b in range(2):
        chosen = target[b].bool()
        assert int(chosen.sum()) == int(nums[b])
        assert not (chosen & mask[b]).any()
        valid_rest = ~chosen & ~mask[b]
        assert attn[b][chosen].min() >= attn[b][valid_rest].max() - 1e-6


def test_dam_target_names_missing_key():
    with pytest.raises(KeyError, match="sparse_token_nums"):
        dam_target({"sampling_locations_dec": 0, "attn_weights_dec": 0, "spatial_shapes": 0, "level_start_index": 0})


def test_dam_recall_of_a_hand_made_selection():
    # image 0 selects 3 tokens, 2 of them in its 3-token target; image 1 selects 2 (+ 1 surplus pick that
    # is in the target but must not count), 1 of its 2 target tokens
    target = torch.zeros(2, 10)
    target[0, [1, 4, 7]] = 1
    target[1, [2, 5]] = 1
    outputs = {"backbone_topk_proposals": torch.tensor([[4, 7, 0], [5, 9, 2]]),
               "sparse_token_nums": torch.tensor([3, 2])}
    assert torch.allclose(dam_recall(outputs, target), torch.tensor([2 / 3, 1 / 2]))


def test_dam_recall_of_a_real_forward_equals_a_set_reference():
    from tiny_model import model_cfg

    from model.build import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg(rho=0.3)).eval()
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 96:] = True
    with torch.no_grad():
        outputs = model(images, mask)
    recall = dam_recall(outputs)
    # reference: the selection re-derived from the scores as a set; the target is a top-num set of the
    # naive attention splat (an untrained decoder leaves many tokens tied at 0, so any top set is valid)
    target = dam_target(outputs)
    shapes, starts = outputs["spatial_shapes"], outputs["level_start_index"]
    attn = naive_flat_grid(shapes, starts, outputs["sampling_locations_dec"], outputs["attn_weights_dec"])
    for b in range(2):
        valid = (~outputs["mask_flatten"][b]).nonzero().flatten().tolist()
        num = int(outputs["sparse_token_nums"][b])
        assert num == min(int(len(valid) * 0.3) + 1, len(valid))
        scores = outputs["backbone_mask_prediction"][b]
        selected = set(sorted(valid, key=lambda i: -float(scores[i]))[:num])
        targeted = set(target[b].nonzero().flatten().tolist())
        rest = set(valid) - targeted
        assert len(targeted) == num and targeted <= set(valid)
        assert min(float(attn[b, i]) for i in targeted) >= max(float(attn[b, i]) for i in rest) - 1e-6
        assert float(recall[b]) == pytest.approx(len(selected & targeted) / num, abs=1e-6)
    assert 0.0 < float(recall.mean()) < 1.0  # an untrained scoring network: some overlap, not all


def test_dam_recall_names_missing_selection():
    with pytest.raises(KeyError, match="backbone_topk_proposals"):
        dam_recall({}, torch.zeros(1, 4))
