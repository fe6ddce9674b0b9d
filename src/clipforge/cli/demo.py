"""``clipforge demo``: build the offline demo dataset, train a small CLIP on it, evaluate zero-shot.

Examples::

    clipforge demo                          # about 10 minutes on 2 CPU cores, into runs/demo
    clipforge demo --quick                  # a one-minute check of the set-up on a data slice, into runs/demo-quick
    clipforge demo --minutes 30 --device cuda --run-dir runs/demo-long
    clipforge demo --serve --port 8080      # then search its collections in a browser

Interrupted? Run the same command again: data preparation and training resume where they stopped
(a run stopped before its first checkpoint starts again). A run folder that holds another run
(model, batch size, step plan or data folder) is refused: pass another --run-dir.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import math
from pathlib import Path

from . import CliError
from ._common import check_out_folder

DEFAULT_PORT = 1234  # clipforge serve's default


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
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model preset: demo-rn or demo-vit, or any that `clipforge models` lists "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--data-dir", metavar="DIR", help="where to build the dataset (default: the demo cache)")
    parser.add_argument("--run-dir", metavar="DIR", default="runs/demo", action=_RunDir,
                        help="run folder (default runs/demo; runs/demo-quick with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                        help="torch CPU threads (default auto: the cores the loader worker leaves free, or one when "
                             "that trains faster or the machine is busy)")
    parser.add_argument("--steps", type=int, metavar="N", help="train exactly N steps instead of a time budget")
    parser.add_argument("--quick", action="store_true",
                        help="a small data slice and 40 short steps (run folder runs/demo-quick unless --run-dir)")
    parser.add_argument("--serve", action="store_true",
                        help="after the demo, serve its search collections at http://127.0.0.1:PORT (Ctrl-C stops)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="N",
                        help=f"port of --serve (default {DEFAULT_PORT}); checked free before the demo trains")
    parser.add_argument("--prepare-only", action="store_true",
                        help="install the data sources and build the dataset (with --quick: its slice), then stop")
    parser.set_defaults(func=run, run_dir_given=False)


class _RunDir(argparse.Action):
    """``--run-dir``, remembering that it was given: ``--quick`` changes only the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.run_dir, namespace.run_dir_given = values, True


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its results table; bad arguments and a missing data source are one-line
    errors, raised before any data preparation or training."""
    from ..demo.sources import DemoSourceError
    from ..demo import format_results, run_demo
    from ..demo.run import QUICK_RUN_DIR
    from ..demo.run_folder import DemoRunFolderError
    from ..train.main import TrainingStopped

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    if args.data_dir is not None and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        # only this: a prepared dataset in a read-only folder is fine to train on
        raise CliError(f"--data-dir {args.data_dir}: is a file; expected a folder for the demo dataset")
    if args.prepare_only:
        return _prepare_only(args.data_dir, args.quick)
    run_dir = QUICK_RUN_DIR if args.quick and not args.run_dir_given else args.run_dir
    _check_arguments(args, run_dir)
    try:
        result = run_demo(run_dir, minutes=args.minutes, model=args.model, data_dir=args.data_dir,
                          device=args.device, threads=args.threads, quick=args.quick, steps=args.steps)
    except (DemoSourceError, DemoRunFolderError, TrainingStopped) as error:
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

        serve_args = build_parser().parse_args(["serve", *search["collections"], "--model", str(result.checkpoint),
                                                "--port", str(args.port)])
        return serve_args.func(serve_args)
    return 0


def _check_arguments(args: argparse.Namespace, run_dir: str) -> None:
    """The one-line errors a user should get at once, not after minutes of data preparation and training."""
    from ..demo.run import check_model

    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise CliError(f"--minutes {args.minutes:g}: expected a number of minutes above 0")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps {args.steps}: expected at least 1")
    try:
        check_model(args.model)
    except ValueError as error:
        raise CliError(f"--model: {error}") from None
    check_out_folder(run_dir, "--run-dir", "the demo's checkpoints and reports")
    if args.serve:
        missing = [name for name in ("faiss", "pyarrow", "uvicorn") if importlib.util.find_spec(name) is None]
        if missing:
            raise CliError(f"--serve needs the search extra ({', '.join(missing)} missing): "
                           "pip install 'clipforge[search]'")
        _check_port_free(args.port)


def _check_port_free(port: int) -> None:
    """Bind ``port`` on 127.0.0.1 (where ``clipforge serve`` will listen) and let it go again."""
    if not 1 <= port <= 65535:
        raise CliError(f"--port {port}: expected 1..65535")
    from .serve import open_bound_socket

    try:
        open_bound_socket("127.0.0.1", port).close()
    except OSError as error:
        why = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be bound ({error.strerror or error})"
        raise CliError(f"--port {port}: 127.0.0.1:{port} {why}; expected a free port for --serve "
                       "(pass another --port, or stop what listens there)") from None


def _prepare_only(data_dir: str | None, quick: bool) -> int:
    """Install the sources and build the dataset that ``clipforge demo`` (with ``quick``: ``--quick``)
    trains on (idempotent); print where it is and how to train on it."""
    from ..demo.dataset import demo_data_plan, prepare_demo_data
    from ..demo.sources import DemoSourceError

    cache_dir, data_config, folder = demo_data_plan(quick, data_dir)
    try:
        dataset = prepare_demo_data(cache_dir, data_config, data_dir=folder)
    except DemoSourceError as error:
        raise CliError(str(error)) from None
    command = "clipforge demo --quick" if quick else "clipforge demo"
    print(f"prepared only; train on it with: {command}" + (f" --data-dir {dataset.root}" if data_dir else ""))
    return 0
