"""The worker loop of a Ray Train run — shards -> train steps -> eval -> checkpoint -> resume — through the same
Trainer, without Ray, as one rank of a process group of one: gloo on the CPU; on a GPU, NCCL with the GPU's
own paths (bf16 autocast, pinned batches, the model and the criterion on the device)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from train_helpers import free_port, make_shards, tiny_config

from orchestrator.run import checkpoints
from orchestrator.run.identity import RunIdentity
from orchestrator.train.session import LocalSession
from orchestrator.train.worker import Trainer, train_without_ray

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.fixture
def process_group(request):
    device = request.param
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("process_group", DEVICES, indirect=True)
def test_the_worker_loop_trains_evaluates_checkpoints_and_resumes(tmp_path, process_group):
    device = process_group
    shards = make_shards(tmp_path, num_train=8, num_val=4, size=64)
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", checkpoint={"every_steps": 3, "keep": 3},
                         epochs=2, max_steps_per_epoch=2, num_workers=1)
    cfg.train.amp = "bf16"  # the GPU's mixed precision path; the CPU trains in fp32 whatever it says
    cfg.eval.dam_images = cfg.eval.pred_images = 1
    run = RunIdentity(name="loop", directory=str(tmp_path / "runs" / "loop"), storage=str(tmp_path / "runs"))

    first = train_without_ray(cfg, run, device=device)
    cfg.train.epochs = 3
    resumed = train_without_ray(cfg, run, device=device)

    # every step's checkpoint report, then the epoch ends: steps 2, 3 (mid-epoch), 4; then epoch 3 from step 4
    assert [(r["step"], r["epoch_end"]) for r in first] == [(2, True), (3, False), (4, True)]
    assert [(r["step"], r["epoch_end"]) for r in resumed] == [(6, True)]
    ends = [r for r in first + resumed if r["epoch_end"]]
    assert [r["epochs_done"] for r in ends] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["AP"] <= 1.0 for r in ends)
    stored = json.loads((tmp_path / "runs" / "loop" / "eval" / "epoch_0002.json").read_text())
    assert stored["metrics"]["AP"] == pytest.approx(resumed[-1]["AP"])
    assert (tmp_path / "runs" / "loop" / "plots" / "predictions" / "epoch_0002").is_dir()
    newest = checkpoints.newest_first(tmp_path / "runs" / "loop")
    assert len(newest) <= 3 and newest[0].name == checkpoints.dir_name(6, 0)
    assert checkpoints.load(newest[0])["epoch"] == 2


@pytest.mark.parametrize("process_group", DEVICES, indirect=True)
def test_a_worker_puts_everything_on_its_device(tmp_path, process_group):
    device = process_group
    shards = make_shards(tmp_path, num_train=4, num_val=2, size=64)
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", num_workers=1)
    run = RunIdentity(name="placed", directory=str(tmp_path / "runs" / "placed"), storage=str(tmp_path / "runs"))
    run.location().mkdir(parents=True)
    cfg.train.amp = "bf16"
    trainer = Trainer(cfg, run, LocalSession(run.directory, device=device))
    assert {p.device.type for p in trainer.module.parameters()} == {device}
    assert {b.device.type for b in trainer.criterion.buffers()} <= {device}
    assert trainer.amp_dtype == (torch.bfloat16 if device == "cuda" else None)
    assert torch.backends.cuda.matmul.allow_tf32 == (device == "cuda")  # train.tf32, on a GPU only
    images, mask, targets = next(iter(trainer.train_loader))
    assert images.is_pinned() == mask.is_pinned() == (device == "cuda")
    assert all(t["boxes"].is_pinned() == (device == "cuda") for t in targets)
