"""Evaluation reports on disk: a JSON file and PNG plots (matplotlib, imported only when plotting).

Plots use matplotlib's object API with the Agg canvas, so nothing here touches pyplot's global
state or needs a display. The files of one run are written as a set (:func:`output_set`): a run
that fails leaves the previous run's files as they were, and ``report.json`` only ever sits beside
the plots it was written with.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from ..files import DiskFullError, atomic_path, is_disk_full, write_text_atomic

# Up to this many classes a confusion matrix stays readable.
CONFUSION_MAX_CLASSES = 30
# Up to this many classes the per-class plot names every class; above it, a sorted curve.
BARS_MAX_CLASSES = 60
# What write_zeroshot_report may write besides report.json; one it does not make this run is removed.
ZEROSHOT_PLOTS = ("per_class_accuracy.png", "confusion_matrix.png")
REPORT_NAME = "report.json"


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON (NaN written as null), atomically; returns the path."""
    path = Path(path)
    _check_out_dir(path.parent)

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return write_text_atomic(path, json.dumps(clean(report), indent=2, ensure_ascii=False) + "\n")


def _check_out_dir(folder: Path) -> None:
    """The report folder (``--out``) must be a folder, made when missing."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file; expected a folder for report.json and the plots")
    folder.mkdir(parents=True, exist_ok=True)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'clipforge[eval]'") from error
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_per_class_accuracy(names: Sequence[str], recalls: Sequence[float | None], path: str | os.PathLike,
                            title: str = "per-class accuracy") -> Path:
    """Bar per class (few classes) or the sorted per-class accuracies (many); classes without
    samples are left out."""
    pairs = [(name, recall) for name, recall in zip(names, recalls) if recall is not None]
    mean = sum(recall for _, recall in pairs) / max(len(pairs), 1)
    if len(pairs) <= BARS_MAX_CLASSES:
        figure = _figure(7, 1.2 + 0.28 * len(pairs))
        axes = figure.add_subplot()
        axes.barh(range(len(pairs)), [recall for _, recall in pairs], color="tab:blue")
        axes.set_yticks(range(len(pairs)), [name for name, _ in pairs], fontsize=8)
        axes.invert_yaxis()  # first class on top
        axes.set_xlim(0, 1)
        axes.set_xlabel("accuracy (recall)")
        axes.axvline(mean, color="tab:red", linestyle="--")
    else:
        figure = _figure(8, 4)
        axes = figure.add_subplot()
        ordered = sorted(pairs, key=lambda pair: pair[1])
        axes.plot(range(len(ordered)), [recall for _, recall in ordered], color="tab:blue")
        worst = "\n".join(f"{name}: {recall:.2f}" for name, recall in ordered[:5])
        axes.text(0.98, 0.03, f"lowest:\n{worst}", transform=axes.transAxes, ha="right", va="bottom", fontsize=7)
        axes.set_xlabel(f"classes, sorted ({len(ordered)})")
        axes.set_ylabel("accuracy (recall)")
        axes.set_ylim(0, 1)
        axes.axhline(mean, color="tab:red", linestyle="--")
    axes.set_title(f"{title} (mean {mean:.3f})")
    figure.tight_layout()
    return _save(figure, path)


def plot_confusion_matrix(matrix, names: Sequence[str], path: str | os.PathLike,
                          title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with counts."""
    rows = [list(map(int, row)) for row in matrix]
    totals = [max(sum(row), 1) for row in rows]
    normalised = [[count / total for count in row] for row, total in zip(rows, totals)]
    size = 2.5 + 0.4 * len(names)
    figure = _figure(size, size)
    axes = figure.add_subplot()
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i, row in enumerate(rows):
        for j, count in enumerate(row):
            if count:
                color = "white" if normalised[i][j] > 0.5 else "black"
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_title(title)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    _check_out_dir(path.parent)
    with atomic_path(path) as temporary:  # never a truncated PNG
        figure.savefig(temporary, format="png")
    return path


@contextlib.contextmanager
def output_set(out_dir: str | os.PathLike, outputs: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder for the files of one run, moved into ``out_dir`` together when the block succeeds.

    Write every file of the run into the yielded folder (hidden, inside ``out_dir``, so the moves
    are renames). On success the old ``report.json`` is removed first, then each staged file
    replaces its namesake, any of ``outputs`` this run did not make (a plot of an earlier run) is
    removed, and ``report.json`` moves in last: a ``report.json`` is only ever beside its own
    files. On any error nothing in ``out_dir`` changes and the staging folder is removed.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        try:
            yield staging
        except BaseException as error:
            if is_disk_full(error):
                full = DiskFullError(f"no space left on the device writing {out_dir} (the previous files are intact)")
                full.errno = errno.ENOSPC
                raise full from None
            raise
        made = sorted(path.name for path in staging.iterdir() if not path.name.startswith("."))
        with contextlib.suppress(FileNotFoundError):
            (out_dir / REPORT_NAME).unlink()
        for name in [*(name for name in made if name != REPORT_NAME), *(name for name in made if name == REPORT_NAME)]:
            os.replace(staging / name, out_dir / name)
        for name in outputs:
            if name not in made and name != REPORT_NAME:
                with contextlib.suppress(FileNotFoundError):
                    (out_dir / name).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_zeroshot_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """``report.json``, ``per_class_accuracy.png`` and ``confusion_matrix.png`` (few classes), as one
    set (:func:`output_set`): a failure leaves the previous run's files, a plot this run does not
    make is removed."""
    out_dir = Path(out_dir)
    per_class = report["per_class"]
    names = [entry["class"] for entry in per_class]
    made = []
    with output_set(out_dir, ZEROSHOT_PLOTS) as staging:
        try:
            made.append(plot_per_class_accuracy(names, [entry["recall"] for entry in per_class],
                                                staging / "per_class_accuracy.png"))
            if len(per_class) <= CONFUSION_MAX_CLASSES:
                made.append(plot_confusion_matrix(report["confusion_matrix"], names, staging / "confusion_matrix.png"))
        except ImportError as error:
            report.setdefault("notes", []).append(f"no plots: {error}")
        write_json(report, staging / REPORT_NAME)
    return [out_dir / REPORT_NAME, *(out_dir / path.name for path in made)]


def write_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """``report.json`` of a task without plots (retrieval, the linear probe), as one set
    (:func:`output_set`): zero-shot plots an earlier run left in ``out_dir`` are removed, since they
    would otherwise sit beside a report they do not belong to."""
    with output_set(out_dir, ZEROSHOT_PLOTS) as staging:
        write_json(report, staging / REPORT_NAME)
    return [Path(out_dir) / REPORT_NAME]
