"""Evaluation reports on disk: a JSON file and PNG plots (matplotlib, imported only when plotting).

Plots use matplotlib's object API with the Agg canvas, so nothing here touches pyplot's global
state or needs a display.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from ..files import atomic_path, write_text_atomic

# Up to this many classes a confusion matrix stays readable.
CONFUSION_MAX_CLASSES = 30
# Up to this many classes the per-class plot names every class; above it, a sorted curve.
BARS_MAX_CLASSES = 60


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


def write_zeroshot_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """``per_class_accuracy.png``, ``confusion_matrix.png`` (few classes) and ``report.json``."""
    out_dir = Path(out_dir)
    per_class = report["per_class"]
    names = [entry["class"] for entry in per_class]
    written = []
    try:
        written.append(plot_per_class_accuracy(names, [entry["recall"] for entry in per_class],
                                               out_dir / "per_class_accuracy.png"))
        if len(per_class) <= CONFUSION_MAX_CLASSES:
            written.append(plot_confusion_matrix(report["confusion_matrix"], names, out_dir / "confusion_matrix.png"))
    except ImportError as error:
        report.setdefault("notes", []).append(f"no plots: {error}")
    return [write_json(report, out_dir / "report.json"), *written]
