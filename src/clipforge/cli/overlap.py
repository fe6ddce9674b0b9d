"""``clipforge overlap``: evaluation images with a near-duplicate in the training data (paper, section 5).

Examples::

    clipforge overlap --train data/train.jsonl --data data/eval/fluent3d --out runs/overlap
    clipforge overlap --train train.jsonl --data /data/imagenet-r --dataset imagenet-r --model ckpt/ \\
        --out runs/overlap-r
    clipforge eval zeroshot --model ckpt/ --data /data/imagenet-r --dataset imagenet-r \\
        --exclude runs/overlap-r/overlap.txt

Writes ``overlap.txt`` (the overlapping evaluation images, for ``eval zeroshot --exclude``),
``pairs.csv`` (each evaluation image, its nearest training image and their cosine),
``contact_sheet.png`` and ``report.json``, as one set. Image paths in them are absolute, symbolic
links resolved (``<shard>.tar#<member>`` for a webdataset image), so the list works from any
folder. With ``--model`` (default: ``$CLIPFORGE_MODEL``) the zero-shot accuracy is split into the
clean and overlapping subsets.

``--features model --train-embeddings DIR`` reuses the image embeddings ``clipforge embed`` wrote
for the training collection: only when the folder's model fingerprint and precision are this
run's, and only for the training images it holds that have not changed since (same size and
content digest; a file edited or added since is embedded again here).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

from . import CliError

OUTPUTS = ("overlap.txt", "pairs.csv", "contact_sheet.png", "report.json")  # one run's files, in --out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``overlap``."""
    from ._common import add_cache_arguments, add_model_arguments, non_negative_int, positive_int

    parser = subparsers.add_parser("overlap", help="near-duplicates of training images in an evaluation set",
                                   description="Find evaluation images with a near-duplicate in the training "
                                   "collection; split zero-shot accuracy into clean and overlapping images.")
    parser.add_argument("--train", required=True, metavar="LISTING|DIR|SHARDS",
                        help="training images: a caption listing (.jsonl/.csv/.tsv), an image folder, or local "
                        "tar shards ('data-{0000..0099}.tar' or their folder), read in place")
    parser.add_argument("--data", required=True, metavar="DIR|CSV", help="evaluation images (as eval zeroshot)")
    parser.add_argument("--dataset", metavar="NAME", help="read --data by a standard protocol (imagenet-r, ...)")
    parser.add_argument("--protocol", default="subset", choices=["subset", "1000way"],
                        help="with --model and an ImageNet-family --dataset: as eval zeroshot's --protocol")
    parser.add_argument("--classnames", metavar="FILE|DATASET", help="prompt names of a plain folder (as eval zeroshot)")
    parser.add_argument("--templates", default=None, metavar="NAME|FILE|none")
    parser.add_argument("--features", choices=["pixels", "model"], default="pixels",
                        help="duplicate descriptor: 16x16 pixel thumbnails (default, model-free) or the "
                        "model's image embeddings (needs --model)")
    parser.add_argument("--threshold", type=float, metavar="COSINE",
                        help="duplicate when the nearest training image has at least this cosine "
                        "(default: 0.98 for pixels, 0.995 for model; calibrated on the demo data)")
    parser.add_argument("--train-embeddings", metavar="DIR",
                        help="with --features model: reuse this `clipforge embed` folder of the --train images "
                        "where it holds them unchanged, made by the same model and precision")
    parser.add_argument("--out", required=True, metavar="DIR")
    add_model_arguments(parser)  # optional here: without a model only the overlap is measured
    parser.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
    parser.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="DataLoader processes decoding images")
    add_cache_arguments(parser)
    parser.set_defaults(func=run)


def _correct_by_path(model, preprocess, data, args, common) -> dict[str, bool]:
    from ..evaluate import evaluate_zeroshot

    if args.dataset:
        from ..evaluate.protocols import evaluate_protocol

        result = evaluate_protocol(model, data, args.protocol, args.templates, preprocess, args.batch_size, **common)
        predictions = result.predictions
    else:
        result = evaluate_zeroshot(model, data, args.classnames, args.templates or "imagenet", preprocess,
                                   args.batch_size, **common)
        predictions = result.logits.argmax(-1)
    correct = (predictions == result.targets).tolist()
    return {data.paths[i]: hit for i, hit in zip(result.indices.tolist(), correct)}


def _pairs_csv(overlap) -> str:
    from ..evaluate.overlap import absolute_image_path

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["eval_image", "nearest_train_image", "cosine", "duplicate"])
    for i, path in enumerate(overlap.eval_paths):
        cosine = float(overlap.similarity[i])
        writer.writerow([absolute_image_path(path), absolute_image_path(overlap.train_paths[int(overlap.nearest[i])]),
                         f"{cosine:.6f}", int(cosine >= overlap.threshold)])
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    """``clipforge overlap``."""
    import torch

    from ..evaluate import load_classification_data
    from ..evaluate.overlap import (DEFAULT_THRESHOLDS, PixelThumbnails, absolute_image_path, find_overlap,
                                    image_opener, split_accuracy, training_images, write_contact_sheet)
    from ..evaluate.report import output_set, write_json
    from ..files import write_text_atomic
    from . import _common as eval_cli

    if args.features == "model" and not args.model:
        raise CliError("--features model needs --model CHECKPOINT")
    if args.train_embeddings and args.features != "model":
        raise CliError("--train-embeddings holds model embeddings: it needs --features model (and --model, the "
                       "checkpoint that made them); the default pixel descriptor embeds the images itself")
    manifest = None
    if args.train_embeddings:
        from ..search import read_embedding_manifest

        try:
            manifest = read_embedding_manifest(args.train_embeddings)
        except ValueError as error:
            raise CliError(f"--train-embeddings {error}") from None
    threshold = DEFAULT_THRESHOLDS[args.features] if args.threshold is None else args.threshold
    if not -1 <= threshold <= 1:
        raise CliError(f"--threshold is a cosine in [-1, 1], got {threshold}")
    eval_cli.check_protocol_arg(args.protocol, args.dataset)
    eval_cli.check_out_folder(args.out, what="overlap.txt, pairs.csv, contact_sheet.png and report.json")
    collection = training_images(args.train)
    train = collection.paths
    data = load_classification_data(args.data, None, dataset=args.dataset)
    device = eval_cli.resolve_device_arg(args.device)
    common = dict(device=device, precision=args.precision, num_workers=args.workers,
                  cache_dir=eval_cli.feature_cache_dir(args), progress=True)
    model = preprocess = None
    if args.model:
        model, preprocess = eval_cli.load_model_arg(args.model, device, args.seed)
    if args.features == "model":
        detector, detector_preprocess = model, preprocess
    else:
        from ..transforms import image_transform

        detector, detector_preprocess = PixelThumbnails(), image_transform(64)
    eval_preprocess = data.wrap_preprocess(detector_preprocess) if hasattr(data, "wrap_preprocess") else detector_preprocess
    known, reuse = (), None
    if manifest is not None:
        from ..evaluate import model_fingerprint
        from ..search import stored_image_embeddings

        try:
            known, train, reuse = stored_image_embeddings(args.train_embeddings, manifest, train,
                                                          model_fingerprint(model), args.precision)
        except (ValueError, ImportError) as error:
            raise CliError(f"--train-embeddings {error}") from None
        why = f" (not reused: {reuse['not_reused_because']})" if reuse["not_reused_because"] else ""
        print(f"training embeddings from {args.train_embeddings}: {reuse['reused']} reused, {reuse['embedded']} "
              f"embedded here ({reuse['changed']} changed since, {reuse['not_in_folder']} not in it){why}",
              file=sys.stderr)
    overlap = find_overlap(detector, train, data.paths, eval_preprocess, threshold, args.batch_size,
                           **{**common, "device": device if args.features == "model" else "cpu"},
                           train_preprocess=collection.wrap_preprocess(detector_preprocess), known_train=known)
    report = {"train": args.train, "data": args.data, "dataset": args.dataset, "features": args.features,
              "threshold": threshold, "num_train_images": len(overlap.train_paths),
              **split_accuracy(torch.zeros(len(overlap.eval_paths)), overlap.is_overlap)}
    if reuse is not None:
        report["train_embeddings"] = reuse
    for key in ("accuracy_all", "accuracy_clean", "accuracy_overlap", "overlap_minus_clean", "all_minus_clean"):
        report[key] = None
    if model is not None:
        correct = _correct_by_path(model, preprocess, data, args, common)
        kept = [i for i, path in enumerate(overlap.eval_paths) if path in correct]
        hits = torch.tensor([correct[overlap.eval_paths[i]] for i in kept], dtype=torch.bool)
        report.update(split_accuracy(hits, overlap.is_overlap[kept]))
        report["model"] = args.model
    report["skipped"] = [{"path": path, "reason": reason} for path, reason in overlap.skipped]
    out = Path(args.out)
    pairs = overlap.pairs()
    with output_set(out, OUTPUTS) as staging:
        write_text_atomic(staging / "overlap.txt", "".join(f"{absolute_image_path(path)}\n" for path, _, _ in pairs))
        write_text_atomic(staging / "pairs.csv", _pairs_csv(overlap))
        write_contact_sheet(pairs, staging / "contact_sheet.png", open_eval_image=image_opener(data),
                            open_train_image=collection.open)
        write_json(report, staging / "report.json")
    written = [out / name for name in OUTPUTS]
    pct = lambda value: "n/a" if value is None else f"{100 * value:.2f}%"
    print(f"overlap of {args.data} with {args.train}: {report['num_overlap']} of {report['num_images']} evaluation "
          f"images ({pct(report['overlap_share'])}) have a training image at cosine >= {threshold} ({args.features})")
    if model is not None:
        print(f"zero-shot top-1 ({args.model}): all {pct(report['accuracy_all'])}, "
              f"clean {pct(report['accuracy_clean'])}, overlap {pct(report['accuracy_overlap'])}; "
              f"all - clean {pct(report['all_minus_clean'])}, overlap - clean {pct(report['overlap_minus_clean'])}")
    print("wrote " + ", ".join(str(path) for path in written))
    return 1 if overlap.skipped else 0
