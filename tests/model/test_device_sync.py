"""On a GPU the training step waits for the device only where it must (run only where CUDA is present).

torch's sync debug mode warns at every operation that makes the host wait for the device (a value read
on the host, a blocking copy): the criterion may wait once (its one copy of the matching costs), the
whole step three times (that copy, the sparse token count at the end of the forward, the loss report).
"""
import warnings

import pytest
import torch
from test_criterion import make_outputs, make_targets, sparse_cfgs
from tiny_model import model_cfg

from model import ms_deform_attn as msda
from model.build import build_model
from model.criterion import build_criterion
from orchestrator.config import LossConfig
from orchestrator.train.step import train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def count_syncs(fn):
    """-> (fn's result, how many synchronizing CUDA operations it ran)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchronizing" in str(w.message) for w in caught)


def to_cuda(value):
    if torch.is_tensor(value):
        return value.detach().cuda().requires_grad_(value.requires_grad)
    if isinstance(value, dict):
        return {k: to_cuda(v) for k, v in value.items()}
    return [to_cuda(v) for v in value]


def test_cuda_criterion_waits_once_and_gives_the_cpu_losses():
    targets = make_targets()  # on the host, as the loader yields them
    criterion = build_criterion(*sparse_cfgs())
    outputs = make_outputs(targets)
    expected = criterion(outputs, targets)
    losses, syncs = count_syncs(lambda: criterion(to_cuda(outputs), targets))
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].cpu(), value, rtol=1e-5, atol=1e-6)
    assert syncs == 1


def test_cuda_train_step_waits_three_times_and_matches_the_cpu_step():
    cfg = model_cfg(num_queries=10)
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(cfg, LossConfig())
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]])}]

    def step(module, device):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        return train_step(module, criterion, optimizer, scaler, (images, mask, targets), device, None, 0.1)

    gpu_model = build_model(cfg).cuda()  # the tiny config has no dropout: both devices run the same network
    gpu_model.load_state_dict(model.state_dict())
    with msda.reference_only():  # the model's own waits; the native op's are tested in tests/ops
        expected = step(model, torch.device("cpu"))
        values, syncs = count_syncs(lambda: step(gpu_model, torch.device("cuda")))
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert syncs == 3
