"""model.init_from's loader: strict everywhere except class heads of another size, which start afresh."""
import math

import pytest
import torch
from tiny_model import model_cfg

from model.build import build_model
from model.checkpoint import load_for_finetuning

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def test_class_heads_of_another_size_start_afresh_and_everything_else_is_loaded():
    torch.manual_seed(0)
    official = build_model(model_cfg(num_classes=91)).state_dict()
    torch.manual_seed(1)
    model = build_model(model_cfg(num_classes=6))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialised = load_for_finetuning(model, {"model": official, "epoch": 49}, "official.pth")

    state = model.state_dict()
    # every class head: decoder layers, two-stage proposals, encoder aux (and their alias names)
    num_heads = 2 + 1 + 1  # dec_layers + two-stage + (enc_layers - 1)
    assert len([k for k in reinitialised if k.startswith("class_embed.")]) == 2 * num_heads
    assert all(".class_embed." in f".{k}" for k in reinitialised)
    assert "transformer.encoder.class_embed.0.bias" in reinitialised
    for key in reinitialised:
        assert torch.equal(state[key], fresh[key]), key  # as the model initialises them
        assert state[key].shape[0] == 6
    for index in range(num_heads):
        torch.testing.assert_close(state[f"class_embed.{index}.bias"], torch.full((6,), PRIOR_BIAS))
    for key, value in official.items():
        if key not in reinitialised:
            assert torch.equal(state[key], value), key
    # the aliases still name the same modules
    assert model.transformer.decoder.class_embed[0] is model.class_embed[0]


def test_same_classes_is_a_plain_strict_load():
    source = build_model(model_cfg())
    target = build_model(model_cfg())
    assert load_for_finetuning(target, source.state_dict(), "same.pth") == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_other_mismatches_are_listed_and_nothing_is_loaded():
    other = build_model(model_cfg(num_classes=91, hidden_dim=64)).state_dict()
    model = build_model(model_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"wrong shapes: bbox_embed.0.layers.0.bias \(64,\) != \(32,\)") as err:
        load_for_finetuning(model, other, "wide.pth")
    assert "wide.pth" in str(err.value)
    dense = build_model(model_cfg(rho=0.0, use_enc_aux_loss=False)).state_dict()
    with pytest.raises(ValueError, match="missing keys: .*enc_mask_predictor"):
        load_for_finetuning(model, dense, "dense.pth")
    extra = dict(model.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: 1: extra.weight"):
        load_for_finetuning(model, extra, "extra.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
