"""Training configuration: one dataclass tree, named presets as small overrides, and the command line.

Every leaf field of :class:`TrainConfig` can be set from the command line by its dotted name::

    python -m train.run --optim.lr_per_256 0.5 --model.arch resnet50
    python -m train.run --set optim.lr_per_256=0.5 --set model.arch=resnet50

A preset (``--preset NAME``) is applied first, then the overrides (``--FIELD``, ``--set`` and the
aliases alike) in the order given: of two settings of one field, the later wins. The defaults
of the nested method configs (model, region, soco_aug, view, colour) are the paper's values; the presets say
what changes for a given job.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import math
import re
import tokenize
import types
import typing
from dataclasses import dataclass, field

from d3ssl.cli import ArgumentParser
from d3ssl.augment.stage import RegionConfig, SocoAugConfig
from d3ssl.data.colour import ColourConfig
from d3ssl.data.views import ViewConfig
from d3ssl.model import ModelConfig


@dataclass
class DataConfig:
    path: str | None = field(default=None, metadata={"help": (
        "training images: a COCO-format dataset root (train/ or train2017/, annotations/"
        "instances_train.json or instances_train2017.json), an instances JSON, an image folder, "
        "or empty for the embedded synthetic set")})
    proposals: str | None = field(default=None, metadata={"help": (
        "proposals store; default: the dataset's default store path, generated there if missing")})
    backend: str = field(default="cpu", metadata={"help": "loader backend: cpu or dali"})
    batch_size: int = field(default=64, metadata={"help": "images per step per process"})
    workers: int = field(default=2, metadata={"help": "loader worker processes per process"})
    proposal_workers: int | None = field(default=None, metadata={"help": (
        "processes for proposal generation when the store is missing (none or 0: all cores)")})
    synthetic_seed: int = field(default=0, metadata={"help": "seed of the embedded synthetic set"})
    synthetic_train: int = field(default=2000, metadata={"help": "synthetic set: train images"})
    synthetic_val: int = field(default=300, metadata={"help": "synthetic set: val images (O-KNN queries)"})
    synthetic_size: tuple[int, int] = field(default=(160, 224), metadata={"help": (
        "synthetic set: min,max image side in pixels")})
    # A few large objects: at the small job's image sizes an object then spans more than one C5 cell.
    synthetic_objects: tuple[int, int] = field(default=(1, 3), metadata={"help": (
        "synthetic set: min,max objects per image")})
    synthetic_object_frac: tuple[float, float] = field(default=(0.3, 0.6), metadata={"help": (
        "synthetic set: min,max object side / shorter image side")})
    synthetic_root: str | None = field(default=None, metadata={"help": (
        "cache folder of the synthetic set (default: $D3SSL_CACHE or ~/.cache/d3ssl)")})


    def __post_init__(self):
        _at_least(self, "data", batch_size=1, workers=0, synthetic_train=1, synthetic_val=0)
        if self.proposal_workers is not None:
            _at_least(self, "data", proposal_workers=0)
        if self.backend not in ("cpu", "dali"):
            raise ValueError(f"data.backend must be cpu or dali, got {self.backend!r}")

    def ensure_synthetic(self, workers: int | None = None) -> str:
        """The embedded synthetic set these fields describe, generated on first use; its root."""
        from d3ssl.data.synthetic import ensure_synthetic
        return ensure_synthetic(root=self.synthetic_root, seed=self.synthetic_seed,
                                num_train=self.synthetic_train, num_val=self.synthetic_val,
                                image_size=tuple(self.synthetic_size), objects=tuple(self.synthetic_objects),
                                object_frac=tuple(self.synthetic_object_frac), workers=workers)


@dataclass
class OptimConfig:
    lr_per_256: float = field(default=1.0, metadata={"help": (
        "base learning rate per 256 images; lr = lr_per_256 * effective batch / 256 (paper: 1.0)")})
    final_lr: float = field(default=1e-6, metadata={"help": "learning rate at the end of the cosine"})
    warmup_epochs: float = field(default=10.0, metadata={"help": "linear warm-up length in epochs"})
    warmup_start_factor: float = field(default=0.01, metadata={"help": "warm-up starts at lr * this"})
    weight_decay: float = field(default=1e-5, metadata={"help": "LARS weight decay (1-D params excluded)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum inside LARS"})
    trust_coefficient: float = field(default=0.001, metadata={"help": "LARS trust coefficient"})
    accum_steps: int = field(default=1, metadata={"help": (
        "gradient accumulation: micro-batches per optimiser step")})

    def __post_init__(self):
        _at_least(self, "optim", accum_steps=1, final_lr=0.0, warmup_epochs=0.0, weight_decay=0.0)
        for name in ("lr_per_256", "trust_coefficient"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(f"optim.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class RunConfig:
    epochs: float = field(default=800.0, metadata={"help": "training length in epochs (paper: 800)"})
    max_steps: int | None = field(default=None, metadata={"help": (
        "stop after this many optimiser steps (schedules still span `epochs`); none or 0: no limit")})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and augmentation"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda or cuda:N"})
    amp: str = field(default="auto", metadata={"help": (
        "autocast dtype: auto (bf16 on GPU, off on CPU), bf16, fp16, none")})
    channels_last: bool = field(default=True, metadata={"help": "train in channels_last memory format"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the method's forward"})
    cudnn_benchmark: bool = field(default=True, metadata={"help": (
        "on a GPU, let cuDNN time its convolution algorithms for the step's shapes (fixed: padded "
        "boxes, full batches) on the first steps and keep the fastest; runs are then not bit for bit "
        "repeatable")})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)"})
    out: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str | None = field(default=None, metadata={"help": "run folder name (default: the time and a random suffix)"})
    ckpt_every: int = field(default=500, metadata={"help": "checkpoint every N optimiser steps"})
    keep_ckpts: int = field(default=3, metadata={"help": "keep the newest N checkpoints (0: keep all)"})
    log_every: int = field(default=10, metadata={"help": "log every N optimiser steps"})
    max_bad_steps: int = field(default=20, metadata={"help": (
        "stop after this many non-finite losses in a row")})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    oknn: bool = field(default=True, metadata={"help": (
        "evaluate O-KNN at the end for the trained and the randomly initialised network")})
    oknn_random_draws: int = field(default=3, metadata={"help": (
        "O-KNN: random initialisations evaluated (seeds run.seed, run.seed+1, ...); their spread is "
        "printed next to the trained network's result")})
    oknn_k: int = field(default=20, metadata={"help": "O-KNN neighbours"})
    oknn_temperature: float = field(default=0.07, metadata={"help": "O-KNN vote weights exp(sim / t)"})
    oknn_max_per_image: int = field(default=3, metadata={"help": "O-KNN: bank objects per train image"})
    oknn_image_size: int = field(default=224, metadata={"help": "O-KNN: images resized to this side (px)"})
    oknn_batch_size: int = field(default=32, metadata={"help": "O-KNN: images per feature batch"})
    debug_checksum: bool = field(default=False, metadata={"help": (
        "debug: each rank writes a checksum of its parameters to the run folder at the end")})


    def __post_init__(self):
        _at_least(self, "run", oknn_random_draws=1, ckpt_every=1, keep_ckpts=0, log_every=1, max_bad_steps=1,
                  oknn_k=1, oknn_max_per_image=1, oknn_image_size=32, oknn_batch_size=1)
        if self.max_steps is not None:
            _at_least(self, "run", max_steps=0)
        if self.threads is not None:
            _at_least(self, "run", threads=1)
        if not self.epochs > 0:
            raise ValueError(f"run.epochs must be > 0, got {self.epochs}")
        if not self.oknn_temperature > 0:
            raise ValueError(f"run.oknn_temperature must be > 0, got {self.oknn_temperature}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"run.amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"run.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def _at_least(section, prefix: str, **minimum):
    """Raises ValueError naming the first field of `section` below its minimum."""
    for name, low in minimum.items():
        value = getattr(section, name)
        if not value >= low:
            raise ValueError(f"{prefix}.{name} must be >= {low}, got {value}")


@dataclass
class TrainConfig:
    preset: str = field(default="default", metadata={"help": "the preset this config started from"})
    # SyncBatchNorm whenever more than one process trains (a no-op on one process).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(sync_bn=True))
    region: RegionConfig = field(default_factory=RegionConfig)
    soco_aug: SocoAugConfig = field(default_factory=SocoAugConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    colour: ColourConfig = field(default_factory=ColourConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        check_leaves(self)
        if self.data.batch_size * self.view.num_boxes < 2:
            raise ValueError("data.batch_size x view.num_boxes must be >= 2: training-mode BatchNorm in res5 "
                             f"and the heads needs more than one region, got {self.data.batch_size} x "
                             f"{self.view.num_boxes}")
        if self.run.oknn and self.data.path is None and self.data.synthetic_val < 1:
            raise ValueError("data.synthetic_val must be >= 1 with run.oknn on (its val images are O-KNN's "
                             "queries): raise it, or set run.oknn false")
        if self.optim.warmup_epochs > self.run.epochs:
            raise ValueError(f"optim.warmup_epochs ({self.optim.warmup_epochs}) is longer than run.epochs "
                             f"({self.run.epochs}): lower optim.warmup_epochs")


# Tuple fields that are a (min, max) range; fields ending in _p are probabilities (each of a tuple's).
_RANGE_FIELD = re.compile(r"(scale|ratio|sigma|size|objects|frac)$")


def check_leaves(cfg):
    """The rules every field of a TrainConfig follows: numbers finite, probabilities (*_p) in [0, 1],
    tuples as long as their default, ranges (*scale, *ratio, *sigma, *size, ...) with min <= max.
    Raises ValueError naming the field."""
    for name, f, _ in leaf_fields(cfg):
        value = get_field(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
            continue
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{name} must hold numbers, got {value!r}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if name.rsplit(".", 1)[-1].endswith("_p") and not all(0 <= v <= 1 for v in values):
            raise ValueError(f"{name} is a probability: each value must be in [0, 1], got {value!r}")
        if isinstance(value, (tuple, list)):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if len(values) != len(default):
                raise ValueError(f"{name} takes {len(default)} comma-separated values, got {value!r}")
            if _RANGE_FIELD.search(name) and len(values) == 2 and values[0] > values[1]:
                raise ValueError(f"{name} is a (min, max) range: min must not exceed max, got {value!r}")


# Presets: small override dicts on top of TrainConfig(). `default` is the main job: the embedded
# synthetic set on whatever device is there, small enough to finish in minutes on two CPU cores.
PRESETS: dict[str, dict] = {
    # LARS scales each layer's step to lr * trust_coefficient * |w|: with batch 32 the paper's
    # 1.0 * B / 256 moves the weights ~1e-4 per step and a run of ~100 steps learns nothing
    # (loss flat at ln(queue)); 16 per 256 (lr 2) makes the loss fall within the run (64 per 256
    # ends higher, with object features that classify worse than random weights).
    # The synthetic objects' two colours are drawn uniformly per instance, so with the recipe's hue
    # shift (+-0.1 of the circle) and 20 % grayscale an object's colours survive both views and are
    # the easiest cue to match it by: the network learns colour, which says nothing of the class.
    # A full-circle hue shift and 40 % grayscale take that shortcut away.
    # A run this short (~100 steps) learns only with a fast teacher and a fresh queue: with the
    # paper's momentum 0.99 and a 2048-feature queue the InfoNCE stays near ln(queue) for hundreds of
    # steps; with 0.9 and 256 it falls from 5.6 to ~4.3 per term.
    # O-KNN top-1 at ~10 % over the ~600 objects of 300 val images has a standard error of ~1.2 points,
    # as large as the differences between networks; 2000 val images (~4000 objects) bring it to ~0.5.
    # Views of 128 px, not 64: at 64 px (objects ~15-50 px, textures below two pixels a period) a
    # ResNet-18-C4 trained *with labels* for 300 steps classifies the val objects at chance (9.9 %,
    # 12 classes) and its O-KNN is no better than random weights; at 128 px the same probe reaches
    # 36 % and O-KNN 19 % (benchmarks/experiments/label_probe.py). A 128-px step costs 2.4x a 64-px
    # one, so 6 epochs (108 steps) instead of 15 fit the same ~6 minutes on two CPU cores, and O-KNN
    # top-1 rises from 11.1 +- 0.5 to 13.5 +- 0.5 (seeds 0-2; random weights 10.0 +- 0.3).
    "default": {
        "model.arch": "resnet18", "view.size": 128, "model.roi_size": 8, "data.batch_size": 32,
        "data.synthetic_train": 600, "data.synthetic_val": 2000, "data.synthetic_size": (128, 160),
        "model.queue_size": 256, "model.base_momentum": 0.9,
        "model.proj_hidden": 1024, "model.pred_hidden": 1024,
        "optim.lr_per_256": 16.0, "optim.warmup_epochs": 1.0, "run.epochs": 6.0,
        "colour.hue": 0.5, "colour.grayscale_p": 0.4,
        "run.ckpt_every": 50, "run.log_every": 5, "run.oknn_image_size": 128,
    },
    # The paper's COCO pre-training (SoCo's schedule): ResNet-50-C4 at 224, 800 epochs.
    "coco": {
        "model.arch": "resnet50", "view.size": 224, "data.batch_size": 256, "data.workers": 8,
        "run.epochs": 800.0, "optim.warmup_epochs": 10.0, "run.ckpt_every": 1000, "run.log_every": 20,
        # O-KNN over COCO (118k bank images, four networks) is a job of its own: python -m d3ssl.eval.oknn
        "run.oknn": False,
    },
}
# The SoCo baseline and the ablations of the paper's tables 5-7, each on top of `default`.
PRESETS["soco"] = {**PRESETS["default"], "model.method": "soco"}
PRESETS["no_prc"] = {**PRESETS["default"], "region.prc": False}
PRESETS["no_prm"] = {**PRESETS["default"], "region.prm": False}
PRESETS["no_rbj"] = {**PRESETS["default"], "region.rbj": False}
PRESETS["no_dp"] = {**PRESETS["default"], "model.use_dp": False, "region.depositioning": False}
# The comparison of D3SSL with SoCo (python -m d3ssl.eval.compare): the same data, backbone, views,
# batch and schedule for both; small enough for ~10 minutes each on two CPU cores. O-KNN runs in
# the report afterwards, with the other diagnostics, so the trainer's own O-KNN is off. It keeps
# the 64-px views its published figures were measured with (README), cheaper than the main job's.
PRESETS["compare-d3ssl"] = {**PRESETS["default"], "view.size": 64, "model.roi_size": 4, "run.epochs": 1.0,
                            "optim.warmup_epochs": 0.2, "run.oknn": False}
PRESETS["compare-soco"] = {**PRESETS["compare-d3ssl"], "model.method": "soco"}
# The paper's table 7 on the same budget: D3SSL without the de-positioning view and loss.
PRESETS["compare-no_dp"] = {**PRESETS["compare-d3ssl"], "model.use_dp": False, "region.depositioning": False}

PRESET_HELP = {
    "default": "the main job: synthetic set, ResNet-18-C4, 128-px views, 6 epochs (minutes on a CPU)",
    "coco": "the paper's COCO pre-training: ResNet-50-C4, 224 px, 800 epochs (give --data)",
    "soco": "the SoCo baseline (BYOL objective, SoCo's augmentations) on the default job",
    "no_prc": "default without proposal-based random cutout (ablation)",
    "no_prm": "default without proposal-based random mask (ablation)",
    "no_rbj": "default without restricted box jitter (ablation)",
    "no_dp": "default without the de-positioning loss L_dp (ablation)",
    "compare-d3ssl": "D3SSL side of the comparison with SoCo (same budget; 64-px views, 1 epoch)",
    "compare-soco": "SoCo side of the comparison (identical to compare-d3ssl but the method)",
    "compare-no_dp": "D3SSL without L_dp and x3, the comparison's ablation (paper's table 7)",
}
# Presets made for a dataset the user gives with --data: the trainer says so when there is none.
PRESET_WANTS_DATA = {"coco": "COCO"}


# ----------------------------------------------------------------------------- field help

_FIELD_LINE = re.compile(r"^(\s+)(\w+)\s*:[^=]*=")


@functools.lru_cache(maxsize=None)
def source_comments(cls) -> dict[str, str]:
    """{field name: its comment} for a dataclass whose fields are documented by comments in its
    source (the method configs): the comment at the end of the field's line, else the block of
    comment lines right above it. Fields without either are left out."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments = {}       # line index -> comment text
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    fields = {f.name for f in dataclasses.fields(cls)}
    out, block = {}, []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(comments.get(i, ""))
            continue
        m = _FIELD_LINE.match(line)
        if m and m.group(2) in fields and m.group(2) not in out:
            text = comments.get(i) or " ".join(block)
            if text:
                out[m.group(2)] = text
        block = []
    return out


def field_help(owner, f: dataclasses.Field) -> str:
    """The documentation of field `f` of the dataclass instance `owner`: its metadata help, else its
    source comment."""
    return f.metadata.get("help") or source_comments(type(owner)).get(f.name, "")


# ----------------------------------------------------------------------------- dotted access

def leaf_fields(cfg, prefix=""):
    """Yields (dotted name, dataclasses.Field, owner type) for every leaf field of a dataclass tree."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hints.get(f.name, type(value))


def _resolve(cfg, dotted):
    *path, last = dotted.split(".")
    obj = cfg
    for part in path:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise KeyError(dotted)
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
        raise KeyError(dotted)
    if dataclasses.is_dataclass(getattr(obj, last)):
        raise KeyError(dotted)
    return obj, last


def _field_type(obj, name):
    return typing.get_type_hints(type(obj)).get(name, type(getattr(obj, name)))


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def parse_value(text: str, tp, name: str = "value"):
    """Converts a command-line string to the field type `tp` (bool, int, float, str, tuples, Optional)."""
    tp, optional = _strip_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp in (int, float, str):
            return tp(text)
        if origin in (tuple, list) or tp in (tuple, list):
            args = typing.get_args(tp)
            parts = [p for p in text.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
                     .split(",") if p.strip()]
            if args and args[-1] is Ellipsis:
                item_types = [args[0]] * len(parts)
            elif args:
                if len(parts) != len(args):
                    raise ValueError(f"expected {len(args)} comma-separated values")
                item_types = list(args)
            else:
                item_types = [float] * len(parts)
            vals = [parse_value(p, t, name) for p, t in zip(parts, item_types)]
            return tuple(vals) if (origin or tp) is tuple else vals
    except ValueError as e:
        raise ValueError(f"{name}: cannot read {text!r} as {_type_name(tp)} ({e})") from None
    # Anything else (an enum-like str field typed loosely): keep the string.
    return text


def _type_name(tp, example=None):
    """How a field's value is written on the command line; `example` (its default) spells out a
    bare `tuple`."""
    tp, optional = _strip_optional(tp)
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    if typing.get_origin(tp) is tuple:
        name = "comma-separated " + ",".join(getattr(a, "__name__", "...") for a in typing.get_args(tp))
    elif tp is tuple and isinstance(example, tuple) and example:
        name = "comma-separated " + ",".join(type(v).__name__ for v in example)
    return name + (" or none" if optional else "")


def set_field(cfg, dotted: str, value):
    """Sets cfg.<dotted> = value; a string value is converted to the field's type."""
    try:
        obj, last = _resolve(cfg, dotted)
    except KeyError:
        raise ValueError(f"unknown config field {dotted!r}; `python -m train.run --help` lists them") from None
    tp = _field_type(obj, last)
    if isinstance(value, str):
        value = parse_value(value, tp, dotted)
    elif isinstance(value, list):
        value = tuple(value)
    setattr(obj, last, value)


def get_field(cfg, dotted: str):
    obj, last = _resolve(cfg, dotted)
    return getattr(obj, last)


def apply_overrides(cfg, overrides: dict):
    """Sets each {dotted name: value or string}, then checks the whole tree (validate)."""
    for k, v in overrides.items():
        set_field(cfg, k, v)
    return validate(cfg)


def make_config(preset: str = "default", overrides: dict | None = None) -> TrainConfig:
    """TrainConfig() with a preset and then `overrides` ({dotted name: value or string}) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=preset)
    apply_overrides(cfg, PRESETS[preset])
    return apply_overrides(cfg, overrides or {})


def validate(cfg):
    """Runs the checks of every section of a config tree (their __post_init__) again, after fields
    were set one by one; raises ValueError naming the bad field. Returns cfg."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "__post_init__", None)
    if check is not None:
        check()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, base: TrainConfig | None = None, check: bool = True) -> TrainConfig:
    """Rebuilds a TrainConfig from to_dict() output (e.g. a run's config.json); unknown keys are errors.
    `check` False leaves the values unchecked (validate), for a caller that changes some first."""
    cfg = base or TrainConfig()

    def walk(prefix, sub):
        for k, v in sub.items():
            if isinstance(v, dict):
                walk(prefix + k + ".", v)
            else:
                set_field(cfg, prefix + k, v)
    walk("", d)
    return validate(cfg) if check else cfg


def save_json(cfg, path):
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=2)


def load_json(path, check: bool = True) -> TrainConfig:
    with open(path) as f:
        return from_dict(json.load(f), check=check)


# ----------------------------------------------------------------------------- command line

# Fields one method does not read: setting them for it is a no-op (train.run says so).
IGNORED_BY_METHOD = {
    "soco": ("region.", "model.temperature", "model.queue_size", "model.use_dp", "model.teacher_view1"),
    "d3ssl": ("soco_aug.",),
}
SECTION_NOTES = {"region": " (d3ssl only; SoCo's augmentations are soco_aug's)",
                 "soco_aug": " (soco only; D3SSL's are region's)"}


def ignored_fields(cfg, names) -> list[str]:
    """Those of the dotted `names` that cfg.model.method does not read."""
    prefixes = IGNORED_BY_METHOD.get(cfg.model.method, ())
    return [n for n in names if any(n == p or (p.endswith(".") and n.startswith(p)) for p in prefixes)]


_ORDERED = "overrides in order"   # the Namespace attribute _Override appends (field, value) to


class _Override(argparse.Action):
    """Records (field, value) on the namespace in command-line order, for --FIELD V, --set NAME=VALUE
    (field None) and the aliases (`value`: a flag's fixed value), so that parse_args applies them
    in the order given."""

    def __init__(self, option_strings, dest, field=None, value=None, **kw):
        self.field, self.value = field, value
        super().__init__(option_strings, dest, nargs=0 if value is not None else None, default=None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.field is not None:
            name, value = self.field, values if self.value is None else self.value
        else:
            if "=" not in values:
                parser.error(f"--set expects NAME=VALUE, got {values!r}")
            name, value = values.split("=", 1)
            name = name.strip()
            if name == "preset":
                parser.error("--set preset=NAME would only relabel the config: use --preset NAME")
        setattr(namespace, _ORDERED, [*getattr(namespace, _ORDERED, []), (name, value)])


def build_parser(preset: str = "default") -> argparse.ArgumentParser:
    """The command line; each field's help shows its value under `preset` (that of --preset when
    parse_args is given one)."""
    width = max(map(len, PRESETS))
    preset_lines = "\n".join(f"  {k:<{width}}  {PRESET_HELP.get(k, '')}" for k in PRESETS)
    p = ArgumentParser(
        prog="python -m train.run",
        description="Train D3SSL (or the SoCo baseline). With no arguments: the main job on the "
                    "embedded synthetic set, then O-KNN of the trained and the randomly initialised "
                    "network.",
        epilog=f"presets:\n{preset_lines}\n\nEvery field listed above is also settable as --set NAME=VALUE. "
               "Tuples are comma-separated; booleans true/false; optional fields take none. The "
               f"values shown are the {preset} preset's (`--preset NAME --help` shows another's; "
               "--print-config prints the whole config a command line gives).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="named configuration to start from (default: default)")
    p.add_argument("--data", action=_Override, field="data.path", metavar="PATH", help="alias of --data.path")
    p.add_argument("--proposals", action=_Override, field="data.proposals", metavar="FILE",
                   help="alias of --data.proposals")
    p.add_argument("--dali", action=_Override, field="data.backend", value="dali",
                   help="use the DALI loader (alias of --data.backend dali)")
    p.add_argument("--out", action=_Override, field="run.out", metavar="DIR", help="alias of --run.out")
    p.add_argument("--name", action=_Override, field="run.name", help="alias of --run.name")
    p.add_argument("--compile", action=_Override, field="run.compile", value="true",
                   help="alias of --run.compile true")
    p.add_argument("--resume", default=None, metavar="auto|PATH", help=(
        "continue a run: `auto` = newest checkpoint of the run folder (--name, else the newest run "
        "folder under --out of the method that --preset or --model.method asks for, if either is given; "
        "a fresh run if there is none), a run folder, or a checkpoint file in a run folder's "
        "checkpoints/ (the run continues in that folder)"))
    p.add_argument("--set", action=_Override, metavar="NAME=VALUE",
                   help="override any config field by dotted name (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the config this command line gives (preset and overrides), as JSON, and exit")
    groups = {}
    defaults = make_config(preset if preset in PRESETS else "default")
    for name, f, tp in leaf_fields(TrainConfig()):
        if name == "preset":
            continue
        section = name.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} fields{SECTION_NOTES.get(section, '')}")
        doc = field_help(_resolve(defaults, name)[0], f).rstrip(".")
        default = get_field(defaults, name)
        helptext = f"{doc + '; ' if doc else ''}{_type_name(tp, default)}, {preset} preset: {default!r}"
        groups[section].add_argument(f"--{name}", action=_Override, field=name, metavar="V",
                                     help=helptext.replace("%", "%%"))
    return p


def parse_args(argv=None, with_flags: bool = False):
    """Returns (preset or None, overrides {dotted: string or value}, resume or None), and with
    `with_flags` a fourth item: {"print_config": bool}."""
    first = ArgumentParser(add_help=False)
    first.add_argument("--preset", nargs="?", default=None)   # errors are the full parser's to report
    known, _ = first.parse_known_args(argv)
    args = build_parser(known.preset if known.preset in PRESETS else "default").parse_args(argv)
    overrides = {}
    for k, v in getattr(args, _ORDERED, []):   # in command-line order: the last setting of a field wins
        overrides.pop(k, None)
        overrides[k] = v
    if with_flags:
        return args.preset, overrides, args.resume, {"print_config": args.print_config}
    return args.preset, overrides, args.resume
