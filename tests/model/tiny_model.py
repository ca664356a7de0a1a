"""A tiny ModelConfig-like namespace shared by the model tests."""
import types


def model_cfg(**overrides):
    """A ModelConfig-like namespace (model/ is duck-typed on orchestrator.config.ModelConfig)."""
    fields = {
        "backbone": types.SimpleNamespace(name="resnet18", weights=None, train=True, dilation=False),
        "num_classes": 5, "hidden_dim": 32, "nheads": 4, "enc_layers": 2, "dec_layers": 2,
        "dim_feedforward": 64, "dropout": 0.0, "num_feature_levels": 4, "enc_n_points": 2, "dec_n_points": 2,
        "num_queries": 12, "position_embedding_scale": 6.283185307179586, "im2col_step": 64, "checkpoint": None, "init_from": None,
        "two_stage": True, "with_box_refine": True, "aux_loss": True, "rho": 0.3, "use_enc_aux_loss": True,
        "eff_query_init": True, "eff_specific_head": True,
    }
    fields.update(overrides)
    return types.SimpleNamespace(**fields)
