"""Loading official-format and sdo checkpoints: strict, reported, and harmless when refused."""
import argparse

import pytest
import torch
from tiny_model import model_cfg as tiny_model_cfg

from model.build import build_model
from model.checkpoint import load_official, load_weights


def model_cfg(**overrides):
    return tiny_model_cfg(**{"num_queries": 8, "rho": 0.2, **overrides})


def official_file(model, path, epoch=49):
    """Laid out like the official main.py's checkpoint.pth (argparse namespace included)."""
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"step_size": 40}, "epoch": epoch,
                "args": argparse.Namespace(rho=0.2, lr=2e-4, backbone="resnet50")}, path)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_official_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model(model_cfg()).eval()
    path = tmp_path / "checkpoint.pth"
    official_file(source, path)
    torch.manual_seed(1)
    target = build_model(model_cfg()).eval()
    report = load_official(target, path)
    assert report["epoch"] == 49
    assert report["num_tensors"] == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    # the alias keys point at the very same heads after loading
    assert target.transformer.decoder.class_embed[0] is target.class_embed[0]
    assert target.transformer.encoder.bbox_embed[0] is target.bbox_embed[-1]
    images = torch.randn(1, 3, 128, 128)
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(target(images, mask)["pred_boxes"], source(images, mask)["pred_boxes"])


def test_missing_and_unexpected_keys_are_reported_and_nothing_is_loaded(tmp_path):
    dense = build_model(model_cfg(rho=0.0, use_enc_aux_loss=False, eff_query_init=False, eff_specific_head=False))
    path = tmp_path / "dense.pth"
    official_file(dense, path)
    sparse = build_model(model_cfg())
    before = snapshot(sparse)
    with pytest.raises(ValueError) as err:
        load_official(sparse, path)
    message = str(err.value)
    assert "dense.pth" in message
    assert "missing keys" in message and "transformer.enc_mask_predictor.* (10)" in message
    assert "wrong shapes" in message and "transformer.pos_trans.weight" in message
    for key, value in sparse.state_dict().items():
        assert torch.equal(value, before[key]), key

    state = sparse.state_dict()
    state["transformer.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected keys: 1: transformer.extra.weight"):
        load_official(sparse, tmp_path / "extra.pth")


def test_bad_files_are_value_errors(tmp_path):
    model = build_model(model_cfg())
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_official(model, tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_official(model, tmp_path / "garbage.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_official(model, tmp_path / "bare.pth")


def test_load_weights_accepts_sdo_bare_and_ddp_files(tmp_path):
    torch.manual_seed(0)
    source = build_model(model_cfg())
    state = source.state_dict()
    torch.save({"model": state, "epoch": 3, "config": {"model": {"rho": 0.2}}}, tmp_path / "sdo.pt")
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    for name, epoch in (("sdo.pt", 3), ("bare.pt", None), ("ddp.pt", None)):
        torch.manual_seed(1)
        target = build_model(model_cfg())
        report = load_weights(target, tmp_path / name)
        assert report["epoch"] == epoch
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_build_loads_the_configured_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build_model(model_cfg())
    official_file(source, tmp_path / "start.pth")
    torch.manual_seed(1)
    model = build_model(model_cfg(checkpoint=str(tmp_path / "start.pth")))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
