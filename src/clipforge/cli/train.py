"""``clipforge train``: build a training config from a preset, flags and overrides, then train.

Examples::

    clipforge train --preset tiny --data pairs.csv --run-dir runs/tiny
    clipforge train --preset paper_vit_b32 --data 'shards/data-{0000..0999}.tar'
    clipforge train --run-dir runs/tiny --resume latest
    clipforge train --preset tiny --data pairs.csv --steps 2000 --minutes 10   # whatever fits in 10 minutes
    torchrun --nproc_per_node=8 -m clipforge.cli train --preset paper_vit_b32 --data ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import CliError
from ._common import positive_float, positive_int

# Direct flags: the settings people change most, as shorthand for --set.
_SHORTHANDS = {
    "data": "data.train",
    "model": "model.name",
    "init": "model.init_checkpoint",
    "batch_size": "batch_size",
    "chunk_size": "chunk_size",
    "steps": "steps",
    "epochs": "epochs",
    "minutes": "minutes",
    "lr": "optim.lr",
    "precision": "precision",
    "device": "device",
    "run_dir": "run.run_dir",
    "resume": "run.resume",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a CLIP model (one process, or many under torchrun)",
        description="Train CLIP on image-caption pairs. Settings come from --preset, then the flags "
        "below, then --set overrides; the resolved config is saved in the run folder.",
        epilog="Any config field can be set with --set, e.g. --set optim.weight_decay=0.1 "
        "--set model.lock_image=true; --print-config lists them all.",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--preset", metavar="NAME|FILE", help="bundled preset (tiny, paper_vit_b32, finetune) or a .py/.toml file")
    what.add_argument("--data", metavar="PATH", help="captions .csv/.tsv/.jsonl, or shard pattern 'data-{0000..0099}.tar'")
    what.add_argument("--model", metavar="NAME", help="model preset, e.g. tiny-vit, ViT-B/32")
    what.add_argument("--init", metavar="CKPT", help="fine-tune from a checkpoint clipforge.load reads")
    size = parser.add_argument_group("batch and length")
    size.add_argument("--batch-size", type=positive_int, metavar="N", help="contrastive batch: pairs per step, all processes together")
    size.add_argument("--chunk-size", type=positive_int, metavar="N", help="pairs per encoder pass per process (accumulation)")
    size.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps (overrides --epochs)")
    size.add_argument("--epochs", type=positive_int, metavar="N")
    size.add_argument("--minutes", type=positive_float, metavar="M",
                      help="end after about M minutes: the step count (--steps/--epochs: the first plan) is "
                           "re-planned from the measured speed")
    size.add_argument("--lr", type=float, metavar="LR", help="peak learning rate")
    size.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    size.add_argument("--device", metavar="auto|cpu|cuda|cuda:N", help="where to train (default: auto, CUDA when available)")
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", metavar="DIR", help="folder for checkpoints, metrics and curves")
    run.add_argument("--resume", metavar="latest|CKPT", help="continue a run from its newest (or a given) checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="start again in a run folder that holds a run (its old files are moved into replaced-*/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config field (repeatable)")
    run.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.set_defaults(func=run_train)


def resolve_config(args: argparse.Namespace):
    """The :class:`TrainConfig` that ``args`` describe: preset, then flags, then ``--set``."""
    from ..train.config import TrainConfig, apply_overrides
    from ..train.presets import load_preset

    config = load_preset(args.preset) if args.preset else TrainConfig()
    if args.resume and not args.preset:
        config = _saved_config(Path(args.run_dir or config.run.run_dir)) or config
    flags = [f"{key}={getattr(args, name)}" for name, key in _SHORTHANDS.items() if getattr(args, name) is not None]
    given = {item.partition("=")[0].strip() for item in flags + list(args.overrides)}
    if "epochs" in given and "steps" not in given:
        flags.append("steps=none")  # --epochs on the command line beats the preset's steps
    return apply_overrides(config, flags + list(args.overrides))


def _saved_config(run_dir: Path):
    """When resuming without a preset, start from the config the run saved (so flags are optional)."""
    from ..train.config import TrainConfig
    from ..train.main import CONFIG_FILE

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CliError(f"{path}: not a training config this clipforge reads ({error}); pass the preset "
                       "and flags of the run again to resume it") from None


def run_train(args: argparse.Namespace) -> int:
    """Resolve the config and train; training-time stops become one-line errors."""
    from ..train.main import TrainingStopped, train

    config = resolve_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        result = train(config, overwrite=args.overwrite)
    except TrainingStopped as stop:
        raise CliError(str(stop)) from None
    if result.is_main:
        saved = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint written"
        print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; {saved}")
    return 0
