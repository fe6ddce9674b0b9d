"""``clipforge demo``: build the offline demo dataset, train a small CLIP on it, evaluate zero-shot.

Examples::

    clipforge demo                          # about 10 minutes on 2 CPU cores
    clipforge demo --quick                  # a one-minute check of the set-up on a data slice
    clipforge demo --minutes 30 --device cuda --run-dir runs/demo-long

Interrupted? Run the same command again: data preparation and training resume where they stopped.
"""
from __future__ import annotations

import argparse

from . import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    from ..demo import DEFAULT_MINUTES, DEFAULT_MODEL

    parser = subparsers.add_parser(
        "demo",
        help="train a small CLIP on real images offline and evaluate zero-shot (about 10 minutes on a CPU)",
        description="Install and build a real image-text dataset (emoji, Tux Paint stamps, Open Clip Art), "
        "train a small CLIP on it for a time budget, then evaluate zero-shot classification of Fluent 3D "
        "emoji (a style never seen in training) and retrieval on held-out pairs. Running the same command "
        "again resumes an interrupted run.",
    )
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"training time budget (default {DEFAULT_MINUTES:g}); the step count is planned from a speed "
                             "check and re-planned while training")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model preset (default {DEFAULT_MODEL})")
    parser.add_argument("--data-dir", metavar="DIR", help="where to build the dataset (default: the demo cache)")
    parser.add_argument("--run-dir", metavar="DIR", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                        help="torch CPU threads (default auto: the cores the loader worker leaves free, or one when "
                             "that trains faster or the machine is busy)")
    parser.add_argument("--steps", type=int, metavar="N", help="train exactly N steps instead of a time budget")
    parser.add_argument("--quick", action="store_true", help="a small data slice and 40 short steps")
    parser.add_argument("--serve", action="store_true",
                        help="after the demo, serve its search collections at http://127.0.0.1:1234 (Ctrl-C stops)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="install the data sources and build the dataset, then stop (no training)")
    parser.set_defaults(func=run)


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its results table; a missing data source is a one-line error."""
    from ..demo.sources import DemoSourceError
    from ..demo import format_results, run_demo
    from ..train.main import TrainingStopped

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if args.prepare_only:
        return _prepare_only(args.data_dir)
    try:
        result = run_demo(args.run_dir, minutes=args.minutes, model=args.model, data_dir=args.data_dir,
                          device=args.device, threads=args.threads, quick=args.quick, steps=args.steps)
    except (DemoSourceError, TrainingStopped) as error:
        raise CliError(str(error)) from None
    print(format_results(result.results))
    print(f"\nwrote {result.run_dir}/: results.json, curves.png, predictions.png, zeroshot/, retrieval.json, "
          f"model/ (clipforge.load('{result.checkpoint}'))")
    search = result.results.get("search") or {}
    if search:
        print(f"search: {search['serve']}")
    if args.serve:
        if not search:
            raise CliError("--serve needs the search collections: pip install 'clipforge[search]' and run again")
        from . import build_parser

        serve_args = build_parser().parse_args(["serve", *search["collections"], "--model", str(result.checkpoint)])
        return serve_args.func(serve_args)
    return 0


def _prepare_only(data_dir: str | None) -> int:
    """Install the sources and build the dataset (idempotent); print where it is and its counts."""
    from ..demo.dataset import prepare_demo_data
    from ..demo.sources import DemoSourceError, default_cache_dir

    try:
        dataset = prepare_demo_data(default_cache_dir(), data_dir=data_dir)
    except DemoSourceError as error:
        raise CliError(str(error)) from None
    print(f"prepared only; train on it with: clipforge demo --data-dir {dataset.root}")
    return 0
