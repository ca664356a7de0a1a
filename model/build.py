"""Build the detector and its criterion from a model / loss config (PostProcess: model.postprocess)."""
from __future__ import annotations

from model.backbone import build_backbone
from model.sparse_detr import SparseDETR
from model.transformer import DeformableTransformer


def build_model(model_cfg) -> SparseDETR:
    """model_cfg has the fields of orchestrator.config.ModelConfig (duck-typed: model/ never imports
    orchestrator). Loads `model_cfg.checkpoint` when set (an sdo checkpoint or an official file)."""
    backbone = build_backbone(model_cfg.backbone, model_cfg.hidden_dim, model_cfg.position_embedding_scale)
    transformer = DeformableTransformer(
        d_model=model_cfg.hidden_dim,
        nhead=model_cfg.nheads,
        num_encoder_layers=model_cfg.enc_layers,
        num_decoder_layers=model_cfg.dec_layers,
        dim_feedforward=model_cfg.dim_feedforward,
        dropout=model_cfg.dropout,
        num_feature_levels=model_cfg.num_feature_levels,
        dec_n_points=model_cfg.dec_n_points,
        enc_n_points=model_cfg.enc_n_points,
        two_stage=model_cfg.two_stage,
        two_stage_num_proposals=model_cfg.num_queries,
        rho=model_cfg.rho,
        use_enc_aux_loss=model_cfg.use_enc_aux_loss,
        eff_query_init=model_cfg.eff_query_init,
        eff_specific_head=model_cfg.eff_specific_head,
        im2col_step=model_cfg.im2col_step,
    )
    model = SparseDETR(
        backbone,
        transformer,
        num_classes=model_cfg.num_classes,
        num_queries=model_cfg.num_queries,
        num_feature_levels=model_cfg.num_feature_levels,
        aux_loss=model_cfg.aux_loss,
        with_box_refine=model_cfg.with_box_refine,
        two_stage=model_cfg.two_stage,
        use_enc_aux_loss=model_cfg.use_enc_aux_loss,
    )
    if getattr(model_cfg, "checkpoint", None):
        from model.checkpoint import load_weights

        load_weights(model, model_cfg.checkpoint)
    return model


def build(model_cfg, loss_cfg):
    """-> (SparseDETR, SetCriterion)"""
    from model.criterion import build_criterion

    return build_model(model_cfg), build_criterion(model_cfg, loss_cfg)
