"""``clipforge classify``: zero-shot labels for images, with softmax probabilities.

Examples::

    clipforge classify cat.jpg dog.png --labels "dog,cat,bird" --model ckpt/
    clipforge classify photos/*.jpg --labels-file labels.txt --templates none --top-k 3 --json

Like transformers' zero-shot-image-classification pipeline: each label is scored by
``exp(logit_scale) * cosine`` of the image and the label's prompt embedding, softmaxed over the
labels. The default prompts are the paper's 80 ImageNet templates, averaged per label.
"""
from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

from . import CliError
from ._common import add_model_arguments, load_model_arg, positive_int, resolve_device_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``classify`` sub-command."""
    parser = subparsers.add_parser("classify", help="zero-shot classify images with any labels",
                                   description="Print, per image, the most likely labels with softmax probabilities.")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", metavar="A,B,C", help="comma-separated labels")
    labels.add_argument("--labels-file", metavar="FILE", help="one label per line")
    parser.add_argument("--templates", default="imagenet", metavar="NAME|FILE|none",
                        help="prompt templates: a built-in dataset's (default: imagenet), a file, "
                        "none for the bare label, or one template such as 'a photo of a {}.'")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="labels shown per image (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    parser.add_argument("--json", action="store_true", help="print JSON: [{image, predictions: [{label, score}]}]")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def parse_labels(text: str) -> list[str]:
    """Comma-separated labels, stripped; empty entries dropped."""
    return [label.strip() for label in text.split(",") if label.strip()]


def read_labels_file(path: str) -> list[str]:
    """One label per line (UTF-8, a byte-order mark allowed), blank lines dropped."""
    from ..files import why_missing

    file = Path(path)
    if file.is_dir():
        raise CliError(f"--labels-file {path}: is a folder; expected a text file with one label per line")
    if not file.is_file():
        raise FileNotFoundError(f"--labels-file {path}: {why_missing(path)}")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise CliError(f"--labels-file {path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    return [line.strip() for line in lines if line.strip()]


def display_width(text: str) -> int:
    """Terminal columns of ``text``: two for wide and full-width characters (猫, 🐦), none for
    combining marks and zero-width joiners, one for the rest."""
    return sum(0 if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def format_predictions(result: dict) -> list[str]:
    """One image's lines of text output: its path, then each label padded so the scores line up."""
    widths = [display_width(p["label"]) for p in result["predictions"]]
    column = max(widths)
    return [result["image"]] + [f"  {p['label']}{' ' * (column - width)}  {p['score']:.4f}"
                                for p, width in zip(result["predictions"], widths)]


def run(args: argparse.Namespace) -> int:
    """Classify; exit 1 when some image could not be read (the others are still printed)."""
    from ..evaluate import check_classnames, classify, resolve_templates
    from ..files import why_missing

    if args.top_k < 1:
        raise CliError(f"--top-k must be at least 1, got {args.top_k}")
    if args.labels_file:
        labels = read_labels_file(args.labels_file)
    else:
        labels = parse_labels(args.labels)
    if not labels:
        raise CliError("no labels given: pass --labels 'dog,cat' or --labels-file FILE")
    check_classnames(labels)
    resolve_templates(args.templates)  # a bad --templates fails before the model loads
    folders = [image for image in args.images if Path(image).is_dir()]
    if folders:
        raise CliError(f"{folders[0]}: is a folder; classify takes image files (e.g. {folders[0]}/*.jpg)")
    missing = [image for image in args.images if not Path(image).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: {why_missing(missing[0])}{more}")
    device = resolve_device_arg(args.device)
    model, preprocess = load_model_arg(args.model, device, args.seed)
    results = classify(model, args.images, labels, args.templates, preprocess, args.top_k, args.batch_size,
                       device, args.precision, progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if "predictions" in result:
                print("\n".join(format_predictions(result)))
    failed = [result for result in results if "error" in result]
    for result in failed:
        print(f"clipforge classify: skipped {result['image']}: {result['error']}", file=sys.stderr)
    return 1 if failed else 0
