"""Fine-tune from official weights on other classes, then use the run: its MLflow Model, `sdo predict`, `sdo eval`.

One real run serves every assertion (Ray start-up dominates the cost): a 6-output (5 synthetic shapes
+ background id 0) Sparse DETR starts from a 91-class checkpoint in the official layout written here,
trains two steps on real shards under Ray Train, logs its MLflow Model and registers it.
"""
from __future__ import annotations

import argparse
import json
import shutil

import mlflow.artifacts
import mlflow.pytorch
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

from model.build import build_model
from orchestrator.cli import main
from orchestrator.cluster.dispatch import train_on
from orchestrator.cluster.local import ray_session
from orchestrator.config import load_config
from orchestrator.run import checkpoints
from orchestrator.run.weights import read_weights
from pipelines.coco_eval import evaluate, ground_truth

FROZEN = "backbone.0.body.conv1.weight"  # the stem never trains (as in DETR)
REGISTERED = "sdo-shapes"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    shards = make_shards(root, num_train=8, num_val=4, size=96)
    path, _ = tiny_config(root / "tiny.yaml", shards, root / "runs")
    official_cfg = load_config(path)
    official_cfg.model.num_classes = 91
    torch.manual_seed(123)
    official = build_model(official_cfg.model).state_dict()
    official_file = root / "official_r91.pth"
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "epoch": 49, "args": argparse.Namespace(num_classes=91)}, official_file)

    values = yaml.safe_load(path.read_text())
    values["model"].update(num_classes=6, init_from=str(official_file))
    values["train"].update(num_workers=1, epochs=1)
    # one image per batch in the comparison: at 128 px even the coarsest level (stride 64) has 2 x 2 tokens
    values["data"].update(val_scale=128, max_size=160)
    values["tracking"] = {"register_as": REGISTERED}
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    cfg = load_config(path)
    with ray_session(cfg):
        summary = train_on(cfg, cluster="local", name="shapes", echo=lambda line: None)
    best_dir = root / "runs" / "shapes" / "best"
    return {"root": root, "config": path, "cfg": cfg, "official": official, "official_file": official_file,
            "summary": summary, "best_dir": best_dir, "best": checkpoints.load(best_dir)["model"],
            "client": MlflowClient(summary["run"].tracking_uri)}


def test_fine_tuning_starts_from_the_official_weights(run):
    best, official = run["best"], run["official"]
    torch.manual_seed(run["cfg"].train.seed)
    fresh = build_model(run["cfg"].model).state_dict()  # what the run would have started from without init_from
    assert torch.equal(best[FROZEN], official[FROZEN])
    assert not torch.equal(best[FROZEN], fresh[FROZEN])
    # trained layers moved away from the official values, but only a little (two steps)
    moved = best["transformer.level_embed"] - official["transformer.level_embed"]
    assert 0 < moved.abs().max() < 0.05
    assert best["class_embed.0.weight"].shape == (6, 32) and official["class_embed.0.weight"].shape == (91, 32)

    tags = run["client"].get_run(run["summary"]["mlflow_run_id"]).data.tags
    assert tags["sdo.init_from"] == str(run["official_file"])
    reinitialised = tags["sdo.reinitialised_keys"].split(", ")
    assert {"class_embed.0.weight", "class_embed.0.bias", "transformer.decoder.class_embed.2.bias",
            "transformer.encoder.class_embed.0.weight"} <= set(reinitialised)
    assert all("class_embed." in key for key in reinitialised)


def test_the_best_weights_are_an_mlflow_model_and_a_registered_version(run, tmp_path):
    uri, run_id = run["summary"]["run"].tracking_uri, run["summary"]["mlflow_run_id"]
    assert run["summary"]["model_uri"] == f"runs:/{run_id}/model"
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model", dst_path=str(tmp_path),
                                                tracking_uri=uri)
    mlmodel = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())
    assert "signature" in mlmodel and "saved_input_example_info" in mlmodel
    detector = mlflow.pytorch.load_model(local)
    assert not any(k.startswith("optimizer") for k in detector.state_dict())
    for key, value in run["best"].items():
        assert torch.equal(detector.detector.state_dict()[key], value), key
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        packed = detector(images)
        reference = detector.detector(images, torch.zeros(1, 64, 80, dtype=torch.bool))
    torch.testing.assert_close(packed[..., 4:], reference["pred_logits"])
    torch.testing.assert_close(packed[..., :4], reference["pred_boxes"])

    versions = MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{REGISTERED}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run_id
    registered = read_weights(f"models:/{REGISTERED}/1", uri)
    assert registered.config["model"]["num_classes"] == 6
    for key, value in run["best"].items():
        assert torch.equal(registered.state[key], value), key


def _coco_results(detections: dict, ids_by_file: dict) -> list[dict]:
    file_of = {image["id"]: image["file_name"] for image in detections["images"]}
    return [{"image_id": ids_by_file[file_of[a["image_id"]].rsplit("/", 1)[-1]], "category_id": a["category_id"],
             "bbox": a["bbox"], "score": a["score"]} for a in detections["annotations"]]


def test_predict_on_the_val_images_is_what_eval_scores(run, tmp_path):
    root = run["root"]
    images = tmp_path / "images"
    shutil.copytree(root / "coco" / "val", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", "--model", str(run["best_dir"]), str(images), "--out", str(out),
                                       "--score-threshold", "0", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["images"], summary["skipped"]) == (4, 1)
    detections = json.loads((out / "detections.json").read_text())
    assert [c["name"] for c in detections["categories"]] == ["rectangle", "ellipse", "triangle", "diamond", "cross"]
    assert len(detections["annotations"]) == 4 * run["cfg"].eval.max_dets
    assert sorted(p.name for p in (out / "pictures").iterdir()) == sorted(p.name for p in (root / "coco" / "val").iterdir())

    gt = ground_truth(run["cfg"].data.val_shards)
    ids_by_file = {image["file_name"].rsplit("/", 1)[-1]: image["id"] for image in gt["images"]}
    predicted_metrics = evaluate(_coco_results(detections, ids_by_file), gt)

    run_id = run["summary"]["mlflow_run_id"]
    result = CliRunner().invoke(main, ["eval", "--config", str(run["config"]), "--checkpoint", f"runs:/{run_id}/model",
                                       "--set", "data.batch_size=1", "--out", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    eval_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: float(v) for k, v in predicted_metrics.items()} == eval_metrics
    assert eval_metrics["AP50"] >= 0.0 and set(eval_metrics) >= {"AP", "AR100"}


def test_bad_model_inputs_exit_2_with_one_line(run, tmp_path):
    image = str(run["root"] / "coco" / "val")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    uri = run["summary"]["run"].tracking_uri
    cases = {
        str(tmp_path / "absent.pth"): ("absent.pth", "no such checkpoint"),
        str(tmp_path / "notes.txt"): ("notes.txt", "cannot read"),
        f"runs:/{'0' * 32}/model": ("runs:/", "does not resolve"),
        "models:/no-such-model/1": ("no-such-model", "does not resolve"),
    }
    for model, expected in cases.items():
        result = CliRunner().invoke(main, ["predict", "--model", model, image, "--out", str(tmp_path / "o"),
                                           "--tracking-uri", uri])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (model, result.output)
        assert all(word in lines[0] for word in expected), lines[0]
    # 91-class official weights into the configured 6-class model, without init_from
    config = tmp_path / "no_init.yaml"
    values = yaml.safe_load(run["config"].read_text())
    values["model"].pop("init_from")
    config.write_text(yaml.safe_dump(values))
    result = CliRunner().invoke(main, ["predict", "--model", str(run["official_file"]), "--config", str(config), image,
                                       "--out", str(tmp_path / "o")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "class_embed.0.weight (91, 32) != (6, 32)" in lines[0] and "model.init_from" in lines[0]
    assert not (tmp_path / "o").exists()
