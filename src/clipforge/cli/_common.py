"""What several commands share: ``--model`` / ``--device`` / ``--precision`` and the feature cache.

``eval``, ``classify`` and (soon) ``embed`` and ``serve`` take the same ``--model`` (a checkpoint
``clipforge.load`` reads, or a preset name for random weights) and resolve ``--device`` the same
way, through :mod:`clipforge.runtime`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from ..files import why_missing
from . import CliError


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (batch sizes, top-k)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (worker processes)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type of a finite amount above 0 (minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def check_out_folder(path: str | os.PathLike, flag: str = "--out", what: str = "the outputs") -> None:
    """Stop with one line, before any compute, when ``path`` cannot be an output folder: it is a
    file, a file lies on the way to it, or the folder (or, when missing, the nearest existing folder
    above it, where it would be made) cannot be written to. Nothing is created."""
    folder = Path(path)
    if folder.is_symlink() and not folder.exists():
        raise CliError(f"{flag} {path}: {why_missing(folder)}; expected a folder for {what}")
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{flag} {path}: is a file; expected a folder for {what}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{flag} {path}: {existing} is a file, so the folder cannot be made; expected a folder "
                       f"for {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot write in {existing} ({err.strerror or err}); "
                       f"expected a writable folder for {what}") from None


def check_protocol_arg(protocol: str | None, dataset: str | None) -> None:
    """``--protocol 1000way`` needs an ImageNet-family ``--dataset``: refused without one, and for
    CLIP_benchmark's ``wds`` sets, whose own classes are all that compete."""
    if protocol != "1000way":
        return
    if not dataset:
        raise CliError("--protocol 1000way applies only with --dataset (an ImageNet-family set such as "
                       "imagenet-r); a folder or CSV is scored over its own classes")
    from ..evaluate.protocols import canonical_name

    try:
        name = canonical_name(dataset)
    except ValueError as err:
        raise CliError(f"--dataset: {err}") from None
    if name == "wds":
        raise CliError("--protocol 1000way does not apply to --dataset wds: a CLIP_benchmark set is scored "
                       "over its own classes (leave out --protocol)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--precision`` and ``--seed``, shared with ``clipforge classify``."""
    parser.add_argument("--model", default=os.environ.get("CLIPFORGE_MODEL"), metavar="CKPT|PRESET",
                        help="checkpoint clipforge.load reads, or a preset name for random weights "
                        "(default: $CLIPFORGE_MODEL)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast precision of the encoders")
    parser.add_argument("--seed", type=int, default=0, help="seed of random preset weights and data splits")


def resolve_device_arg(name: str):
    """``--device`` as a ``torch.device`` (:func:`clipforge.runtime.resolve_device`); a usage error otherwise."""
    from ..runtime import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        raise CliError(f"--device: {err}") from None


def load_model_arg(spec: str | None, device, seed: int = 0):
    """``(model, preprocess)`` for ``--model``: a checkpoint, or a preset with random weights (warned)."""
    import torch

    from ..models import available_models, create_model

    if not spec:
        raise CliError("no model: pass --model CHECKPOINT (or a preset name such as tiny-vit) "
                       "or set CLIPFORGE_MODEL")
    from ..checkpoints import load

    is_preset = spec in available_models() and not Path(spec).expanduser().exists()
    if not is_preset:
        model, preprocess = load(spec, device=device)
        return model.eval(), preprocess
    try:
        model, preprocess = load(spec, device=device)  # released weights, when cached locally
        return model.eval(), preprocess
    except ValueError:
        pass
    print(f"warning: {spec!r} is a preset without local weights: using RANDOM weights (seed {seed}); "
          "scores will be near chance. Pass a checkpoint for real results.", file=sys.stderr)
    from ..transforms import image_transform

    torch.manual_seed(seed)
    model = create_model(spec).to(device).eval()
    return model, image_transform(model.config.vision.image_size)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--no-cache`` of the feature cache."""
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: $CLIPFORGE_CACHE/features "
                        "or ~/.cache/clipforge/features)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")


def feature_cache_dir(args: argparse.Namespace) -> str | None:
    """The feature cache folder of ``--cache-dir`` / ``--no-cache``: below the cache root by default."""
    from ..runtime import cache_root

    if args.no_cache:
        return None
    if args.cache_dir:
        if Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
            raise CliError(f"--cache-dir {args.cache_dir}: is a file; expected a folder")
        return args.cache_dir
    return str(cache_root() / "features")


def warn_skipped(skipped: list[dict], key: str, what: str, where: str) -> int:
    """One warning line for unreadable inputs (the first five named); exit status 1 if any, else 0."""
    if not skipped:
        return 0
    shown = "; ".join(f"{entry[key]} ({entry['reason']})" for entry in skipped[:5])
    more = f" and {len(skipped) - 5} more (see {where})" if len(skipped) > 5 else ""
    print(f"warning: skipped {len(skipped)} unreadable {what}: {shown}{more}", file=sys.stderr)
    return 1
