"""The suite's outputs: atomic JSON, the results table (markdown + CSV) and the paper's two plots."""
from __future__ import annotations

import csv
import io
import json
import os
from functools import partial
from pathlib import Path

from ..files import atomic_path, write_text_atomic

# The supervised ImageNet model the CLIP paper sets beside zero-shot CLIP (Radford et al. 2021,
# Figure 13, right: ResNet-101, top-1 %), on ImageNet and each natural shift it reports.
SUPERVISED_REFERENCE = {
    "supervised ResNet-101 (CLIP paper, Fig. 13)": {"imagenet": 76.2, "imagenet-v2": 64.3, "imagenet-r": 37.7,
                                                    "imagenet-sketch": 25.2, "objectnet": 32.6, "imagenet-a": 2.7},
}
_REFERENCE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")  # one per reference model
MAX_REFERENCES = len(_REFERENCE_MARKERS)  # reference models one plot can tell apart
# The probe metric of the tables; a probe's JSON also holds CLIP_benchmark's lp_acc5,
# lp_mean_per_class_recall, fewshot_k and seed.
PROBE_METRIC = "lp_acc1"
MASKED_SETS = ("imagenet-r", "imagenet-a", "imagenet-o", "objectnet")  # where subset vs 1000way matters
SHIFT_COLORS = {"imagenet-v2": "tab:blue", "imagenet-r": "tab:orange", "imagenet-sketch": "tab:green",
                "objectnet": "tab:red", "imagenet-a": "tab:purple"}


_write_atomic = write_text_atomic  # clipforge.files: atomic, usual permissions, one line on a full disk


def write_json_atomic(record: dict, path: str | os.PathLike) -> Path:
    """``record`` as JSON at ``path``, written beside it and renamed into place."""
    return _write_atomic(Path(path), json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _zeroshot_rows(records: list[dict]) -> list[dict]:
    rows = {}
    for record in records:
        if record["task"] == "zeroshot_classification":
            rows[record["dataset"]] = {"record": record, "probes": {}}
    for record in records:
        if record["task"] == "linear_probe" and record["dataset"] in rows:
            rows[record["dataset"]]["probes"][record["fewshot_k"]] = record["metrics"][PROBE_METRIC]
    return list(rows.values())


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _cell(text) -> str:
    """``text`` safe inside a markdown table cell: a ``|`` would end the cell, a newline the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table_markdown(records: list[dict], errors: list[dict]) -> str:
    """The results as markdown tables: zero-shot (+ probes), retrieval, errors."""
    lines = []
    rows = _zeroshot_rows(records)
    shots = sorted({k for row in rows for k in row["probes"]})
    if rows:
        head = ["dataset", "protocol", "images", "classes", "top-1", "top-5", "mean per-class recall"]
        head += [f"{k}-shot probe" for k in shots]
        lines += ["## Zero-shot classification (%)", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * len(head)]
        for row in rows:
            record, metrics = row["record"], row["record"]["metrics"]
            protocol = record.get("protocol") or "folder"
            if record.get("protocol") in MASKED_SETS and record.get("scoring"):
                protocol += f" ({record['scoring']})"
            cells = [_cell(record["dataset"]), protocol, str(record.get("num_images", "")), str(record.get("num_classes", "")),
                     _pct(metrics.get("acc1")), _pct(metrics.get("acc5")), _pct(metrics.get("mean_per_class_recall"))]
            cells += [_pct(row["probes"].get(k)) for k in shots]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    detection = [row["record"] for row in rows if row["record"]["metrics"].get("aupr") is not None
                 or row["record"].get("protocol") == "imagenet-o"]
    if detection:
        lines += ["## Out-of-distribution detection (%)", "", "| dataset | AUPR (positives: its images; "
                  "negatives: ImageNet's of the same classes) |", "| --- | --- |"]
        lines += [f"| {_cell(record['dataset'])} | " + (_pct(record["metrics"]["aupr"]) if record["metrics"].get("aupr")
                  is not None else "not computed: needs the imagenet set in the suite") + " |" for record in detection]
        lines.append("")
    retrieval = [r for r in records if r["task"] == "zeroshot_retrieval"]
    if retrieval:
        lines += ["## Retrieval recall (%)", "", "| dataset | image->text R@1 | R@5 | R@10 | text->image R@1 | R@5 | R@10 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for record in retrieval:
            m = record["metrics"]
            cells = [_pct(m[f"text_retrieval_recall@{k}"]) for k in (1, 5, 10)]
            cells += [_pct(m[f"image_retrieval_recall@{k}"]) for k in (1, 5, 10)]
            lines.append(f"| {_cell(record['dataset'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if errors:
        lines += ["## Not evaluated", ""] + [f"- {_cell(e['dataset'])}{' (' + e['task'] + ')' if e.get('task') else ''}: "
                                             f"{e['error']}" for e in errors] + [""]
    return "\n".join(lines)


def table_csv(records: list[dict]) -> str:
    """Long CSV: dataset, task, fewshot_k, protocol, scoring, metric, value (one row per metric; a
    probe's row is its ``lp_acc1``, its other metrics are in its JSON)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "model", "pretrained", "task", "fewshot_k", "protocol", "scoring", "metric", "value"])
    for record in records:
        for metric, value in record["metrics"].items():
            if record["task"] == "linear_probe" and metric != PROBE_METRIC:
                continue  # the table's probe score, as results.md shows it
            writer.writerow([record["dataset"], record["model"], record["pretrained"], record["task"],
                             record.get("fewshot_k", ""), record.get("protocol") or "", record.get("scoring") or "",
                             metric, "" if value is None else value])
    return buffer.getvalue()


def _figure(width: float, height: float):
    from .report import _figure as figure  # the Agg-canvas figure every evaluation plot uses

    return figure(width, height)


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, bbox_inches="tight", format="png")
    return path


def reference_points(references: dict[str, dict[str, float]], protocol: str) -> list[tuple[str, float, float]]:
    """``(model, ImageNet top-1, top-1 on protocol)`` of each reference model that reports ``protocol``."""
    return [(model, scores["imagenet"], scores[protocol]) for model, scores in references.items() if protocol in scores]


def plot_effective_robustness(records: list[dict], path: Path,
                              references: dict[str, dict[str, float]] | None = None) -> Path | None:
    """ImageNet top-1 against each shifted set's top-1, y = x, and the reference models' points
    (``references``: model name -> {protocol: top-1 %}, ImageNet's included; default the paper's
    supervised ResNet-101, ``SUPERVISED_REFERENCE``)."""
    references = SUPERVISED_REFERENCE if references is None else references
    top1 = {r["dataset"]: r["metrics"]["acc1"] for r in records
            if r["task"] == "zeroshot_classification" and r["metrics"].get("acc1") is not None}
    protocols = {r["dataset"]: r.get("protocol") for r in records if r["task"] == "zeroshot_classification"}
    base = next((100 * top1[name] for name, protocol in protocols.items() if protocol == "imagenet" and name in top1), None)
    shifted = [(name, protocols[name]) for name in top1 if protocols.get(name) in SHIFT_COLORS]
    if base is None or not shifted:
        return None
    figure = _figure(6.5, 6)
    axes = figure.add_subplot()
    axes.plot([0, 100], [0, 100], linestyle="--", color="grey", label="y = x (no drop under shift)")
    for name, protocol in shifted:
        color = SHIFT_COLORS[protocol]
        axes.scatter([base], [100 * top1[name]], color=color, marker="*", s=180, zorder=3,
                     label=f"this model: {name} {100 * top1[name]:.1f}%")
        for (model, x, y), marker in zip(reference_points(references, protocol), _REFERENCE_MARKERS):
            axes.scatter([x], [y], facecolors="none", edgecolors=color, marker=marker, s=70, label=f"{model}: {protocol}")
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 100)
    axes.set_xlabel("ImageNet top-1 (%)")
    axes.set_ylabel("top-1 under distribution shift (%)")
    axes.set_title("Effective robustness: this model against y = x and " + (
        "a supervised ResNet-101" if references is SUPERVISED_REFERENCE else "the reference models"))
    axes.legend(fontsize=7, loc="upper left")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_zeroshot_vs_fewshot(records: list[dict], path: Path) -> Path | None:
    """Few-shot linear-probe accuracy against shots per class, the zero-shot accuracy as a line."""
    rows = [row for row in _zeroshot_rows(records) if row["probes"]]
    if not rows:
        return None
    figure = _figure(7, 4.5)
    axes = figure.add_subplot()
    for index, row in enumerate(rows):
        color = f"C{index % 10}"
        shots = sorted(row["probes"])
        axes.plot(shots, [100 * row["probes"][k] for k in shots], marker="o", color=color,
                  label=f"{row['record']['dataset']}: linear probe")
        zero = row["record"]["metrics"].get("acc1")
        if zero is not None:
            axes.axhline(100 * zero, color=color, linestyle="--", label=f"{row['record']['dataset']}: zero-shot")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("training images per class")
    axes.set_ylabel("top-1 (%)")
    axes.set_title("Zero-shot vs few-shot linear probes")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def write_reports(records: list[dict], errors: list[dict], out_dir: Path,
                  references: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` and whichever plots the results allow; returns the paths."""
    written = [_write_atomic(out_dir / "results.md", table_markdown(records, errors)),
               _write_atomic(out_dir / "results.csv", table_csv(records))]
    for plot, name in ((partial(plot_effective_robustness, references=references), "effective_robustness.png"),
                       (plot_zeroshot_vs_fewshot, "zeroshot_vs_fewshot.png")):
        result = plot(records, out_dir / name)
        if result is not None:
            written.append(result)
        else:
            (out_dir / name).unlink(missing_ok=True)  # an earlier run's plot would not match this table
    return written
