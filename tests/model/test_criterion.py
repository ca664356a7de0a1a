import math

import pytest
import torch
import torch.nn.functional as F

from model.criterion import SetCriterion, build_criterion, sigmoid_focal_loss
from model.dam import dam_target
from model.matcher import HungarianMatcher
from orchestrator.config import LossConfig, ModelConfig

NUM_CLASSES = 5
SHAPES = torch.tensor([[4, 4], [2, 2]])
START = torch.tensor([0, 16])


def make_targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]])},
    ]


def logit(p):
    return math.log(p / (1 - p))


def make_outputs(targets, num_queries=6, seed=0, perfect=False):
    """A model-like output dict with the contract's keys (2 decoder aux, two-stage, 2 encoder aux, DAM)."""
    g = torch.Generator().manual_seed(seed)

    def head(length, classes=NUM_CLASSES):
        logits = torch.randn(2, length, classes, generator=g)
        boxes = torch.rand(2, length, 4, generator=g) * 0.4 + 0.2
        if perfect:
            logits.fill_(logit(0.01))
            for b, t in enumerate(targets):
                n = len(t["labels"])
                boxes[b, :n] = t["boxes"]
                logits[b, torch.arange(n), t["labels"]] = logit(0.99)
        return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}

    outputs = head(num_queries)
    outputs["aux_outputs"] = [head(num_queries) for _ in range(2)]
    outputs["enc_outputs"] = head(20)
    outputs["aux_outputs_enc"] = [head(4) for _ in range(2)]
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 12:16] = True
    outputs["mask_flatten"] = mask
    prediction = torch.randn(2, 20, generator=g).masked_fill(mask, -1e4)
    outputs["backbone_mask_prediction"] = prediction.requires_grad_()
    outputs["sparse_token_nums"] = torch.tensor([4, 3])
    outputs["backbone_topk_proposals"] = torch.stack([torch.arange(4), torch.tensor([0, 1, 2, 2])])
    outputs["spatial_shapes"], outputs["level_start_index"] = SHAPES, START
    outputs["valid_ratios"] = torch.ones(2, 2, 2)
    outputs["sampling_locations_dec"] = torch.rand(2, 3, num_queries, 2, 2, 2, 2, generator=g)
    outputs["attn_weights_dec"] = torch.rand(2, 3, num_queries, 2, 2, 2, generator=g)
    return outputs


def sparse_cfgs(**loss):
    model_cfg = ModelConfig(num_classes=NUM_CLASSES, dec_layers=3, enc_layers=3, rho=0.3, use_enc_aux_loss=True)
    return model_cfg, LossConfig(**loss)


def test_focal_loss_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g)
    targets = (torch.rand(2, 3, 4, generator=g) > 0.7).float()
    expected = 0.0
    for x, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if y:
            expected += -0.25 * (1 - p) ** 2 * math.log(p)
        else:
            expected += -0.75 * p ** 2 * math.log(1 - p)
    assert float(sigmoid_focal_loss(logits, targets, num_boxes=3.0)) == pytest.approx(expected / 3, rel=1e-5)


def test_build_criterion_weight_dict():
    model_cfg, loss_cfg = sparse_cfgs(cls_coef=2.0, bbox_coef=5.0, giou_coef=2.0, enc_aux_coef=0.5,
                                      mask_prediction_coef=1.5)
    weights = build_criterion(model_cfg, loss_cfg).weight_dict
    assert weights["loss_ce"] == 2.0 and weights["loss_bbox"] == 5.0 and weights["loss_giou"] == 2.0
    assert weights["loss_bbox_1"] == 5.0 and "loss_ce_2" not in weights  # dec_layers - 1 aux heads
    assert weights["loss_giou_enc"] == 2.0
    assert weights["loss_ce_enc_0"] == 1.0 and weights["loss_bbox_enc_1"] == 2.5 and "loss_ce_enc_2" not in weights
    assert weights["loss_mask_prediction"] == 1.5
    assert len(weights) == 3 * (1 + 2 + 1 + 2) + 1

    dense = build_criterion(ModelConfig(num_classes=NUM_CLASSES, rho=0.0, use_enc_aux_loss=True), LossConfig())
    assert "loss_mask_prediction" not in dense.weight_dict and "mask_prediction" not in dense.losses
    assert dense.weight_dict["loss_ce_enc_4"] == 2.0  # enc aux heads on every token when rho = 0, as official
    no_enc_aux = build_criterion(ModelConfig(num_classes=NUM_CLASSES, rho=0.1), LossConfig())
    assert "loss_ce_enc_0" not in no_enc_aux.weight_dict and "loss_mask_prediction" in no_enc_aux.weight_dict


def test_criterion_returns_every_weighted_loss_finite():
    targets = make_targets()
    criterion = build_criterion(*sparse_cfgs())
    losses = criterion(make_outputs(targets), targets)
    assert set(losses) == set(criterion.weight_dict)
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert value > 0, key


def test_perfect_predictions_have_zero_box_losses():
    targets = make_targets()
    losses = build_criterion(*sparse_cfgs())(make_outputs(targets, perfect=True), targets)
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_enc_1"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6), key
    # matched at p = 0.99, every other (query, class) at p = 0.01: tiny but positive focal loss
    assert 0 < losses["loss_ce"].item() < 1e-2


def test_two_stage_targets_are_class_agnostic():
    targets = make_targets()
    outputs = make_outputs(targets)
    matcher = HungarianMatcher()
    enc = outputs["enc_outputs"]
    agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    indices = matcher(enc, agnostic)
    onehot = torch.zeros_like(enc["pred_logits"])
    for b, (pred, _) in enumerate(indices):
        onehot[b, pred, 0] = 1
    expected = sigmoid_focal_loss(enc["pred_logits"], onehot, num_boxes=3.0)
    losses = build_criterion(*sparse_cfgs())(outputs, targets)
    assert torch.allclose(losses["loss_ce_enc"], expected)

    specific_cfg = sparse_cfgs()[0]
    specific_cfg.eff_specific_head = True
    specific = build_criterion(specific_cfg, LossConfig())(outputs, targets)
    assert not torch.allclose(specific["loss_ce_enc"], expected)


def test_dam_loss_and_its_gradient_reach_the_scoring_network():
    targets = make_targets()
    outputs = make_outputs(targets)
    criterion = build_criterion(*sparse_cfgs())
    losses = criterion(outputs, targets)
    prediction = outputs["backbone_mask_prediction"]
    target = dam_target(outputs)
    assert target.sum(1).tolist() == [4.0, 3.0]
    direct = -(target * F.logsigmoid(prediction) + (1 - target) * F.logsigmoid(-prediction)).mean()
    assert torch.allclose(losses["loss_mask_prediction"], direct)

    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    total.backward()
    grad = prediction.grad
    assert grad is not None and grad[~outputs["mask_flatten"]].abs().min() > 0
    assert outputs["aux_outputs_enc"][1]["pred_boxes"].grad.abs().sum() > 0
    assert outputs["enc_outputs"]["pred_logits"].grad.abs().sum() > 0


def test_criterion_rejects_out_of_range_labels():
    targets = make_targets()
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, ["labels", "boxes"])
    with pytest.raises(ValueError, match="labels"):
        criterion(make_outputs(make_targets()), targets)


def test_criterion_handles_images_without_objects():
    targets = make_targets()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = build_criterion(*sparse_cfgs())(make_outputs(targets), targets)
    assert all(torch.isfinite(v) for v in losses.values())


def _num_boxes_on_rank(rank, world_size, init_method, result_dir):
    import torch.distributed as dist

    from model.criterion import _average_num_boxes

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        boxes_here = 2 if rank == 0 else 5
        targets = [{"labels": torch.zeros(boxes_here, dtype=torch.int64)}]
        (result_dir / f"rank{rank}").write_text(str(float(_average_num_boxes(targets, torch.device("cpu")))))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_num_boxes_on_rank, args=(2, f"tcp://127.0.0.1:{port}", tmp_path), nprocs=2, join=True)
    assert [float((tmp_path / f"rank{r}").read_text()) for r in range(2)] == [3.5, 3.5]


def test_bf16_outputs_are_scored_in_float32():
    """Under autocast the model's outputs are bf16: the criterion must match and score them in float32,
    giving the losses of the same outputs cast to float32 (train_step leaves the cast to it)."""
    targets = make_targets()
    criterion = build_criterion(*sparse_cfgs())

    def cast(value, dtype):
        if torch.is_tensor(value):
            return value.detach().to(dtype) if value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: cast(v, dtype) for k, v in value.items()}
        return [cast(v, dtype) for v in value]

    bf16 = cast(make_outputs(targets), torch.bfloat16)
    losses = criterion(bf16, targets)
    expected = criterion(cast(bf16, torch.float32), targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    for key, value in expected.items():
        assert torch.equal(losses[key], value), key


def test_heads_scored_together_equal_each_head_scored_alone():
    """The criterion concatenates heads to match and score them at once: every head's losses must be the
    ones of that head scored on its own (as the main head of an outputs dict), its gradients too."""
    targets = make_targets()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}  # an image without boxes
    for class_specific in (True, False):
        model_cfg, loss_cfg = sparse_cfgs()
        model_cfg.eff_specific_head = class_specific
        criterion = build_criterion(model_cfg, loss_cfg)
        together_outputs, alone_outputs = make_outputs(targets, seed=5), make_outputs(targets, seed=5)
        together = criterion(together_outputs, targets)
        heads = {"": alone_outputs, "_0": alone_outputs["aux_outputs"][0], "_enc": alone_outputs["enc_outputs"],
                 "_enc_1": alone_outputs["aux_outputs_enc"][1]}
        for suffix, head in heads.items():
            head_targets = targets
            if suffix == "_enc" and not class_specific:
                head_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            alone = SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, ["labels", "boxes"])(
                {"pred_logits": head["pred_logits"], "pred_boxes": head["pred_boxes"]}, head_targets)
            for name, value in alone.items():
                torch.testing.assert_close(together[name + suffix], value, rtol=1e-6, atol=1e-7)
            sum(alone.values()).backward()
        sum(together[name + suffix] for suffix in heads for name in ("loss_ce", "loss_bbox", "loss_giou")).backward()
        for suffix, head in heads.items():
            got = {"": together_outputs, "_0": together_outputs["aux_outputs"][0],
                   "_enc": together_outputs["enc_outputs"], "_enc_1": together_outputs["aux_outputs_enc"][1]}[suffix]
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(got[key].grad, head[key].grad, rtol=1e-5, atol=1e-7)
