"""The Checkpointer's policy on real checkpoint folders, and a training without Ray that stops and resumes
exactly (orchestrator.train.session.LocalSession: the same Trainer code that Ray Train runs)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from train_helpers import make_shards, tiny_config

from orchestrator.config import CheckpointConfig
from orchestrator.run import checkpoints
from orchestrator.run.errors import CheckpointError
from orchestrator.run.identity import RunIdentity
from orchestrator.train.checkpointer import Checkpointer
from orchestrator.train.session import LocalSession
from orchestrator.train.worker import train_without_ray

PROGRESS = {"epoch": 0, "epoch_done": True, "epoch_state": {}, "last_eval": {}, "last_report": {}, "rng": [],
            "best": None}


def _parts():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 2)


def _save(checkpointer: Checkpointer, model, optimizer, scheduler, step: int, ap: float) -> None:
    state = checkpointer.state(model, optimizer, scheduler, {**PROGRESS, "step": step}, config={}, run_id="r")
    checkpointer.save(state, {"AP": ap, "step": step})


def test_a_local_session_keeps_the_latest_and_the_best_by_ap(tmp_path):
    checkpointer = Checkpointer(CheckpointConfig(keep=2), tmp_path, LocalSession(tmp_path, device="cpu"))
    parts = _parts()
    for step, ap in ((1, 0.1), (2, 0.5), (3, 0.2), (4, 0.3)):
        _save(checkpointer, *parts, step=step, ap=ap)
    kept = [p.name for p in checkpoints.newest_first(tmp_path)]
    assert kept == [checkpoints.dir_name(4, 0), checkpoints.dir_name(2, 0)]  # the latest, and the best (AP 0.5)
    assert checkpoints.read_report(tmp_path / kept[1]) == {"AP": 0.5, "step": 2}
    assert not list(tmp_path.glob(".*partial"))


def test_ray_keeps_one_folder_fewer_than_keep_besides_the_latest():
    configs = [Checkpointer(CheckpointConfig(keep=keep), "/tmp").ray_config() for keep in (1, 2, 5)]
    assert [c.num_to_keep for c in configs] == [1, 1, 4]
    assert {(c.checkpoint_score_attribute, c.checkpoint_score_order) for c in configs} == {("AP", "max")}


def test_every_steps_decides_the_mid_epoch_checkpoints(tmp_path):
    assert [s for s in range(1, 10) if Checkpointer(CheckpointConfig(every_steps=4), tmp_path).due(s)] == [4, 8]
    assert not any(Checkpointer(CheckpointConfig(), tmp_path).due(s) for s in range(1, 10))


def test_restore_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    checkpointer = Checkpointer(CheckpointConfig(keep=3), tmp_path, LocalSession(tmp_path, device="cpu"))
    model, optimizer, scheduler = _parts()
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        _save(checkpointer, model, optimizer, scheduler, step=step, ap=0.0)
    newest = tmp_path / checkpoints.dir_name(3, 0) / checkpoints.CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:500])

    fresh, fresh_optimizer, fresh_scheduler = _parts()
    restored = checkpointer.restore(fresh, fresh_optimizer, fresh_scheduler)
    assert restored.progress["step"] == 2 and restored.path.name == checkpoints.dir_name(2, 0)
    assert torch.equal(fresh.weight, torch.full((2, 3), 2.0))
    assert len(restored.unreadable) == 1 and str(newest) in restored.unreadable[0]

    for step in (1, 2):
        file = tmp_path / checkpoints.dir_name(step, 0) / checkpoints.CHECKPOINT_FILE
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as failure:
        checkpointer.restore(*_parts())
    assert str(failure.value).count("unreadable checkpoint") == 3


def test_best_is_a_link_to_a_checkpoint_folder_not_a_copy(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "epoch": 0, "step": 2,
             "config": {}, "mlflow_run_id": "abc"}
    first = checkpoints.save(tmp_path / checkpoints.dir_name(2, 1), state)
    second = checkpoints.save(tmp_path / checkpoints.dir_name(4, 1), {**state, "step": 4})
    checkpoints.save(tmp_path / "best", state)  # a copy, as sdo < 0.3 left it
    checkpointer = Checkpointer(CheckpointConfig(), tmp_path)
    best = checkpointer.link_best(first)
    assert best.is_symlink() and os.readlink(best) == first.name  # relative: the run directory can move
    checkpointer.link_best(second)
    assert checkpoints.load(best)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", first.name, second.name]


def test_only_folders_ray_registered_survive_a_cleanup(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / checkpoints.dir_name(step, 0)).mkdir()
    # Ray Train V2 nests its checkpoint list as JSON inside JSON; only the names matter
    registered = json.dumps({"checkpoints": [{"checkpoint_dir_name": checkpoints.dir_name(s, 0)} for s in (1, 2)]})
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps({"snapshot": registered}))
    removed = Checkpointer(CheckpointConfig(), tmp_path).remove_unregistered()
    assert [p.name for p in removed] == [checkpoints.dir_name(3, 0)]
    assert [p.name for p in checkpoints.newest_first(tmp_path)] == [checkpoints.dir_name(s, 0) for s in (2, 1)]


def test_training_without_ray_stops_and_resumes_at_the_exact_step(tmp_path):
    """The same Trainer as a Ray Train worker, in this process: 3 epochs whole, and 2 epochs then 1 more from the
    checkpoint, end with the same weights and the same reports."""
    shards = make_shards(tmp_path, num_train=4, num_val=2, size=64)
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", checkpoint={"keep": 2},
                         epochs=3, max_steps_per_epoch=2)
    cfg.eval.dam_images = cfg.eval.pred_images = 0

    def run(name: str) -> RunIdentity:
        return RunIdentity(name=name, directory=str(tmp_path / "runs" / name), storage=str(tmp_path / "runs"))

    whole = train_without_ray(cfg, run("whole"), device="cpu")
    cfg.train.epochs = 2
    first = train_without_ray(cfg, run("split"), device="cpu")
    cfg.train.epochs = 3
    rest = train_without_ray(cfg, run("split"), device="cpu")

    assert [r["step"] for r in whole] == [2, 4, 6]
    assert [r["step"] for r in first + rest] == [2, 4, 6]
    for a, b in zip(whole, first + rest):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["AP"] == pytest.approx(b["AP"], abs=1e-6)
    weights = {name: checkpoints.load(checkpoints.newest_first(tmp_path / "runs" / name)[0])["model"]
               for name in ("whole", "split")}
    for key, value in weights["whole"].items():
        assert torch.allclose(value, weights["split"][key], atol=1e-6), key
    assert len(checkpoints.newest_first(tmp_path / "runs" / "split")) <= 2
    assert (tmp_path / "runs" / "split" / "eval" / "epoch_0002.json").is_file()
