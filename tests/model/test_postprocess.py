import pytest
import torch

from model.postprocess import PostProcess


def test_postprocess_picks_top_scores_and_scales_boxes():
    logits = torch.full((2, 3, 2), -10.0)
    logits[0, 1, 0] = 3.0   # best of image 0: query 1, class 0
    logits[0, 2, 1] = 1.0   # second: query 2, class 1
    logits[1, 0, 1] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.25, 1.0, 0.5]],
                          [[0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]])
    sizes = torch.tensor([[100, 200], [50, 40]])  # (h, w)
    results = PostProcess(max_dets=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)

    assert len(results) == 2 and all(r["scores"].shape == (4,) for r in results)
    first = results[0]
    assert first["labels"][:2].tolist() == [0, 1]
    assert torch.allclose(first["scores"][:2], torch.sigmoid(torch.tensor([3.0, 1.0])))
    assert torch.allclose(first["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    assert torch.allclose(first["boxes"][1], torch.tensor([0.0, 0.0, 200.0, 50.0]))
    assert (first["scores"][:-1] >= first["scores"][1:]).all()
    second = results[1]
    assert second["labels"][0] == 1
    assert torch.allclose(second["boxes"][0], torch.tensor([0.0, 0.0, 40.0, 50.0]))


def test_postprocess_default_keeps_100_detections():
    out = {"pred_logits": torch.randn(1, 300, 91), "pred_boxes": torch.rand(1, 300, 4)}
    [result] = PostProcess()(out, torch.tensor([[480, 640]]))
    assert result["boxes"].shape == (100, 4) and result["labels"].max() < 91
    assert torch.equal(result["scores"], out["pred_logits"].sigmoid().flatten().topk(100).values)


def test_postprocess_rejects_bad_sizes():
    out = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4)}
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(out, torch.tensor([[10, 10]]))
