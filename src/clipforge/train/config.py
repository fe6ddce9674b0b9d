"""Typed configuration of a training run: one dataclass per concern, a comment on every field.

A run is fully described by a :class:`TrainConfig`. It is built from a preset (a small Python or
TOML file, see ``train/presets/``), then ``key=value`` overrides (``optim.lr=1e-4``), then checked by
:func:`validate` before any work starts. The resolved config is saved in the run folder and inside
every checkpoint, so a run can always be reproduced or resumed from its folder alone.

Defaults are the paper's recipe where the paper gives one (Radford et al. 2021, appendix F):
AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.2, cosine schedule with linear warmup,
temperature initialised to 1/0.07 and capped at 100.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..loss import DEFAULT_TILE_SIZE
from ..models.config import check_patch_dropout
from ..runtime import PRECISIONS

LOSSES = ("clip", "siglip")


@dataclass
class ModelSection:
    name: str = "tiny-vit"  # preset from clipforge.available_models(); ignored when init_checkpoint is set
    init_checkpoint: str | None = None  # fine-tune: any file/folder clipforge.load reads (None: random init)
    lock_image: bool = False  # freeze the image tower (no gradients, norms in eval mode)
    lock_text: bool = False  # freeze the text tower
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile the towers (opt-in: slow first steps, faster after)
    patch_dropout: float = 0.0  # FLIP: share of image patch tokens dropped per image while training (ViT only)
    # ResNet image tower in channels-last memory; None: on for ResNets on the CPU, where the RN50
    # step measured 1.28x faster (benchmarks/results_train.md), off elsewhere (not measured on GPUs)
    channels_last: bool | None = None


@dataclass
class DataSection:
    train: str = ""  # captions file (.csv/.tsv/.jsonl) or WebDataset shard pattern ("data-{0000..0099}.tar")
    image_root: str | None = None  # folder that image paths in a captions file are relative to (None: its folder)
    workers: int = 2  # data-loader worker processes per rank (0: load in the training process)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random-resized-crop area range of the train augmentation
    hflip: float = 0.0  # probability of mirroring a training image left-right (CLIP: 0)
    image_key: str | None = None  # caption-file column / JSON field of the image path (None: image, filepath, ...)
    caption_key: str | None = None  # column / JSON field of the caption (None: caption, title, text)
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples are unreadable
    resampled: bool = False  # shards: draw each epoch's shards with replacement (endless or imbalanced streams)
    sources: tuple[str, ...] = ()  # shards: several patterns mixed, e.g. ("a-{0000..0099}.tar", "b-{00..09}.tar"); replaces train
    weights: tuple[float, ...] = ()  # relative share of samples from each source (needs resampled), e.g. (3, 1)


@dataclass
class LossSection:
    kind: str = "clip"  # "clip": symmetric softmax cross-entropy (the paper); "siglip": pairwise sigmoid
    tile_size: int = DEFAULT_TILE_SIZE  # rows/columns of the similarity matrix held at once (exact tiled loss)


@dataclass
class OptimSection:
    lr: float = 5e-4  # peak learning rate, reached after warmup
    weight_decay: float = 0.2  # decoupled (AdamW); never applied to gains, biases, embeddings, logit_scale
    betas: tuple[float, float] = (0.9, 0.98)  # Adam moment decay rates (paper: 0.98 for stability)
    eps: float = 1e-6  # Adam denominator epsilon (paper value)
    warmup_steps: int = 2000  # linear warmup from 0 to lr, then cosine decay to 0 at the last step
    grad_clip_norm: float | None = None  # clip the global gradient norm to this (None: no clipping)


@dataclass
class RunSection:
    run_dir: str = "runs/clip"  # folder for checkpoints, metrics.jsonl, config.json, curves.png
    resume: str | None = None  # "latest", or a checkpoint folder inside run_dir/checkpoints, to continue from
    checkpoint_every: int = 1000  # save every this many optimizer steps (and always at the end)
    keep: int = 3  # newest checkpoints kept on disk (older ones are deleted; 0 keeps all)
    log_every: int = 10  # write a metrics line (and TensorBoard scalars) every this many steps
    tensorboard: bool = False  # also write TensorBoard events to run_dir/tensorboard (needs `tensorboard`)
    progress: bool = True  # show a progress bar on rank 0
    max_nonfinite_in_row: int = 10  # stop after this many consecutive steps with a non-finite loss or gradient


@dataclass
class EvalSection:
    # Classification sets evaluated zero-shot while training: [{name, data, dataset?, classnames?, templates?}]
    zeroshot: list = field(default_factory=list)
    # Held-out image-caption listings: recall@k both ways and the held-out loss: [{name, data}]
    retrieval: list = field(default_factory=list)
    every_steps: int = 0  # evaluate every this many steps (0: only at the end), and always after the last step
    # or: evaluate this many times, evenly over the run's steps (the last after the last step); a
    # ``minutes`` run spaces them over its re-planned length, which every_steps cannot know in advance
    times: int = 0
    batch_size: int = 64  # images per encoder pass while evaluating
    # torchrun: how long the other processes wait for rank 0's evaluation before the run stops (an
    # evaluation may outlast the process group's own timeout, 30 minutes, which does not apply to it)
    wait_minutes: float = 24 * 60.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    eval: EvalSection = field(default_factory=EvalSection)  # evaluation while training (none by default)
    # Contrastive batch: pairs per optimizer step summed over all processes. Each pair sees every
    # other pair of this batch as a negative, whatever the number of processes or chunks.
    batch_size: int = 256
    # Images/texts per encoder pass on each process (None: the whole per-process batch at once).
    # A smaller chunk is gradient accumulation that keeps contrastive semantics: the step embeds
    # the batch chunk by chunk, computes the loss on all of it, then back-propagates chunk by chunk.
    chunk_size: int | None = None
    epochs: int = 1  # passes over the data (ignored when steps is set)
    steps: int | None = None  # total optimizer steps; overrides epochs
    # Wall-clock budget of the training loop (evaluations and checkpoints included): the total steps
    # are re-planned from the measured speed to end after about this long; steps/epochs are the first
    # plan. None: a fixed step count. See clipforge.train.budget.
    minutes: float | None = None
    precision: str = "fp32"  # "fp32", "bf16" (autocast, CPU or CUDA) or "fp16" (autocast + loss scaling, CUDA only)
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda"
    seed: int = 0  # seeds model init, data order and augmentation; same seed + config = same run
    deterministic: bool = False  # deterministic kernels (bit-exact resume on GPU; slower)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; an unknown key raises naming it and the known ones."""
        return _build(cls, data, prefix="")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or 'root'} must be a table/dict, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}'; expected one of {sorted(known)}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` (from TOML, JSON or a command-line string) as type ``kind``; raises naming ``key``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if kind is list or origin is list:  # a JSON list from the command line, e.g. --set 'eval.zeroshot=[...]'
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key} must be a JSON list, got {value!r} ({err.msg})") from None
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list of values, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None
    return value


def _split_list(text: str) -> list[str]:
    """``"[a-{0..9}.tar, b-{x,y}.tar]"`` -> its items: commas inside braces belong to the item."""
    text = text.strip().removeprefix("[").removesuffix("]")
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip().strip("'\"") for item in items if item.strip()]


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of ``config`` with ``"section.field=value"`` strings applied (``"optim.lr=1e-4"``)."""
    data = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-4")
        *sections, name = key.strip().split(".")
        target = data
        for section in sections:
            if not isinstance(target.get(section), dict):
                raise ValueError(f"unknown config section {section!r} in override {item!r}")
            target = target[section]
        if name not in target or isinstance(target[name], dict):
            raise ValueError(f"unknown config key {key.strip()!r} in override {item!r}; expected one of {sorted(target)}")
        target[name] = raw.strip()
    return TrainConfig.from_dict(data)


def validate(config: TrainConfig, world_size: int = 1, device_type: str = "cpu") -> None:
    """Check everything that can be checked before loading data or building a model.

    Raises ``ValueError`` (or ``FileNotFoundError``) with one line naming the bad value.
    """
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.batch_size < 2 and config.loss.kind == "clip":
        raise ValueError("batch_size 1 gives the contrastive loss no negatives (it is always 0): "
                         "use --batch-size 2 or more")
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world_size} processes")
    per_rank = config.batch_size // world_size
    if config.chunk_size is not None:
        if config.chunk_size < 1 or per_rank % config.chunk_size:
            raise ValueError(
                f"chunk_size {config.chunk_size} must divide the per-process batch {per_rank} "
                f"(batch_size {config.batch_size} / {world_size} processes)"
            )
    if config.loss.tile_size < 1:
        raise ValueError(f"loss.tile_size must be >= 1, got {config.loss.tile_size}")
    if config.loss.kind not in LOSSES:
        raise ValueError(f"loss.kind must be one of {LOSSES}, got {config.loss.kind!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if not 0 <= config.seed < 2 ** 32:
        raise ValueError(f"seed must lie in [0, 2**32 - 1], got {config.seed}")
    if config.precision == "fp16" and device_type != "cuda":
        raise ValueError("precision fp16 needs CUDA (loss scaling); on CPU use precision=bf16")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.steps is not None and config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}")
    if config.minutes is not None and not (math.isfinite(config.minutes) and config.minutes > 0):
        raise ValueError(f"minutes must be a positive number of minutes, got {config.minutes}")
    try:
        check_patch_dropout(config.model.patch_dropout)  # the ResNet refusal comes when the model is built
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    if config.model.lock_image and config.model.lock_text:
        raise ValueError("model.lock_image and model.lock_text are both set: nothing would train")
    if config.model.lock_image and config.model.patch_dropout:
        raise ValueError(f"model.patch_dropout={config.model.patch_dropout} has no effect with model.lock_image: "
                         "a locked image tower runs in eval mode and sees every patch")
    optim = config.optim
    for name in ("lr", "weight_decay", "eps"):
        value = getattr(optim, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name != "weight_decay"):
            bound = ">= 0" if name == "weight_decay" else "> 0"
            raise ValueError(f"optim.{name} must be a finite number {bound}, got {value}")
    if optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if not all(0 <= b < 1 for b in optim.betas):
        raise ValueError(f"optim.betas must lie in [0, 1), got {optim.betas}")
    if optim.grad_clip_norm is not None and not optim.grad_clip_norm > 0:
        raise ValueError(f"optim.grad_clip_norm must be > 0 or none, got {optim.grad_clip_norm}")
    run = config.run
    if run.checkpoint_every < 1 or run.log_every < 1 or run.keep < 0 or run.max_nonfinite_in_row < 1:
        raise ValueError(f"run needs checkpoint_every, log_every, max_nonfinite_in_row >= 1 and keep >= 0; got {run}")
    low, high = config.data.crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {config.data.crop_scale}")
    if not 0 <= config.data.hflip <= 1:
        raise ValueError(f"data.hflip must be a probability in [0, 1], got {config.data.hflip}")
    if not 0 <= config.data.max_skip_fraction < 1:
        raise ValueError(f"data.max_skip_fraction must lie in [0, 1), got {config.data.max_skip_fraction}")
    if config.data.workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {config.data.workers}")
    data = config.data
    if data.sources and data.train:
        raise ValueError("set data.train or data.sources, not both (data.sources lists every shard pattern)")
    if data.weights and not data.sources:
        raise ValueError("data.weights weighs data.sources (one weight per shard pattern); set data.sources "
                         "instead of data.train / --data")
    if data.weights and len(data.weights) != len(data.sources):
        raise ValueError(f"data.weights has {len(data.weights)} values for {len(data.sources)} data.sources")
    if data.weights and not data.resampled:
        raise ValueError("data.weights needs data.resampled=true (weighted mixing draws shards with replacement)")
    if not (config.data.train or data.sources):
        raise ValueError("no training data: set data.train (--data) to a captions file or shard pattern")
    _validate_eval(config.eval)


def _validate_eval(section: EvalSection) -> None:
    """``eval.*``: a period needs something to evaluate (else the user would believe they evaluate)."""
    if section.every_steps < 0:
        raise ValueError(f"eval.every_steps must be >= 0 (0: only after the last step), got {section.every_steps}")
    if section.times < 0:
        raise ValueError(f"eval.times must be >= 0 (0: use eval.every_steps), got {section.times}")
    if section.times and section.every_steps:
        raise ValueError(f"eval.times={section.times} and eval.every_steps={section.every_steps} both space the "
                         "evaluations: set one of them")
    for name in ("every_steps", "times"):
        value = getattr(section, name)
        if value and not (section.zeroshot or section.retrieval):
            raise ValueError(f"eval.{name}={value} evaluates nothing: no eval.zeroshot or "
                             "eval.retrieval set is given; add a set (e.g. --set 'eval.retrieval=[{\"name\": \"val\", "
                             f"\"data\": \"val.csv\"}}]') or drop eval.{name}")
    if section.batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {section.batch_size}")
    if not (math.isfinite(section.wait_minutes) and section.wait_minutes > 0):
        raise ValueError(f"eval.wait_minutes must be a positive number of minutes, got {section.wait_minutes}")
