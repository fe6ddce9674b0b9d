"""``clipforge eval suite``: zero-shot over many datasets, few-shot probes, retrieval, one table.

Examples::

    clipforge eval suite --model ckpt/ --config suite.toml --out runs/suite
    clipforge eval suite --model ckpt/ --datasets imagenet=/data/val,imagenet-r=/data/imagenet-r \\
        --probe-train imagenet=/data/train --shots 1,2,4,8,16 --out runs/suite --skip-existing
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import CliError
from ._common import add_cache_arguments, check_out_folder, non_negative_int, positive_int


def register_suite(tasks: argparse._SubParsersAction, add_model_arguments) -> None:
    """Add the ``suite`` task to ``clipforge eval``."""
    suite = tasks.add_parser("suite", help="a benchmark suite: many datasets, one table and the paper's plots",
                             description="Zero-shot over many datasets (standard protocols by name), optional "
                             "few-shot linear probes and retrieval sets; writes one CLIP_benchmark-schema JSON "
                             "per dataset and task, results.md / results.csv and PNG plots.")
    suite.add_argument("--config", metavar="TOML", help="suite file ([zeroshot.NAME], [retrieval.NAME], shots)")
    suite.add_argument("--datasets", metavar="NAME=PATH,...",
                       help="zero-shot sets; a protocol name (imagenet, imagenet-r, objectnet, ...) is read by its "
                       "protocol, any other name as an image folder, CSV or CLIP_benchmark webdataset folder; a "
                       "PATH may hold '=', and ',' when that path exists")
    suite.add_argument("--probe-train", metavar="NAME=PATH,...",
                       help="training split per dataset for the few-shot linear probes")
    suite.add_argument("--shots", default=None, metavar="K,...",
                       help="images per class of the few-shot probes (default with --probe-train: 1,2,4,8,16)")
    suite.add_argument("--retrieval", metavar="NAME=CAPTIONS,...", help="image-caption sets for retrieval recall")
    suite.add_argument("--protocol", default="subset", choices=["subset", "1000way"],
                       help="scoring of the 200-class ImageNet sets and ObjectNet given by --datasets")
    suite.add_argument("--pretrained", metavar="TAG", help="the 'pretrained' field of the results "
                       "(default: the checkpoint's file name)")
    suite.add_argument("--skip-existing", action="store_true", help="keep results already in --out (resume)")
    suite.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    add_model_arguments(suite)
    suite.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
    suite.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N")
    add_cache_arguments(suite)
    suite.set_defaults(func=run_suite_command)


def _config(args: argparse.Namespace):
    from ..evaluate.suite import (DEFAULT_SHOTS, RetrievalEntry, SuiteConfig, parse_pairs, parse_shots,
                                  read_suite_config, zeroshot_entry)

    if bool(args.config) == bool(args.datasets or args.retrieval):
        raise CliError("pass either --config SUITE.toml or --datasets/--retrieval NAME=PATH,...")
    if args.config:
        config = read_suite_config(args.config)
    else:
        config = SuiteConfig()
        for name, path in parse_pairs(args.datasets, "--datasets") if args.datasets else []:
            config.zeroshot.append(zeroshot_entry(name, path, scoring=args.protocol))
        for name, path in parse_pairs(args.retrieval, "--retrieval") if args.retrieval else []:
            config.retrieval.append(RetrievalEntry(name, path))
    if args.probe_train:
        by_name = {entry.name: entry for entry in config.zeroshot}
        for name, path in parse_pairs(args.probe_train, "--probe-train"):
            if name not in by_name:
                raise CliError(f"--probe-train {name}: no zero-shot dataset of that name "
                               f"(have: {', '.join(by_name) or 'none'})")
            by_name[name].probe_train = path
    if args.shots is not None:
        config.shots = parse_shots(args.shots, "--shots")
    elif not config.shots and any(entry.probe_train for entry in config.zeroshot):
        config.shots = list(DEFAULT_SHOTS)
    return config


def _architecture_name(model) -> str:
    """The preset whose config the model has (CLIP_benchmark's "model" field), else "clipforge"."""
    from ..models import available_models, get_config

    for name in available_models():
        try:
            if get_config(name) == model.config:
                return name
        except Exception:  # a preset that cannot be built here says nothing about this model
            continue
    return "clipforge"


def _fingerprint(spec: str) -> str | None:
    """Size and modification time of a checkpoint file, or of every file of a checkpoint folder:
    a resumed suite reuses results only of the same weights."""
    path = Path(spec).expanduser()
    if not path.exists():
        return None  # a preset's random weights: the name and the seed say it
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def run_suite_command(args: argparse.Namespace) -> int:
    """``clipforge eval suite``."""
    from ..evaluate.suite import run_suite
    from . import _common as eval_cli

    started = time.time()
    config = _config(args)
    check_out_folder(args.out, what="the results")
    device = eval_cli.resolve_device_arg(args.device)
    model, preprocess = eval_cli.load_model_arg(args.model, device, args.seed)
    pretrained = args.pretrained or (Path(args.model).name if Path(args.model).expanduser().exists() else "random")
    model_name = args.model if pretrained == "random" else _architecture_name(model)
    summary = run_suite(model, preprocess, config, args.out, model_name=str(model_name), pretrained=pretrained,
                        skip_existing=args.skip_existing, batch_size=args.batch_size, seed=args.seed,
                        model_id=_fingerprint(args.model) or f"{args.model} seed {args.seed}", device=device,
                        precision=args.precision, num_workers=args.workers, cache_dir=eval_cli.feature_cache_dir(args),
                        progress=True)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {len(summary['records'])} results and " + ", ".join(str(p) for p in summary["written"])
          + f" in {time.time() - started:.1f} s")
    for error in summary["errors"]:
        print(f"error: {error['dataset']}: {error['error']}", file=sys.stderr)
    return 1 if summary["errors"] else 0
