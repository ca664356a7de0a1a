"""`sdo data synth|shard`: summaries on success, exit 2 with one line on bad input, no clobbering."""
import json

from click.testing import CliRunner

from orchestrator.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_synth_then_shard_and_refusals(tmp_path):
    coco = tmp_path / "coco"
    result = _run("data", "synth", "--out", str(coco), "--train", "4", "--val", "2", "--size", "48", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "train: 4 images" in result.output and "val: 2 images" in result.output

    result = _run("data", "synth", "--out", str(coco), "--train", "1", "--val", "1")
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output

    shards = tmp_path / "shards"
    args = ["data", "shard", "--images", str(coco / "train"), "--annotations",
            str(coco / "annotations" / "instances_train.json"), "--out", str(shards), "--shard-size", "3"]
    result = _run(*args, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "2 shards" in result.output
    index_before = (shards / "index.json").read_bytes()

    result = _run(*args, "--no-progress")
    assert result.exit_code == 2 and str(shards) in result.output
    assert (shards / "index.json").read_bytes() == index_before

    result = _run(*args, "--no-progress", "--overwrite", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["num_samples"] == 4


def test_shard_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "broken.json").write_text("[1, 2")
    for annotations, culprit in ((tmp_path / "missing.json", "missing.json"), (tmp_path / "broken.json", "broken.json")):
        result = _run("data", "shard", "--images", str(tmp_path / "images"), "--annotations", str(annotations),
                      "--out", str(tmp_path / "out"))
        assert result.exit_code == 2
        assert result.output.startswith("sdo: error:") and culprit in result.output
        assert len(result.output.strip().splitlines()) == 1
    result = _run("data", "shard", "--images", str(tmp_path / "images"), "--annotations",
                  str(tmp_path / "broken.json"), "--out", str(tmp_path / "out"), "--shard-size", "0")
    assert result.exit_code == 2
