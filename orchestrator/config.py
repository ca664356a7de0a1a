"""One typed config tree for every sdo run.

A config is a YAML file whose top-level sections mirror the dataclasses below. A file may name
another one with ``base: other.yaml`` (relative to itself); its fields are merged over the base's.
Command-line overrides ``--set a.b=value`` are parsed as YAML scalars and coerced to the field's
type. Every problem raises :class:`ConfigError` naming the offending key and value.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the value."""


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a one-line description (shown by `sdo config --help` and in dumps)."""
    kwargs = {"metadata": {"doc": text}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    name: str = doc("resnet18 | resnet34 | resnet50 | swin_t", "resnet50")
    weights: str | None = doc("torchvision ImageNet weight file (local path) or null for random", None)
    train: bool = doc("train the backbone (stem and layer1 stay frozen as in DETR)", True)
    dilation: bool = doc("replace stride with dilation in the last stage (DC5)", False)
    width: int = doc("ResNet stem channels, doubled by each later stage: 64 is torchvision's (ImageNet weights need it); "
                     "8-32 make a narrow net for CPU smoke runs and sweeps of tiny models", 64)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = doc("CNN/transformer that produces the multi-scale features", default_factory=BackboneConfig)
    num_classes: int = doc("classifier outputs (91 for COCO category ids, as official)", 91)
    hidden_dim: int = doc("transformer width d", 256)
    nheads: int = doc("attention heads", 8)
    enc_layers: int = doc("encoder layers", 6)
    dec_layers: int = doc("decoder layers", 6)
    dim_feedforward: int = doc("FFN hidden width", 1024)
    dropout: float = doc("dropout in the transformer", 0.1)
    num_feature_levels: int = doc("multi-scale feature levels (C3-C5 + one extra stride-2 conv)", 4)
    enc_n_points: int = doc("sampling points per head and level in the encoder", 4)
    dec_n_points: int = doc("sampling points per head and level in the decoder", 4)
    num_queries: int = doc("object queries (two-stage top-k proposals)", 300)
    position_embedding_scale: float = doc("scale of the sine positional encoding", 2 * math.pi)
    two_stage: bool = doc("two-stage top-k query selection from the encoder output", True)
    with_box_refine: bool = doc("iterative bounding-box refinement across decoder layers", True)
    aux_loss: bool = doc("auxiliary decoding losses at every decoder layer", True)
    rho: float = doc("encoder keep ratio: fraction of tokens the encoder updates (0 = dense Deformable DETR)", 0.0)
    use_enc_aux_loss: bool = doc("auxiliary detection heads and losses on every encoder layer's selected tokens", False)
    eff_query_init: bool = doc("initialise decoder queries from the selected encoder tokens (no pos_trans content)", False)
    eff_specific_head: bool = doc("separate detection heads for the two-stage proposals", False)
    im2col_step: int = doc("batch chunk of the deformable-attention op", 64)
    checkpoint: str | None = doc("weights to start from: an sdo checkpoint or an official {'model': ...} file", None)
    init_from: str | None = doc("fine-tune from these weights (a checkpoint file or directory, an official file, runs:/ or "
                                "models:/ URI); class heads of another size start afresh; ignored when resuming", None)


@dataclass
class LossConfig:
    set_cost_class: float = doc("Hungarian matching cost of the focal class term", 2.0)
    set_cost_bbox: float = doc("Hungarian matching cost of the L1 box term", 5.0)
    set_cost_giou: float = doc("Hungarian matching cost of the GIoU term", 2.0)
    cls_coef: float = doc("weight of the focal classification loss", 2.0)
    bbox_coef: float = doc("weight of the L1 box loss", 5.0)
    giou_coef: float = doc("weight of the GIoU loss", 2.0)
    focal_alpha: float = doc("alpha of the sigmoid focal loss", 0.25)
    mask_prediction_coef: float = doc("weight of the DAM (scoring-network) loss", 1.0)
    enc_aux_coef: float = doc("multiplier of the encoder auxiliary losses (on top of the main weights)", 1.0)


@dataclass
class DataConfig:
    train_shards: str = doc("training shards: a directory with index.json, a brace pattern, or a URL", "runs/data/shards/train")
    val_shards: str = doc("validation shards: a directory with index.json, a brace pattern, or a URL", "runs/data/shards/val")
    batch_size: int = doc("images per worker per step", 2)
    num_workers: int = doc("DataLoader worker processes per training worker", 2)
    shuffle_buffer: int = doc("sample shuffle buffer size (0 disables)", 1000)
    train_scales: list = doc("shorter-side sizes for multi-scale training resize", default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = doc("longest side after resize", 1333)
    val_scale: int = doc("shorter side at evaluation", 800)
    random_crop: bool = doc("DETR's random-size crop branch during training", True)
    max_skip_fraction: float = doc("share of an epoch's samples (per split, all ranks) that may be lost to corrupt data or index mismatches before the run fails", 0.01)


@dataclass
class TrainConfig:
    epochs: int = doc("training epochs", 50)
    lr: float = doc("base learning rate (AdamW)", 2e-4)
    lr_backbone: float = doc("learning rate of the backbone", 2e-5)
    lr_linear_proj_mult: float = doc("lr multiplier for sampling_offsets and reference_points", 0.1)
    weight_decay: float = doc("AdamW weight decay", 1e-4)
    lr_drop: int = doc("epoch at which the lr is divided by 10", 40)
    clip_max_norm: float = doc("gradient clipping max norm (0 disables)", 0.1)
    scale_lr: bool = doc("scale learning rates by sqrt(global_batch / 16) as official", True)
    num_workers: int = doc("Ray Train workers (one process each; one GPU each when use_gpu)", 1)
    use_gpu: bool = doc("train on GPUs (nccl); false = CPU (gloo)", False)
    cpus_per_worker: int = doc("CPUs reserved per Ray Train worker", 1)
    amp: str = doc("mixed precision on GPU: none (float32, the measured fastest: see README, Speed) | bf16 | fp16",
                   "none")
    tf32: bool = doc("float32 matmuls on GPU in TF32 (float32 accumulation; measured +5% per step)", True)
    compile: bool = doc("torch.compile the training forward (opt-in: the first steps pay the compile time, and "
                        "every new padded image size may compile again)", False)
    seed: int = doc("random seed", 42)
    log_every: int = doc("report training metrics every N steps", 10)
    max_steps_per_epoch: int | None = doc("cap on steps per epoch (null = full epoch from the index)", None)
    max_failures: int = doc("worker-group restarts from the latest checkpoint before giving up", 3)
    storage_path: str = doc("where runs, checkpoints and the embedded MLflow store live", "runs")
    crash_at_step: int | None = doc("fault-injection hook for tests: worker rank 1 exits once at this global step", None)


@dataclass
class CheckpointConfig:
    every_steps: int | None = doc("also checkpoint every N global steps inside an epoch (null = epoch ends only); "
                                  "a lost worker then costs at most N steps", None)
    keep: int = doc("checkpoint folders a run keeps, at most: the best by AP and the latest are always among them "
                    "(so 1 keeps 2 while they differ)", 2)
    log_final: bool = doc("also log the final training checkpoint (with optimizer state) as an MLflow artifact; the "
                          "best weights are always logged, as the run's MLflow Model", False)


@dataclass
class EvalConfig:
    every: int = doc("evaluate every N epochs (and after the last)", 1)
    max_dets: int = doc("detections kept per image by the post-processor", 100)
    dam_images: int = doc("validation images drawn with their selected tokens and DAM target at every eval (0 = none)", 4)
    pred_images: int = doc("validation images drawn with ground truth and detections at every eval (0 = none)", 4)
    pred_score_threshold: float = doc("the prediction pictures draw the 10 best detections that score at least this", 0.2)


@dataclass
class TrackingConfig:
    uri: str | None = doc("MLflow tracking URI; null = sqlite store under <storage_path>/mlflow", None)
    experiment: str = doc("MLflow experiment name", "sdo")
    system_metrics: bool = doc("log MLflow system metrics (CPU, memory, GPU) of every worker node", True)
    parent_run_id: str | None = doc("MLflow run to nest this run under (set by `sdo sweep` for its trials)", None)
    register_as: str | None = doc("register the run's MLflow Model (best weights) under this model-registry name", None)


@dataclass
class ClusterConfig:
    address: str = doc("local | http(s)://HEAD:8265 (Ray Jobs) | path to a KubeRay cluster spec (*.yaml)", "local")
    num_cpus: int | None = doc("CPUs of the embedded local Ray (null = all)", None)
    dashboard_port: int = doc("port of the embedded Ray dashboard (bound to 127.0.0.1)", 8265)
    backoff_limit: int = doc("RayJob backoffLimit: whole-job retries on Kubernetes, each on a fresh RayCluster that "
                             "continues the same run from train.storage_path", 0)
    ttl_seconds_after_finished: int = doc("RayJob ttlSecondsAfterFinished", 600)
    active_deadline_seconds: int | None = doc("RayJob activeDeadlineSeconds: KubeRay fails the job after this many "
                                              "seconds, retries included (null = no cap)", None)
    image: str | None = doc("container image of the head, workers and submitter on Kubernetes "
                            "(null = the cluster spec's own)", None)



def cluster_kind(address: str) -> str:
    """``cluster.address`` / ``--cluster`` -> 'local' | 'ray-jobs' (http(s)://HEAD:8265) | 'kubernetes' (a *.yaml
    KubeRay cluster spec). The one classifier: the dispatchers use it and runs are tagged with it."""
    if address == "local":
        return "local"
    if address.startswith(("http://", "https://")):
        return "ray-jobs"
    if address.endswith((".yaml", ".yml")):
        return "kubernetes"
    raise ConfigError(f"--cluster {address!r}: must be 'local', an http(s):// Ray dashboard address, or a *.yaml "
                      "KubeRay cluster spec")

@dataclass
class SweepConfig:
    space: dict = doc("search space: {config.key: {grid|choice: [...]} | {uniform|loguniform|randint: [lo, hi]}}", default_factory=dict)
    num_samples: int = doc("samples drawn from the space (grid axes are crossed with it)", 1)
    max_concurrent: int = doc("trials running at once", 2)
    scheduler: str = doc("asha | fifo", "asha")
    search: str = doc("random | optuna (optuna must be installed)", "random")
    metric: str = doc("metric the scheduler optimises (one objective; see objectives)", "AP")
    mode: str = doc("max | min", "max")
    objectives: list = doc("several objectives at once, e.g. [{metric: AP, mode: max}, {metric: latency_ms, mode: min}]: "
                           "a Pareto front (empty: metric/mode alone)", default_factory=list)
    optuna_sampler: str = doc("search=optuna: tpe | nsga2 (both handle several objectives)", "tpe")
    max_failures: int | None = doc("end the sweep once more trials than this have failed (null: never)", None)
    latency: str = doc("auto | always | off: measure each trial's eval latency (batch 1 and 4) where it trains; "
                       "auto: on GPUs only (without one GFLOPs stand in)", "auto")
    latency_size: list = doc("[height, width] of the images latency is measured on (the GFLOPs size by default)",
                             default_factory=lambda: [850, 1040])
    log_models: str = doc("front | best | none: which trials get an MLflow Model when the sweep ends", "front")
    best_k: int = doc("log_models=best: the k best trials by the first objective", 1)
    max_epochs: int | None = doc("epoch budget per trial (null = train.epochs)", None)
    grace_period: int = doc("ASHA: epochs before a trial can be stopped", 1)
    reduction_factor: int = doc("ASHA: keep 1/reduction_factor of the trials at each rung", 2)


@dataclass
class Config:
    model: ModelConfig = doc("the Sparse DETR network", default_factory=ModelConfig)
    loss: LossConfig = doc("matching costs and loss weights", default_factory=LossConfig)
    data: DataConfig = doc("shards, batching and augmentation", default_factory=DataConfig)
    train: TrainConfig = doc("optimisation and workers", default_factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("when to checkpoint, how many to keep", default_factory=CheckpointConfig)
    eval: EvalConfig = doc("COCO evaluation during training", default_factory=EvalConfig)
    tracking: TrackingConfig = doc("MLflow tracking", default_factory=TrackingConfig)
    cluster: ClusterConfig = doc("where the run executes", default_factory=ClusterConfig)
    sweep: SweepConfig = doc("Ray Tune sweep (used by `sdo sweep`)", default_factory=SweepConfig)


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------

_CHOICES = {
    "model.backbone.name": ("resnet18", "resnet34", "resnet50", "swin_t"),
    "train.amp": ("bf16", "fp16", "none"),
    "sweep.scheduler": ("asha", "fifo"),
    "sweep.search": ("random", "optuna"),
    "sweep.mode": ("max", "min"),
    "sweep.optuna_sampler": ("tpe", "nsga2"),
    "sweep.latency": ("auto", "always", "off"),
    "sweep.log_models": ("front", "best", "none"),
}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce a YAML value to a field's declared type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


# Keys that moved: a config written for an older sdo fails with one line naming the new key.
RENAMED = {
    "train.checkpoint_every": "checkpoint.every_steps",
    "train.keep_checkpoints": "checkpoint.keep",
    "tracking.log_checkpoints": "checkpoint.log_final",
}


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"config key {key!r} is now {RENAMED[key]!r}")
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance in place."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML config, resolving its ``base:`` chain (relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "space" else v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key with type coercion; raises ConfigError naming the key."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts[:-1]):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names or not dataclasses.is_dataclass(getattr(obj, part)):
            raise _unknown_key(".".join(parts[: i + 1]), names)
        obj = getattr(obj, part)
    names = [f.name for f in dataclasses.fields(obj)]
    if parts[-1] not in names:
        raise _unknown_key(key, names)
    if dataclasses.is_dataclass(getattr(obj, parts[-1])):
        _apply(getattr(obj, parts[-1]), value, key + ".")
        return
    setattr(obj, parts[-1], _coerce(key, value, _hints(type(obj))[parts[-1]]))


def get_value(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in [f.name for f in dataclasses.fields(obj)]:
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, part)
    return obj


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """YAML file (optional) + ``key=value`` overrides -> validated Config."""
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_yaml(Path(path)))
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def from_dict(values: dict) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. shipped to a Ray worker)."""
    cfg = Config()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted key -> value for every leaf (MLflow params)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def field_docs(cls=Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> one-line description, for every leaf field."""
    out = {}
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(field_docs(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("doc", "")
    return out


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the key and value."""
    for key, choices in _CHOICES.items():
        value = get_value(cfg, key)
        _check(value in choices, key, value, f"must be one of {', '.join(choices)}")
    m = cfg.model
    _check(m.backbone.width >= 4 and m.backbone.width % 4 == 0, "model.backbone.width", m.backbone.width,
           "must be a multiple of 4, at least 4")
    _check(m.backbone.width == 64 or not m.backbone.weights, "model.backbone.width", m.backbone.width,
           "ImageNet weights (model.backbone.weights) need the torchvision width 64")
    _check(m.backbone.width == 64 or m.backbone.name != "swin_t", "model.backbone.width", m.backbone.width,
           "applies to the ResNets only, not swin_t")
    _check(0.0 <= m.rho < 1.0, "model.rho", m.rho, "must be in [0, 1)")
    for key in ("num_classes", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
                "num_feature_levels", "enc_n_points", "dec_n_points", "num_queries", "im2col_step"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    _check(m.hidden_dim % m.nheads == 0, "model.hidden_dim", m.hidden_dim, f"must be divisible by model.nheads={m.nheads}")
    _check(1 <= m.num_feature_levels <= 4, "model.num_feature_levels", m.num_feature_levels, "must be 1..4")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(not (m.eff_query_init and not m.two_stage), "model.eff_query_init", m.eff_query_init, "needs model.two_stage=true")
    _check(not (m.rho > 0 and not m.two_stage), "model.rho", m.rho, "sparse encoder needs model.two_stage=true")
    _check(not (m.init_from and m.checkpoint), "model.init_from", m.init_from,
           "model.checkpoint is set too; use one of them (init_from for another class count)")
    _check(not (m.use_enc_aux_loss and not m.two_stage), "model.use_enc_aux_loss", m.use_enc_aux_loss, "needs model.two_stage=true")
    for f in dataclasses.fields(cfg.loss):
        value = getattr(cfg.loss, f.name)
        _check(value >= 0, f"loss.{f.name}", value, "must be >= 0")
    _check(0 < cfg.loss.focal_alpha < 1, "loss.focal_alpha", cfg.loss.focal_alpha, "must be in (0, 1)")
    _check(0.0 <= cfg.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", cfg.data.max_skip_fraction,
           "must be in [0, 1]")
    d = cfg.data
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0")
    _check(len(d.train_scales) > 0 and all(isinstance(s, int) and s > 0 for s in d.train_scales),
           "data.train_scales", d.train_scales, "must be a non-empty list of positive integers")
    _check(d.max_size >= max(d.train_scales), "data.max_size", d.max_size, "must be >= the largest train scale")
    _check(d.val_scale > 0, "data.val_scale", d.val_scale, "must be > 0")
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    for key in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(t.lr_drop >= 1, "train.lr_drop", t.lr_drop, "must be >= 1")
    _check(t.num_workers >= 1, "train.num_workers", t.num_workers, "must be >= 1")
    _check(t.cpus_per_worker >= 1, "train.cpus_per_worker", t.cpus_per_worker, "must be >= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch", t.max_steps_per_epoch, "must be >= 1 or null")
    _check(t.max_failures >= 0, "train.max_failures", t.max_failures, "must be >= 0")
    k = cfg.checkpoint
    _check(k.keep >= 1, "checkpoint.keep", k.keep, "must be >= 1")
    _check(k.every_steps is None or k.every_steps >= 1, "checkpoint.every_steps", k.every_steps, "must be >= 1 or null")
    _check(cfg.eval.every >= 1, "eval.every", cfg.eval.every, "must be >= 1")
    _check(1 <= cfg.eval.max_dets <= m.num_queries * max(m.num_classes, 1), "eval.max_dets", cfg.eval.max_dets, "must be >= 1")
    _check(cfg.eval.dam_images >= 0, "eval.dam_images", cfg.eval.dam_images, "must be >= 0")
    _check(cfg.eval.pred_images >= 0, "eval.pred_images", cfg.eval.pred_images, "must be >= 0")
    _check(0.0 <= cfg.eval.pred_score_threshold <= 1.0, "eval.pred_score_threshold", cfg.eval.pred_score_threshold,
           "must be in [0, 1]")
    c = cfg.cluster
    _check(c.address == "local" or c.address.startswith(("http://", "https://")) or c.address.endswith((".yaml", ".yml")),
           "cluster.address", c.address, "must be 'local', an http(s):// Ray dashboard address, or a *.yaml cluster spec")
    _check(c.num_cpus is None or c.num_cpus >= 1, "cluster.num_cpus", c.num_cpus, "must be >= 1 or null")
    _check(1 <= c.dashboard_port <= 65535, "cluster.dashboard_port", c.dashboard_port, "must be a TCP port")
    _check(c.backoff_limit >= 0, "cluster.backoff_limit", c.backoff_limit, "must be >= 0")
    _check(c.ttl_seconds_after_finished >= 0, "cluster.ttl_seconds_after_finished", c.ttl_seconds_after_finished, "must be >= 0")
    _check(c.active_deadline_seconds is None or c.active_deadline_seconds >= 1, "cluster.active_deadline_seconds",
           c.active_deadline_seconds, "must be >= 1 or null")
    _check(c.image is None or (isinstance(c.image, str) and c.image.strip() != ""), "cluster.image", c.image,
           "must be an image reference or null")
    s = cfg.sweep
    _check(s.num_samples >= 1, "sweep.num_samples", s.num_samples, "must be >= 1")
    _check(s.max_concurrent >= 1, "sweep.max_concurrent", s.max_concurrent, "must be >= 1")
    _check(s.max_epochs is None or s.max_epochs >= 1, "sweep.max_epochs", s.max_epochs, "must be >= 1 or null")
    _check(s.grace_period >= 1, "sweep.grace_period", s.grace_period, "must be >= 1")
    _check(s.reduction_factor >= 2, "sweep.reduction_factor", s.reduction_factor, "must be >= 2")
    _check(s.max_failures is None or s.max_failures >= 0, "sweep.max_failures", s.max_failures, "must be >= 0 or null")
    _check(s.best_k >= 1, "sweep.best_k", s.best_k, "must be >= 1")
    _check(len(s.latency_size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 128
                                            for v in s.latency_size),
           "sweep.latency_size", s.latency_size,
           "must be [height, width], each an integer >= 128 (the stride-64 level needs 2x2 values to normalise)")
    _check_objectives(s.objectives)


def _check_objectives(objectives: list) -> None:
    """``sweep.objectives``: a list of {metric: name, mode: max|min}, each metric once."""
    seen = set()
    for i, item in enumerate(objectives):
        key = f"sweep.objectives[{i}]"
        _check(isinstance(item, dict) and set(item) == {"metric", "mode"}, key, item, "must be {metric: NAME, mode: max|min}")
        _check(isinstance(item["metric"], str) and item["metric"] != "", f"{key}.metric", item["metric"],
               "must be a metric name")
        _check(item["mode"] in ("max", "min"), f"{key}.mode", item["mode"], "must be one of max, min")
        _check(item["metric"] not in seen, f"{key}.metric", item["metric"], "is named twice")
        seen.add(item["metric"])
