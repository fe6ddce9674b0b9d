"""``clipforge eval``: zero-shot classification, image-text retrieval and linear-probe accuracy.

Examples::

    clipforge eval zeroshot --model ckpt/ --data val/ --templates imagenet --out runs/eval-val
    clipforge eval zeroshot --model ckpt/ --dataset imagenet-o --data imagenet-o/ --imagenet-val val/  # + AUPR
    clipforge eval retrieval --model ckpt/ --data captions_test.json --images coco/
    clipforge eval linear-probe --model ckpt/ --train train/ --test test/ --few-shot 16

``--model`` takes a checkpoint that ``clipforge.load`` reads, or a preset name (random weights,
for trying the pipeline). Features are cached under ``--cache-dir`` keyed by weights and data, so
running the same evaluation again skips the encoders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import CliError
from ._common import (add_cache_arguments, add_model_arguments, check_out_folder, check_protocol_arg, feature_cache_dir,
                      load_model_arg, non_negative_int, positive_int, resolve_device_arg, warn_skipped)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` with its ``zeroshot``, ``retrieval`` and ``linear-probe`` tasks."""
    parser = subparsers.add_parser("eval", help="evaluate a model: zero-shot, retrieval, linear probe",
                                   description="Evaluate a CLIP model on your own data.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification: top-1/top-5, mean per-class recall",
                                description="Zero-shot classification of an image folder (one sub-folder per "
                                "class) or a CSV of path,label.")
    zeroshot.add_argument("--data", required=True, metavar="DIR|CSV", help="image folder or path,label CSV")
    zeroshot.add_argument("--classnames", metavar="FILE|DATASET",
                          help="names for the prompts: JSON object {folder: name}, a list file in label order, "
                          "or a built-in dataset (default: the folder names, _ read as space)")
    zeroshot.add_argument("--templates", default=None, metavar="NAME|FILE|none",
                          help="prompt templates: a built-in dataset's, a file (JSON list or one per line), "
                          "or none for the bare class name (default: imagenet, the paper's 80; with --dataset "
                          "the dataset's own)")
    zeroshot.add_argument("--dataset", metavar="NAME",
                          help="read --data as a standard set's release and score it by its protocol: imagenet, "
                          "imagenet-v2, imagenet-sketch, imagenet-r, imagenet-a, imagenet-o, objectnet, or wds "
                          "(CLIP_benchmark's webdataset folder)")
    zeroshot.add_argument("--protocol", default="subset", choices=["subset", "1000way"],
                          help="with an ImageNet-family --dataset: score over the set's own classes (subset, the "
                          "default) or let all 1,000 ImageNet classes compete (1000way)")
    zeroshot.add_argument("--imagenet-val", metavar="DIR",
                          help="with --dataset imagenet-o: ImageNet validation images (the imagenet layouts), "
                          "whose 200 ImageNet-O classes are the normal images of ImageNet-O's own metric, the "
                          "detection AUPR (Hendrycks et al. 2021)")
    zeroshot.add_argument("--exclude", metavar="LIST",
                          help="file of image paths to leave out (one per line, e.g. clipforge overlap's "
                          "overlap.txt); relative paths are read against the list's folder, then --data's")
    zeroshot.set_defaults(func=run_zeroshot)

    retrieval = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10 both ways",
                                 description="Recall@1/5/10 of image-to-text and text-to-image retrieval.")
    retrieval.add_argument("--data", required=True, metavar="CAPTIONS",
                           help="CSV/TSV/JSONL of image,caption rows, COCO captions JSON or a Karpathy split JSON")
    retrieval.add_argument("--split", default="test", help="with a Karpathy split JSON, the split to score (default: "
                           "test); the other formats have no splits, so every pair is scored")
    retrieval.add_argument("--skip-missing", action="store_true",
                           help="drop listed images that do not exist (and their captions) instead of stopping")
    retrieval.set_defaults(func=run_retrieval)

    probe = tasks.add_parser("linear-probe", help="logistic regression on frozen image features",
                             description="Linear-probe accuracy: L-BFGS logistic regression on image "
                             "features, C chosen on a validation split by the paper's sweep.")
    probe.add_argument("--train", required=True, metavar="DIR|CSV")
    probe.add_argument("--test", required=True, metavar="DIR|CSV")
    probe.add_argument("--few-shot", type=int, metavar="K", help="train on K images per class, C chosen on up to K "
                       "others per class")
    probe.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                       help="share of each class's training images held out to choose C, then trained on too "
                       "(default 0.2; not used with --few-shot)")
    probe.set_defaults(func=run_linear_probe)

    from .eval_suite import register_suite

    register_suite(tasks, add_model_arguments)

    for task in (zeroshot, retrieval, probe):
        add_model_arguments(task)
        outputs = "report.json and plots (per-class accuracy, confusion matrix)" if task is zeroshot else "report.json"
        task.add_argument("--images", metavar="DIR", help="folder that relative paths in a listing are under "
                          "(default: the listing's folder)")
        task.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
        task.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N",
                          help="DataLoader processes decoding images")
        add_cache_arguments(task)
        task.add_argument("--out", metavar="DIR", help=f"write {outputs} here, replacing an earlier run's")
        task.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")


def _common(args: argparse.Namespace) -> dict:
    """Checks every command makes before reading data: ``--out``, ``--device``, the feature cache."""
    if args.out:
        check_out_folder(args.out, what="report.json (and plots)")
    device = resolve_device_arg(args.device)
    return dict(device=device, precision=args.precision, num_workers=args.workers,
                cache_dir=feature_cache_dir(args), progress=not args.json)


def _earlier_report(args: argparse.Namespace) -> str | None:
    """The task of the ``report.json`` already in ``--out`` (``"a report"`` when unreadable), or None."""
    path = Path(args.out) / "report.json" if args.out else None
    if path is None or not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        task = None
    return f"a {task} report" if isinstance(task, str) else "a report"


def _finish(args: argparse.Namespace, report: dict, summary: list[str], written: list[Path],
            replaced: str | None = None) -> int:
    """Print the summary (or JSON), the files written (and the report they replaced) and the
    skipped images; exit 1 if any."""
    if args.json:
        print(json.dumps(report, indent=2))
        if written and replaced:
            print(f"note: {written[0]} replaced {replaced} written there before", file=sys.stderr)
    else:
        print("\n".join(summary))
        if written:
            print("wrote " + ", ".join(str(path) for path in written)
                  + (f" (replacing {replaced} written there before)" if replaced else ""))
    for note in report.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return warn_skipped(report.get("skipped", []), "path", "image(s)", "the report")


def _header(args: argparse.Namespace, task: str, started: float) -> dict:
    return {"task": task, "model": args.model, "precision": args.precision, "seed": args.seed,
            "elapsed_s": round(time.time() - started, 2)}


def run_zeroshot(args: argparse.Namespace) -> int:
    """``clipforge eval zeroshot``."""
    from ..evaluate import evaluate_zeroshot, load_classification_data
    from ..evaluate.report import write_zeroshot_report

    started = time.time()
    if args.dataset and args.classnames:
        raise CliError("--classnames does not apply with --dataset: the protocol names its classes")
    check_protocol_arg(args.protocol, args.dataset)
    is_imagenet_o = _is_imagenet_o(args.dataset)
    if args.imagenet_val and not is_imagenet_o:
        raise CliError("--imagenet-val goes with --dataset imagenet-o (the normal images of its detection AUPR)")
    common = _common(args)
    data = load_classification_data(args.data, args.images, dataset=args.dataset)
    normal_data = None
    if args.imagenet_val:  # read before the model, so a wrong folder stops at once
        from ..evaluate.protocols.ood import in_distribution

        try:
            normal_data = in_distribution(load_classification_data(args.imagenet_val, dataset="imagenet"))
        except (ValueError, FileNotFoundError) as error:
            raise CliError(f"--imagenet-val: {error}") from None
    excluded, unmatched = [], []
    if args.exclude:
        from ..evaluate.overlap import drop_listed

        data, excluded, unmatched = drop_listed(data, args.exclude)
        if unmatched:
            print(f"warning: {len(unmatched)} path(s) in {args.exclude} name no image of {args.data} (e.g. "
                  f"{unmatched[0]}); left out the {len(excluded)} images the others name", file=sys.stderr)
    model, preprocess = load_model_arg(args.model, common["device"], args.seed)
    if args.dataset:
        from ..evaluate.protocols import evaluate_protocol

        result = evaluate_protocol(model, data, args.protocol, args.templates, preprocess, args.batch_size, **common)
    else:
        result = evaluate_zeroshot(model, data, args.classnames, args.templates or "imagenet", preprocess,
                                   args.batch_size, **common)
    notes = []
    if normal_data is not None:
        from ..evaluate.protocols.ood import imagenet_o_aupr

        normal = evaluate_protocol(model, normal_data, args.protocol, args.templates, preprocess, args.batch_size,
                                   **common)
        result.metrics["aupr"] = imagenet_o_aupr(normal, result)
    elif is_imagenet_o:
        notes.append("the accuracy over ImageNet-O's 200 classes is CLIP_benchmark's reading; its authors' metric is "
                     "the detection AUPR against ImageNet validation images: pass --imagenet-val DIR for it")
    report = {**_header(args, "zeroshot", started), "data": args.data, "templates": _templates_used(args, data),
              **result.to_report()}
    report["notes"] = [*report.get("notes", []), *notes]
    if normal_data is not None:
        report["in_distribution"] = {"data": args.imagenet_val, "num_images": len(normal.targets),
                                     "num_skipped": len(normal.skipped)}
    if args.exclude:
        report["excluded"] = {"list": args.exclude, "num_images": len(excluded), "num_unmatched": len(unmatched)}
    replaced = _earlier_report(args)
    written = write_zeroshot_report(report, args.out) if args.out else []
    summary = [f"zero-shot on {args.data}: {report['num_images']} images, {report['num_classes']} classes, "
               f"{report['num_templates']} templates"]
    if args.dataset:
        summary.append(f"protocol {report['dataset']}, scored {report['scoring']}" + (
            f" over its {report['num_classes']} classes" if report["scoring"] == "subset" else
            " with every ImageNet class competing"))
    if args.exclude:
        summary.append(f"left out {len(excluded)} images listed in {args.exclude}")
    labels = {"top1": "top-1", "top5": "top-5", "mean_per_class_recall": "mean per-class recall",
              "aupr": "AUPR (ImageNet-O)"}
    summary += [f"{labels.get(name, name):<22} {value:.4f}" for name, value in result.metrics.items()]
    return _finish(args, report, summary, written, replaced)


def _is_imagenet_o(dataset: str | None) -> bool:
    from ..evaluate.protocols import canonical_name

    try:
        return dataset is not None and canonical_name(dataset) == "imagenet-o"
    except ValueError:
        return False  # an unknown name is refused where the data is read


def _templates_used(args: argparse.Namespace, data) -> str:
    """What the report names as the templates: the option, or the protocol's own."""
    own = getattr(data, "templates", "imagenet")
    return args.templates or (own if isinstance(own, str) else f"{len(own)} from the dataset")


def run_retrieval(args: argparse.Namespace) -> int:
    """``clipforge eval retrieval``."""
    from ..evaluate import evaluate_retrieval, load_retrieval_data
    from ..evaluate.report import write_report

    started = time.time()
    common = _common(args)
    data = load_retrieval_data(args.data, args.images, args.split, args.skip_missing)
    model, preprocess = load_model_arg(args.model, common["device"], args.seed)
    result = evaluate_retrieval(model, data, preprocess, batch_size=args.batch_size, **common)
    report = {**_header(args, "retrieval", started), "data": args.data, **result}
    replaced = _earlier_report(args)
    written = write_report(report, args.out) if args.out else []
    metrics = result["metrics"]
    summary = [f"retrieval on {args.data}: {result['num_images']} images, {result['num_texts']} captions"]
    for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        recalls = "  ".join(f"R@{k} {metrics[f'{direction}_recall@{k}']:.4f}" for k in (1, 5, 10))
        summary.append(f"{label}  {recalls}")
    return _finish(args, report, summary, written, replaced)


def run_linear_probe(args: argparse.Namespace) -> int:
    """``clipforge eval linear-probe``."""
    from ..evaluate import evaluate_linear_probe, load_classification_data
    from ..evaluate.report import write_report

    if args.few_shot is not None and args.few_shot < 1:
        raise CliError(f"--few-shot must be at least 1, got {args.few_shot}")
    if not 0 < args.val_fraction < 1:
        raise CliError(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}")
    started = time.time()
    common = _common(args)
    train = load_classification_data(args.train, args.images)
    test = load_classification_data(args.test, args.images)
    model, preprocess = load_model_arg(args.model, common["device"], args.seed)
    result = evaluate_linear_probe(model, train, test, preprocess, args.few_shot, args.val_fraction, args.seed,
                                   args.batch_size, **common)
    report = {**_header(args, "linear-probe", started), "train": args.train, "test": args.test, **result}
    replaced = _earlier_report(args)
    written = write_report(report, args.out) if args.out else []
    if args.few_shot:
        sizes = (f"{args.few_shot}-shot: {result['num_train']} training images, C chosen on "
                 f"{result['num_val']} others")
    else:
        sizes = f"{result['num_train']} training images ({result['num_val']} first held out to choose C)"
    summary = [f"linear probe, {sizes}, {result['num_test']} test images",
               f"accuracy  {result['accuracy']:.4f}",
               f"C         {result['C']:.4g}" + ("" if result["sweep"] else " (not tuned, see the note)")]
    return _finish(args, report, summary, written, replaced)
