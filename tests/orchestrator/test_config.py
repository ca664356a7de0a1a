"""The config tree: YAML loading with `base:` inheritance, typed overrides, validation, dumps."""
import math
from pathlib import Path

import pytest
import yaml

from orchestrator.config import (
    Config,
    ConfigError,
    dump_yaml,
    field_docs,
    flatten,
    from_dict,
    load_config,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_official_recipe():
    cfg = Config()
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
    assert (cfg.train.weight_decay, cfg.train.epochs, cfg.train.lr_drop, cfg.train.clip_max_norm) == (1e-4, 50, 40, 0.1)
    m = cfg.model
    assert (m.num_queries, m.dim_feedforward, m.hidden_dim, m.nheads) == (300, 1024, 256, 8)
    assert (m.enc_layers, m.dec_layers, m.enc_n_points, m.dec_n_points, m.num_feature_levels) == (6, 6, 4, 4, 4)
    loss = cfg.loss
    assert (loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou) == (2, 5, 2)
    assert (loss.cls_coef, loss.bbox_coef, loss.giou_coef, loss.focal_alpha, loss.mask_prediction_coef) == (2, 5, 2, 0.25, 1)


@pytest.mark.parametrize("rho", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_paper_configs_inherit_and_set_rho(rho):
    cfg = load_config(CONFIGS / f"r50_sparse_detr_rho{rho}.yaml")
    assert cfg.model.rho == rho
    assert cfg.model.backbone.name == "resnet50"
    assert cfg.model.use_enc_aux_loss and cfg.model.eff_query_init and cfg.model.eff_specific_head
    assert cfg.model.two_stage and cfg.model.with_box_refine
    assert cfg.train.epochs == 50 and cfg.train.lr_drop == 40


def test_deformable_baseline_is_dense_topk_bbr():
    cfg = load_config(CONFIGS / "r50_deformable_detr.yaml")
    assert cfg.model.rho == 0.0 and cfg.model.two_stage and cfg.model.with_box_refine
    assert not cfg.model.use_enc_aux_loss


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert "demo.yaml" in names and "swint_sparse_detr_rho0.1.yaml" in names
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "demo.yaml", ["model.rho=0.25", "train.epochs=3", "model.backbone.name=resnet34",
                                              "train.use_gpu=false", "model.checkpoint=null",
                                              "data.train_scales=[128, 160]", "train.lr=1e-3"])
    assert cfg.model.rho == 0.25 and isinstance(cfg.model.rho, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.backbone.name == "resnet34"
    assert cfg.train.use_gpu is False and cfg.model.checkpoint is None
    assert cfg.data.train_scales == [128, 160]
    assert cfg.train.lr == pytest.approx(1e-3)


def test_int_given_to_float_field_becomes_float():
    cfg = load_config(None, ["loss.cls_coef=3"])
    assert cfg.loss.cls_coef == 3.0 and isinstance(cfg.loss.cls_coef, float)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.epochz=1", "train.epochz"),
        ("trian.epochs=1", "trian"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("model.rho=1.5", "model.rho"),
        ("model.rho=-0.1", "model.rho"),
        ("model.backbone.name=vgg16", "model.backbone.name"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("model.hidden_dim=250", "model.hidden_dim"),
        ("cluster.address=ftp://x", "cluster.address"),
        ("data.train_scales=7", "data.train_scales"),
        ("loss.giou_coef=-1", "loss.giou_coef"),
        ("train.epochs", "train.epochs"),
    ],
)
def test_bad_override_names_the_key(override, culprit):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert culprit in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        load_config(None, ["train.epochz=1"])


def test_bad_yaml_files_name_the_file_and_key(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {rho: [\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  roh: 0.1\n")
    with pytest.raises(ConfigError, match="model.roh"):
        load_config(unknown)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(not_mapping)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_base_chain_resolves_relative_and_detects_cycles(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("base: sub/b.yaml\ntrain: {epochs: 7}\n")
    (tmp_path / "sub" / "b.yaml").write_text("train: {epochs: 3, lr: 0.001}\nmodel: {rho: 0.2}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.rho) == (7, 0.001, 0.2)
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")


def test_sparse_options_need_two_stage():
    with pytest.raises(ConfigError, match="model.rho"):
        load_config(None, ["model.two_stage=false", "model.rho=0.1"])


def test_dump_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "r50_sparse_detr_rho0.3.yaml", ["train.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(yaml.safe_load(path.read_text())) == cfg
    assert math.isclose(again.model.position_embedding_scale, 2 * math.pi)


def test_every_leaf_has_a_doc_and_a_param():
    docs = field_docs()
    params = flatten(Config())
    assert set(docs) == set(params)
    assert all(text.strip() for text in docs.values()), [k for k, v in docs.items() if not v.strip()]
    assert "model.backbone.weights" in params and "loss.enc_aux_coef" in params
