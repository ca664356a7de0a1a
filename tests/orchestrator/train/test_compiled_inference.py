"""Compiled inference gives the eager numbers (torch.compile, inductor on CPU), and the auto rule's choice."""
import torch

from model.build import build_model
from orchestrator.train.evaluation import COMPILE_PAYS_AFTER_IMAGES, inference_module
from tests.model.tiny_model import model_cfg


def test_compiled_and_eager_outputs_agree(native_op):
    torch.manual_seed(0)
    model = build_model(model_cfg(num_queries=8, enc_layers=1, dec_layers=1)).eval()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True  # a padded image: the sparse token count comes from the mask
    images[1, :, :, 48:] = 0
    compiled = inference_module(model, compile=True, images=1)
    assert compiled is not model
    with torch.no_grad():
        eager, fast = model(images, mask), compiled(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(fast[key], eager[key], rtol=0, atol=1e-4)


def test_auto_compiles_only_a_workload_that_pays():
    model = torch.nn.Linear(2, 2)
    assert inference_module(model, compile=None, images=COMPILE_PAYS_AFTER_IMAGES - 1) is model
    assert inference_module(model, compile=False, images=10**6) is model
    assert inference_module(model, compile=None, images=COMPILE_PAYS_AFTER_IMAGES) is not model
