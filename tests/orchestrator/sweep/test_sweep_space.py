"""The sweep's search space: parsing, validation against the config tree, Tune domains, the CLI's exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import Config, ConfigError, load_config, set_value
from orchestrator.sweep.pareto import Objective
from orchestrator.sweep.schedulers import make_scheduler
from orchestrator.sweep.space import (
    grid_size,
    make_search,
    num_trials,
    parse_space,
    to_tune,
    trial_config,
)


def _cfg(space: dict, **sweep) -> Config:
    cfg = Config()
    set_value(cfg, "sweep.space", space)
    for key, value in sweep.items():
        set_value(cfg, f"sweep.{key}", value)
    return cfg


def test_first_class_keys_parse_and_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = _cfg({"model.rho": {"grid": [0.1, 0.2, 0.3]}, "loss.enc_aux_coef": {"choice": [0.5, 1.0]},
                "loss.mask_prediction_coef": {"loguniform": [0.1, 10]}, "loss.cls_coef": {"uniform": [1, 3]},
                "loss.bbox_coef": {"choice": [4.0, 5.0]}, "loss.giou_coef": {"uniform": [1.0, 2.5]},
                "model.dec_n_points": {"randint": [2, 5]}}, num_samples=4)
    axes = parse_space(cfg)
    assert [a.key for a in axes][:2] == ["model.rho", "loss.enc_aux_coef"]
    assert grid_size(axes) == 3 and num_trials(cfg, axes) == 12
    space = to_tune(axes)
    assert space["model.rho"] == {"grid_search": [0.1, 0.2, 0.3]}
    assert isinstance(space["loss.enc_aux_coef"], Categorical) and space["loss.enc_aux_coef"].categories == [0.5, 1.0]
    assert isinstance(space["loss.mask_prediction_coef"], Float)
    assert (space["loss.mask_prediction_coef"].lower, space["loss.mask_prediction_coef"].upper) == (0.1, 10.0)
    assert isinstance(space["model.dec_n_points"], Integer) and space["model.dec_n_points"].upper == 5


def test_trial_config_applies_params_budget_and_parent():
    base = _cfg({"model.rho": {"grid": [0.1, 0.5]}})
    base.model.two_stage = True
    cfg = trial_config(base, {"model.rho": 0.5, "loss.cls_coef": 3}, epochs=7, parent_run_id="abc",
                       tracking_uri="sqlite:///x.db")
    assert (cfg.model.rho, cfg.loss.cls_coef, cfg.train.epochs) == (0.5, 3.0, 7)
    assert (cfg.tracking.parent_run_id, cfg.tracking.uri) == ("abc", "sqlite:///x.db")
    assert base.model.rho == 0.0 and base.train.epochs == 50  # the base is left alone


@pytest.mark.parametrize("space, message", [
    ({"model.rhoo": {"grid": [0.1]}}, "unknown config key 'model.rhoo' (did you mean model.rho?)"),
    ({"loss.enc_aux": {"choice": [1.0]}}, "unknown config key 'loss.enc_aux' (did you mean loss.enc_aux_coef?)"),
    ({"model.rho": {"uniform": [0.2, 1.5]}}, "sweep.space.model.rho: value 1.5 is invalid: model.rho=1.5: must be in [0, 1)"),
    ({"model.rho": {"grid": [0.1, -0.2]}}, "sweep.space.model.rho: value -0.2 is invalid"),
    ({"loss.cls_coef": {"uniform": [3.0, 1.0]}}, "sweep.space.loss.cls_coef: uniform range [3.0, 1.0] is empty"),
    ({"loss.cls_coef": {"loguniform": [0.0, 1.0]}}, "sweep.space.loss.cls_coef: loguniform needs low > 0"),
    ({"loss.cls_coef": {"normal": [0.0, 1.0]}}, "sweep.space.loss.cls_coef: unknown distribution 'normal'"),
    ({"loss.cls_coef": [1.0, 2.0]}, "sweep.space.loss.cls_coef: expected one of {grid|choice|uniform|loguniform|randint"),
    ({"loss.cls_coef": {"uniform": [1.0]}}, "sweep.space.loss.cls_coef: uniform needs [low, high] numbers"),
    ({"loss.cls_coef": {"grid": []}}, "sweep.space.loss.cls_coef: grid needs a non-empty list"),
    ({"loss.cls_coef": {"randint": [1, 4]}}, "sweep.space.loss.cls_coef: randint draws integers but the field holds float"),
    ({"model.enc_layers": {"uniform": [1, 4]}}, "sweep.space.model.enc_layers: uniform draws floats but the field is an integer"),
    ({"model.enc_layers": {"randint": [0, 3]}}, "sweep.space.model.enc_layers: value 0 is invalid"),
    ({"sweep.num_samples": {"grid": [1, 2]}}, "sweep.space.sweep.num_samples: cannot be swept"),
    ({"train.epochs": {"grid": [1, 2]}}, "sweep.space.train.epochs: cannot be swept (the per-trial budget is sweep.max_epochs)"),
    ({}, "sweep.space: empty"),
])
def test_invalid_space_names_the_key(space, message):
    with pytest.raises(ConfigError) as err:
        parse_space(_cfg(space))
    assert message in str(err.value)


def test_grid_with_optuna_and_missing_optuna_are_config_errors():
    with pytest.raises(ConfigError, match="sweep.space.model.rho: grid is not supported with sweep.search=optuna"):
        parse_space(_cfg({"model.rho": {"grid": [0.0, 0.1]}}, search="optuna"))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="sweep.search=optuna: optuna is not installed"):
            make_search(_cfg({"loss.cls_coef": {"choice": [1.0, 2.0]}}, search="optuna"))
    else:
        assert make_search(_cfg({"loss.cls_coef": {"choice": [1.0, 2.0]}}, search="optuna")) is not None


def test_schedulers_and_their_rungs():
    cfg = _cfg({"loss.cls_coef": {"choice": [1.0, 2.0]}}, max_epochs=8, grace_period=2, reduction_factor=2)
    asha = make_scheduler(cfg)
    assert (asha._max_t, asha._time_attr, asha.budget) == (8, "epochs_done", 8)
    assert [m for m, _ in asha._brackets[0]._rungs] == [8, 4, 2]
    set_value(cfg, "sweep.grace_period", 8)
    with pytest.raises(ConfigError, match="sweep.grace_period=8: must be < the per-trial budget of 8"):
        make_scheduler(cfg)
    set_value(cfg, "sweep.scheduler", "fifo")
    assert type(make_scheduler(cfg)).__name__ == "FIFOScheduler"
    set_value(cfg, "sweep.scheduler", "asha")
    set_value(cfg, "sweep.grace_period", 1)
    several = [Objective("AP", "max"), Objective("gflops", "min")]
    mo = make_scheduler(cfg, several)
    assert type(mo).__name__ == "MultiObjectiveASHA" and sorted(mo.rungs) == [1, 2, 4]  # the same rungs as ASHA's
    assert mo.objectives == several and mo.budget == 8
    assert type(make_scheduler(cfg, several[:1])).__name__ == "EpochASHA"  # one objective: plain ASHA


GOOD_SPACE = {"model.rho": {"grid": [0.1]}}


@pytest.mark.parametrize("space, sweep, key", [
    ({"model.rhoo": {"grid": [0.1]}}, {}, "model.rhoo"),
    ({"model.rho": {"uniform": [0.1, 1.2]}}, {}, "sweep.space.model.rho"),
    ({"loss.giou_coef": {"gauss": [1, 2]}}, {}, "sweep.space.loss.giou_coef"),
    (GOOD_SPACE, {"objectives": [{"metric": "AP", "mode": "max"}, {"metric": "latncy_ms", "mode": "min"}]},
     "sweep.objectives[1].metric='latncy_ms': no trial reports it"),
    (GOOD_SPACE, {"objectives": [{"metric": "AP", "mode": "maximize"}]}, "sweep.objectives[0].mode='maximize'"),
    (GOOD_SPACE, {"objectives": [{"metric": "AP"}]}, "sweep.objectives[0]="),
    (GOOD_SPACE, {"metric": "mAP"}, "sweep.metric='mAP': no trial reports it"),
    (GOOD_SPACE, {"mode": "up"}, "sweep.mode='up'"),
])
def test_cli_exits_2_naming_the_key(tmp_path, space, sweep, key):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": {"storage_path": str(tmp_path / "runs")},
                                    "sweep": {"space": space, **sweep}}))
    result = CliRunner().invoke(main, ["sweep", "--config", str(path), "--name", "bad"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("sdo: error: ") and key in result.output
    assert not (tmp_path / "runs").exists()  # nothing written for a bad sweep


def test_shipped_sweep_configs_are_valid():
    rho = load_config(CONFIGS / "sweep_rho.yaml")
    axes = parse_space(rho)
    assert {a.key: list(a.values) for a in axes}["model.rho"] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert num_trials(rho, axes) == 15 and rho.model.backbone.name == "resnet50"
    demo = load_config(CONFIGS / "sweep_demo.yaml")
    assert num_trials(demo, parse_space(demo)) == 4
    assert (demo.train.num_workers, demo.sweep.scheduler) == (1, "asha")


def test_dry_run_prints_the_plan(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"train": {"storage_path": str(tmp_path / "runs")},
                                    "sweep": {"space": {"loss.cls_coef": {"grid": [1.0, 2.0, 3.0]}}, "num_samples": 2}}))
    result = CliRunner().invoke(main, ["sweep", "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"trials": 6' in result.output and '"loss.cls_coef": "grid [1.0, 2.0, 3.0]"' in result.output
    assert not (tmp_path / "runs").exists()


CONFIGS = Path(__file__).resolve().parents[3] / "configs"
K8S_SPEC = CONFIGS.parent / "deploy" / "k8s.yaml"


def test_kuberay_dry_run_renders_a_rayjob_running_sdo_sweep():
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_rho.yaml"), "--cluster", str(K8S_SPEC),
                                       "--set", "train.num_workers=2", "--name", "rho-sweep", "--dry-run"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith("sdo sweep --config ")
    assert rayjob["spec"]["entrypoint"].endswith("--name rho-sweep")
    shipped = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = yaml.safe_load(next(iter(shipped["data"].values())))
    assert cfg["sweep"]["space"]["model.rho"] == {"grid": [0.1, 0.2, 0.3, 0.4, 0.5]}


def test_ray_jobs_dry_run_ships_the_config_and_the_sweep_entrypoint():
    import json

    remote = ["--set", "train.storage_path=/mnt/sdo/runs", "--set", "data.train_shards=/mnt/sdo/shards/train",
              "--set", "data.val_shards=/mnt/sdo/shards/val"]
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_demo.yaml"), "--cluster",
                                       "http://127.0.0.1:8265", "--name", "d1", "--resume", "--dry-run", *remote])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["entrypoint"] == "python -m orchestrator.sweep --name d1 --resume"
    shipped = yaml.safe_load(plan["runtime_env"]["env_vars"]["SDO_CONFIG_YAML"])
    assert shipped["cluster"]["address"] == "local" and shipped["sweep"]["max_epochs"] == 4
    assert shipped["train"]["storage_path"] == "/mnt/sdo/runs"


def test_ray_jobs_sweep_refuses_relative_paths_the_head_cannot_resolve():
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_demo.yaml"), "--cluster",
                                       "http://127.0.0.1:8265", "--name", "d1", "--dry-run"])
    assert result.exit_code == 2 and "train.storage_path" in result.output


def test_invalid_space_is_reported_before_any_cluster_is_contacted():
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_demo.yaml"), "--cluster",
                                       "http://127.0.0.1:1", "--set", "sweep.space={model.rho: {grid: [2.0]}}"])
    assert result.exit_code == 2 and "sweep.space.model.rho: value 2.0 is invalid" in result.output


def test_resume_on_a_kuberay_spec_is_refused():
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_demo.yaml"), "--cluster", str(K8S_SPEC),
                                       "--name", "rho-sweep", "--resume", "--dry-run"])
    assert result.exit_code == 2 and "--resume with --cluster" in result.output


def test_resume_needs_the_sweep_name():
    result = CliRunner().invoke(main, ["sweep", "--config", str(CONFIGS / "sweep_demo.yaml"), "--resume"])
    assert result.exit_code == 2 and "--resume needs the --name" in result.output


def test_optuna_searches_several_objectives_at_once():
    import optuna

    cfg = _cfg({"loss.cls_coef": {"choice": [1.0, 2.0]}, "model.rho": {"uniform": [0.1, 0.5]}}, search="optuna",
               optuna_sampler="nsga2")
    searcher = make_search(cfg, [Objective("AP", "max"), Objective("latency_ms", "min")])
    # what Tune does with it when TuneConfig names no single metric
    assert searcher.set_search_properties(None, None, to_tune(parse_space(cfg)))
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    params = searcher.suggest("t1")
    assert params["loss.cls_coef"] in (1.0, 2.0) and 0.1 <= params["model.rho"] <= 0.5
    searcher.on_trial_complete("t1", {"AP": 0.4, "latency_ms": 12.0})
    assert [t.values for t in study.trials] == [[0.4, 12.0]]
    single = make_search(cfg, [Objective("AP", "max")])
    assert single.set_search_properties("AP", "max", to_tune(parse_space(cfg)))
    assert [d.name for d in single._ot_study.directions] == ["MAXIMIZE"]
