"""A sweep's search space: parsed from ``sweep.space``, checked against the config tree, turned into Tune.

``sweep.space`` maps dotted config keys to one distribution each::

    model.rho:            {grid: [0.1, 0.2, 0.3]}
    loss.enc_aux_coef:    {choice: [0.5, 1.0, 2.0]}
    loss.cls_coef:        {uniform: [1.0, 3.0]}
    loss.mask_prediction_coef: {loguniform: [0.1, 10.0]}
    model.dec_n_points:   {randint: [2, 6]}        # high excluded, as in tune.randint

Every candidate value (each listed value, both ends of a range) is applied to the base config and
validated, so a sweep that could produce an invalid trial fails before anything starts, with a
:class:`ConfigError` naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from typing import Any

from orchestrator.config import Config, ConfigError, set_value, validate

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# The knobs the sweep is built for; any other leaf key may be swept too.
FIRST_CLASS_KEYS = ("model.rho", "loss.enc_aux_coef", "loss.mask_prediction_coef", "loss.cls_coef",
                    "loss.bbox_coef", "loss.giou_coef")
# Sections that describe the sweep itself or where it runs: one value for all trials.
_NOT_SWEEPABLE = ("sweep.", "cluster.", "tracking.")
_NOT_SWEEPABLE_KEYS = {"train.epochs": "the per-trial budget is sweep.max_epochs",
                       "train.storage_path": "every trial's runs live under the sweep's directory"}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept key: ``kind`` in DISTRIBUTIONS; ``values`` the listed values or (low, high)."""

    key: str
    kind: str
    values: tuple

    @property
    def is_range(self) -> bool:
        return self.kind in ("uniform", "loguniform", "randint")


def _leaf_types(cls=Config, prefix: str = "") -> dict[str, type]:
    """Dotted leaf key -> declared type of the field (``Optional[X]`` -> X)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_types(hint, f"{prefix}{f.name}."))
            continue
        if typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[f"{prefix}{f.name}"] = typing.get_origin(hint) or hint
    return out


def _where(key: str) -> str:
    return f"sweep.space.{key}"


def _check_key(key: Any, known: dict[str, type]) -> None:
    if not isinstance(key, str) or key not in known:
        close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"sweep.space: unknown config key {key!r}{hint}")
    if key.startswith(_NOT_SWEEPABLE):
        raise ConfigError(f"{_where(key)}: cannot be swept (one value for the whole sweep)")
    if key in _NOT_SWEEPABLE_KEYS:
        raise ConfigError(f"{_where(key)}: cannot be swept ({_NOT_SWEEPABLE_KEYS[key]})")


def _parse_axis(key: str, spec: Any, kind_of_value: type) -> Axis:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{_where(key)}: expected one of {{{'|'.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{_where(key)}: unknown distribution {kind!r} (use one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{_where(key)}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{_where(key)}: {kind} lists a value twice: {values!r}")
        return Axis(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{_where(key)}: {kind} needs [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{_where(key)}: {kind} range [{low}, {high}] is empty (need low < high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{_where(key)}: loguniform needs low > 0, got [{low}, {high}]")
    if kind == "randint":
        if not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{_where(key)}: randint needs integer bounds, got {values!r}")
        if kind_of_value is not int:
            raise ConfigError(f"{_where(key)}: randint draws integers but the field holds {kind_of_value.__name__}")
        if high - low < 2:
            raise ConfigError(f"{_where(key)}: randint [{low}, {high}) holds a single value; use grid")
        return Axis(key, kind, (int(low), int(high)))
    if kind_of_value not in (float, int):
        raise ConfigError(f"{_where(key)}: {kind} draws numbers but the field holds {kind_of_value.__name__}")
    if kind_of_value is int:
        raise ConfigError(f"{_where(key)}: {kind} draws floats but the field is an integer; use randint or grid")
    return Axis(key, kind, (float(low), float(high)))


def _candidates(axis: Axis) -> list:
    """The values whose validity proves every draw valid (ranges: both ends; the fields' checks are intervals)."""
    if axis.kind == "randint":
        return [axis.values[0], axis.values[1] - 1]
    return list(axis.values)


def _check_values(base: Config, axis: Axis) -> None:
    for value in _candidates(axis):
        trial = copy.deepcopy(base)
        try:
            set_value(trial, axis.key, value)
            validate(trial)
        except ConfigError as err:
            raise ConfigError(f"{_where(axis.key)}: value {value!r} is invalid: {err}") from None


def parse_space(cfg: Config) -> list[Axis]:
    """``cfg.sweep.space`` -> axes, each key and every candidate value checked against ``cfg``.

    Raises ConfigError naming ``sweep.space.<key>`` (unknown key, bad distribution, empty or
    out-of-range interval, a value the config rejects, or grid with Optuna).
    """
    space = cfg.sweep.space
    if not space:
        raise ConfigError("sweep.space: empty; name at least one config key to sweep")
    known = _leaf_types()
    axes = []
    for key, spec in space.items():
        _check_key(key, known)
        axis = _parse_axis(key, spec, known[key])
        _check_values(cfg, axis)
        if cfg.sweep.search == "optuna" and axis.kind == "grid":
            raise ConfigError(f"{_where(key)}: grid is not supported with sweep.search=optuna; use choice")
        axes.append(axis)
    return axes


def grid_size(axes: list[Axis]) -> int:
    """Trials per sample: the product of the grid axes (1 when there is none)."""
    return math.prod(len(a.values) for a in axes if a.kind == "grid")


def num_trials(cfg: Config, axes: list[Axis]) -> int:
    """Trials the sweep will run: grid points x sweep.num_samples (Tune crosses them)."""
    return grid_size(axes) * cfg.sweep.num_samples


def to_tune(axes: list[Axis]) -> dict[str, Any]:
    """Tune ``param_space``: dotted key -> tune domain (grid_search for grid axes)."""
    from ray import tune

    make = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {a.key: make[a.kind](a.values) for a in axes}


def trial_config(base: Config, params: dict[str, Any], *, epochs: int, parent_run_id: str | None = None,
                 tracking_uri: str | None = None) -> Config:
    """The config one trial trains with: ``base`` + the trial's sampled ``params`` + its budget."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_value(cfg, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from Tune
    cfg.train.epochs = epochs
    if parent_run_id is not None:
        cfg.tracking.parent_run_id = parent_run_id
    if tracking_uri is not None:
        cfg.tracking.uri = tracking_uri
    validate(cfg)
    return cfg


def budget(cfg: Config) -> int:
    """Epochs per trial: sweep.max_epochs, else train.epochs."""
    return cfg.sweep.max_epochs or cfg.train.epochs


def describe_space(axes: list[Axis]) -> dict[str, str]:
    """Key -> 'grid [0.1, 0.2]' style text (MLflow params of the parent run)."""
    return {a.key: f"{a.kind} {list(a.values)}" for a in axes}


def make_search(cfg: Config, objectives: list | None = None):
    """Tune's grid/random variant generator, or OptunaSearch (``sweep.optuna_sampler``: TPE or NSGA-II); both
    seeded by ``train.seed`` so that the same sweep config samples the same trials (an interrupted sweep can be
    compared with a whole one). ``objectives`` (pareto.Objective): with more than one, Optuna searches them
    all at once (a multi-objective study), each trial told its objectives' values."""
    if cfg.sweep.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        # the concurrency limit goes into the generator: Tune ignores max_concurrent_trials beside one
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.sweep.max_concurrent)
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweep.search=optuna: optuna is not installed (pip install 'sdo[optuna]')") from None
    from ray.tune.search.optuna import OptunaSearch

    seed = cfg.train.seed
    sampler = (optuna.samplers.NSGAIISampler(seed=seed) if cfg.sweep.optuna_sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=seed))
    if objectives is not None and len(objectives) > 1:
        return OptunaSearch(metric=[o.metric for o in objectives], mode=[o.mode for o in objectives], sampler=sampler)
    return OptunaSearch(sampler=sampler)
