"""The Sparse DETR network: official state-dict layout, output contract, padding, sparsity, gradients."""
import dataclasses
import types
from pathlib import Path

import pytest
import torch
from tiny_model import model_cfg

from model.build import build_model
from model.encoder import DeformableEncoder, DeformableEncoderLayer
from model.optim import param_groups
from model.position_encoding import PositionEmbeddingSine

REFS = Path(__file__).resolve().parents[2].parent / "shared" / "refs"


SPARSE_R50 = {"rho": 0.1, "use_enc_aux_loss": True, "eff_query_init": True, "eff_specific_head": True}
DEFORMABLE_R50 = {"rho": 0.0, "use_enc_aux_loss": False, "eff_query_init": False, "eff_specific_head": False}


def r50_cfg(**overrides):
    return model_cfg(backbone=types.SimpleNamespace(name="resnet50", weights=None, train=True, dilation=False, width=64),
                     num_classes=91, hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=1024,
                     dropout=0.1, enc_n_points=4, dec_n_points=4, num_queries=300, **overrides)


def read_ref(name):
    lines = (REFS / name).read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:] if not line.startswith("#")]
    trainable = int(lines[-1].split(":")[1])
    return [(key, shape) for key, shape, _, _ in rows], trainable


@pytest.mark.skipif(not REFS.is_dir(), reason="the shared official reference lists are not present")
@pytest.mark.parametrize("ref_name, overrides", [("official_sparse_rho0.1_state_dict.tsv", SPARSE_R50),
                                                 ("official_deformable_topk_bbr_state_dict.tsv", DEFORMABLE_R50)])
def test_state_dict_equals_official(ref_name, overrides):
    expected, expected_trainable = read_ref(ref_name)
    model = build_model(r50_cfg(**overrides))
    got = [(key, str(list(value.shape))) for key, value in model.state_dict().items()]
    assert got == expected  # same keys, same shapes, same order (alias keys included)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_trainable


def test_official_config_matches_the_lead_config_defaults():
    """The R50 namespace above is the orchestrator's ModelConfig with only the sparse switches changed."""
    config = pytest.importorskip("orchestrator.config")
    defaults = dataclasses.asdict(config.ModelConfig())
    ours = vars(r50_cfg(**DEFORMABLE_R50))
    for key, value in defaults.items():
        if key == "backbone":
            assert vars(ours[key]) == value
        else:
            assert ours[key] == value, key


def padded_batch(sizes, pad_to):
    """Random images of the given (h, w) sizes, zero-padded to pad_to, with the padding mask."""
    images = torch.zeros(len(sizes), 3, *pad_to)
    mask = torch.ones(len(sizes), *pad_to, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        mask[i, :h, :w] = False
    return images, mask


def test_outputs_follow_the_contract_on_a_padded_batch():
    torch.manual_seed(0)
    cfg = model_cfg()
    model = build_model(cfg).eval()
    images, mask = padded_batch([(128, 192), (64, 128)], (128, 192))
    with torch.no_grad():
        out = model(images, mask)
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    total = sum(h * w for h, w in shapes)
    batch, queries, classes, heads, levels, points = 2, cfg.num_queries, cfg.num_classes, cfg.nheads, 4, 2
    assert out["pred_logits"].shape == (batch, queries, classes)
    assert out["pred_boxes"].shape == (batch, queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (batch, queries, 4)
    assert out["enc_outputs"]["pred_logits"].shape == (batch, total, classes)
    assert out["enc_outputs"]["pred_boxes"].shape == (batch, total, 4)
    assert out["spatial_shapes"].tolist() == [list(s) for s in shapes]
    assert out["spatial_shapes"].dtype == torch.int64
    assert out["level_start_index"].tolist() == [0, 384, 480, 504]
    mask_flatten = out["mask_flatten"]
    assert mask_flatten.shape == (batch, total) and mask_flatten.dtype == torch.bool
    assert not mask_flatten[0].any()
    assert int((~mask_flatten[1]).sum()) == 8 * 16 + 4 * 8 + 2 * 4 + 1 * 2
    torch.testing.assert_close(out["valid_ratios"][0], torch.ones(levels, 2))
    torch.testing.assert_close(out["valid_ratios"][1, 0], torch.tensor([16 / 24, 8 / 16]))
    assert out["sampling_locations_dec"].shape == (batch, cfg.dec_layers, queries, heads, levels, points, 2)
    assert out["attn_weights_dec"].shape == (batch, cfg.dec_layers, queries, heads, levels, points)
    torch.testing.assert_close(out["attn_weights_dec"].sum((-1, -2)),
                               torch.ones(batch, cfg.dec_layers, queries, heads))
    assert out["backbone_mask_prediction"].shape == (batch, total)
    assert out["sparse_token_nums"].dtype == torch.int64
    top_k = int(out["sparse_token_nums"].max())
    assert out["backbone_topk_proposals"].shape == (batch, top_k)
    assert out["backbone_topk_proposals"].dtype == torch.int64
    assert len(out["aux_outputs_enc"]) == cfg.enc_layers - 1
    assert out["aux_outputs_enc"][0]["pred_logits"].shape == (batch, top_k, classes)
    assert out["aux_outputs_enc"][0]["pred_boxes"].shape == (batch, top_k, 4)


@pytest.mark.parametrize("rho", [0.05, 0.3, 0.9])
def test_sparse_selection_takes_the_best_valid_tokens(rho):
    torch.manual_seed(1)
    model = build_model(model_cfg(rho=rho)).eval()
    images, mask = padded_batch([(128, 192), (64, 96), (32, 64)], (128, 192))
    with torch.no_grad():
        out = model(images, mask)
    valid = ~out["mask_flatten"]
    prediction = out["backbone_mask_prediction"]
    assert (prediction[~valid] == torch.finfo(prediction.dtype).min).all()
    for i in range(3):
        n_valid = int(valid[i].sum())
        n_keep = int(out["sparse_token_nums"][i])
        assert n_keep == int(n_valid * rho) + 1
        kept = out["backbone_topk_proposals"][i, :n_keep]
        assert valid[i, kept].all()
        assert len(set(kept.tolist())) == n_keep
        # exactly the n_keep highest-scoring valid tokens
        best = torch.topk(prediction[i][valid[i]], n_keep).values
        torch.testing.assert_close(prediction[i, kept].sort().values, best.sort().values)


def test_dense_model_has_no_sparse_outputs():
    model = build_model(model_cfg(rho=0.0, use_enc_aux_loss=False)).eval()
    assert model.transformer.enc_mask_predictor is None
    images, mask = padded_batch([(64, 64), (32, 64)], (64, 64))
    with torch.no_grad():
        out = model(images, mask)
    for key in ("backbone_mask_prediction", "sparse_token_nums", "backbone_topk_proposals", "aux_outputs_enc"):
        assert key not in out
    assert out["pred_logits"].shape == (2, 12, 5)


def test_sparse_encoder_with_every_token_equals_the_dense_encoder():
    """rho -> all tokens: the sparse path (gather, update, scatter back) must reduce to the dense one,
    whatever order the tokens are selected in; unselected tokens must pass through unchanged."""
    torch.manual_seed(2)
    layer = DeformableEncoderLayer(d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4, n_points=2)
    encoder = DeformableEncoder(layer, 2).eval()
    shape_list = [(6, 8), (3, 4)]
    spatial_shapes = torch.tensor(shape_list)
    level_start_index = torch.tensor([0, 48])
    mask = torch.zeros(2, 60, dtype=torch.bool)
    src, pos = torch.randn(2, 60, 32), torch.randn(2, 60, 32)
    valid_ratios = torch.ones(2, 2, 2)
    with torch.no_grad():
        dense = encoder(src, spatial_shapes, shape_list, level_start_index, valid_ratios, pos, mask)["memory"]
        order = torch.stack([torch.randperm(60), torch.randperm(60)])
        everything = encoder(src, spatial_shapes, shape_list, level_start_index, valid_ratios, pos, mask,
                             topk_inds=order, sparse_token_nums=torch.tensor([60, 60]))["memory"]
        torch.testing.assert_close(everything, dense, atol=1e-5, rtol=1e-5)

        some = order[:, :10]
        sparse = encoder(src, spatial_shapes, shape_list, level_start_index, valid_ratios, pos, mask,
                         topk_inds=some, sparse_token_nums=torch.tensor([10, 4]))["memory"]
    for i, n_keep in enumerate((10, 4)):
        updated = torch.zeros(60, dtype=torch.bool)
        updated[some[i, :n_keep]] = True
        assert torch.equal(sparse[i, ~updated], src[i, ~updated])
        assert (sparse[i, updated] - src[i, updated]).abs().amax(-1).min() > 1e-3


def crop_features(srcs, masks, index, valid):
    return ([s[index:index + 1, :, :h, :w] for s, (h, w) in zip(srcs, valid)],
            [m[index:index + 1, :h, :w] for m, (h, w) in zip(masks, valid)])


def token_map(shapes, valid):
    """Flat index of every valid token of a cropped image inside the padded layout."""
    index, start = [], 0
    for (h, w), (vh, vw) in zip(shapes, valid):
        rows = torch.arange(vh)[:, None] * w + torch.arange(vw)[None]
        index.append(start + rows.flatten())
        start += h * w
    return torch.cat(index)


@pytest.mark.parametrize("rho, aux", [(0.0, False), (0.0, True), (0.3, True)])
def test_an_image_gives_the_same_outputs_alone_and_in_a_padded_batch(rho, aux):
    """Masks, valid ratios, proposals, scoring and top-k selection must all ignore padding.

    Checked from the projected features on (`detect`): a CNN backbone and input_proj's GroupNorm
    see the padding by construction (receptive fields and statistics cross the image border),
    exactly as in the official model, so the comparison starts after them."""
    torch.manual_seed(3)
    model = build_model(model_cfg(rho=rho, use_enc_aux_loss=aux)).eval()
    encoding = PositionEmbeddingSine(16, normalize=True)
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    valid = [(8, 16), (4, 8), (2, 4), (1, 2)]
    srcs = [torch.randn(2, 32, h, w) for h, w in shapes]
    masks = []
    for h, w in shapes:
        masks.append(torch.zeros(2, h, w, dtype=torch.bool))
    for level_mask, (vh, vw) in zip(masks, valid):
        level_mask[1, vh:, :] = True
        level_mask[1, :, vw:] = True
    with torch.no_grad():
        batched = model.detect(srcs, masks, [encoding(m) for m in masks])
        small_srcs, small_masks = crop_features(srcs, masks, 1, valid)
        alone = model.detect(small_srcs, small_masks, [encoding(m) for m in small_masks])

    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(batched["pred_logits"][1:], alone["pred_logits"], **tol)
    torch.testing.assert_close(batched["pred_boxes"][1:], alone["pred_boxes"], **tol)
    for got, want in zip(batched["aux_outputs"], alone["aux_outputs"]):
        torch.testing.assert_close(got["pred_boxes"][1:], want["pred_boxes"], **tol)
    tokens = token_map(shapes, valid)
    torch.testing.assert_close(batched["enc_outputs"]["pred_logits"][1, tokens],
                               alone["enc_outputs"]["pred_logits"][0], **tol)
    torch.testing.assert_close(alone["valid_ratios"], torch.ones(1, 4, 2))
    torch.testing.assert_close(batched["valid_ratios"][1, :, 0], torch.tensor([16 / 24, 8 / 12, 4 / 6, 2 / 3]))
    if rho > 0:
        torch.testing.assert_close(batched["backbone_mask_prediction"][1, tokens],
                                   alone["backbone_mask_prediction"][0], **tol)
        n_keep = int(alone["sparse_token_nums"][0])
        assert int(batched["sparse_token_nums"][1]) == n_keep
        assert torch.equal(batched["backbone_topk_proposals"][1, :n_keep],
                           tokens[alone["backbone_topk_proposals"][0, :n_keep]])
        for got, want in zip(batched["aux_outputs_enc"], alone["aux_outputs_enc"]):
            torch.testing.assert_close(got["pred_logits"][1:, :n_keep], want["pred_logits"][:, :n_keep], **tol)


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(4)
    model = build_model(model_cfg()).train()
    with torch.no_grad():
        # break the zero inits (box-head last layers, offsets) so that a zero gradient means "cut off"
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    images, mask = padded_batch([(64, 96), (64, 64)], (64, 96))
    out = model(images, mask)
    valid = ~out["mask_flatten"]
    total = out["pred_logits"].sum() + out["pred_boxes"].sum()
    total = total + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    total = total + out["enc_outputs"]["pred_logits"].sum() + out["enc_outputs"]["pred_boxes"][valid].sum()
    total = total + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs_enc"])
    total = total + out["backbone_mask_prediction"][valid].sum()
    total.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("transformer.enc_mask_predictor") for name in trainable)
    cut_off = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert cut_off == []
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name in dict(model.named_parameters())
                      if name.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1"))}


def test_param_groups_partition_the_trainable_parameters():
    model = build_model(model_cfg())
    groups = param_groups(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1)
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-5, 2e-5])
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(names[id(p)].startswith("backbone.0") for p in groups[1]["params"])
    assert {names[id(p)].split(".")[-2] for p in groups[2]["params"]} == {"sampling_offsets"}
    assert not any("sampling_offsets" in names[id(p)] or names[id(p)].startswith("backbone")
                   for p in groups[0]["params"])


@pytest.mark.parametrize("overrides", [
    {"two_stage": False, "with_box_refine": False, "rho": 0.0, "use_enc_aux_loss": False, "eff_query_init": False},
    {"two_stage": False, "with_box_refine": True, "rho": 0.0, "use_enc_aux_loss": False, "eff_query_init": False},
    {"with_box_refine": False, "rho": 0.0, "use_enc_aux_loss": False, "num_feature_levels": 1},
])
def test_deformable_detr_variants_run(overrides):
    """Single-stage queries, shared heads and a single C5 level keep working (Deformable DETR options)."""
    torch.manual_seed(5)
    cfg = model_cfg(**overrides)
    model = build_model(cfg).eval()
    keys = model.state_dict().keys()
    assert ("query_embed.weight" in keys) == (not cfg.two_stage)
    assert ("transformer.reference_points.weight" in keys) == (not cfg.two_stage)
    if not cfg.with_box_refine:
        assert model.class_embed[0] is model.class_embed[-1]
    images, mask = padded_batch([(128, 128), (96, 64)], (128, 128))
    with torch.no_grad():
        out = model(images, mask)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert out["spatial_shapes"].shape == (cfg.num_feature_levels, 2)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    assert ("enc_outputs" in out) == cfg.two_stage


class _Inputs(torch.nn.Module):
    """Returns what it is given, and the autocast dtype it runs under."""

    def forward(self, images, mask):
        return {"images": images, "mask": mask, "autocast": torch.get_autocast_dtype("cpu")
                if torch.is_autocast_enabled("cpu") else None}


def test_fast_detector_pads_to_multiples_and_runs_under_autocast():
    from model.inference import FastDetector

    images, mask = padded_batch([(50, 70), (40, 64)], (50, 70))
    seen = FastDetector(_Inputs(), multiple=32)(images, mask)
    assert seen["images"].shape == (2, 3, 64, 96) and seen["mask"].shape == (2, 64, 96)
    assert torch.equal(seen["images"][:, :, :50, :70], images) and not seen["images"][:, :, 50:].any()
    assert torch.equal(seen["mask"][:, :50, :70], mask) and seen["mask"][:, 50:].all() and seen["mask"][:, :, 70:].all()
    assert seen["autocast"] == torch.bfloat16
    exact = FastDetector(_Inputs(), multiple=1)(images, mask)
    assert exact["images"] is images and exact["mask"] is mask
