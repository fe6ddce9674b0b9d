"""What a run records: a JSONL metrics log, optional TensorBoard events, and the final curves PNG.

Only rank 0 creates a :class:`MetricsLog`. matplotlib and TensorBoard are imported when used, so
neither is needed to train.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..files import DiskFullError, atomic_path, is_disk_full, write_text_atomic

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricsLog:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl`` (and TensorBoard)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            # TensorBoard hides events at or after purge_step; the resumed run rewrites only the steps
            # after resume_step, so the checkpoint step's own scalars (kept in metrics.jsonl) stay.
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` (numbers or strings) at optimizer step ``step``."""
        record = {"step": step, **values}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(f"no space left on the device writing {self.path}") from None
            raise
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(name if name.startswith("eval/") else f"train/{name}", value, step)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the buffer could not be flushed (full disk): log() already said so
            pass
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """Drop records past ``step``: a resumed run rewrites them, so curves show no duplicate steps."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# Evaluation metrics drawn in curves.png (others stay in metrics.jsonl and TensorBoard).
_PLOTTED = ("top1", "image_to_text_recall@1", "text_to_image_recall@1", "loss")


def _evaluation_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``"<set>/<metric>" -> (steps, values)`` of the evaluation records (keys ``eval/<set>/<metric>``)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in _PLOTTED and isinstance(value, (int, float)):
                steps, values = series.setdefault(f"{parts[1]}/{parts[2]}", ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def plot_curves(run_dir: str | Path) -> Path | None:
    """Draw loss and logit scale against step from the metrics log into ``run_dir/curves.png``,
    with the held-out losses beside the training loss and a panel of evaluation metrics.

    Returns the PNG path, or None when there is nothing to plot or matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r]
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    evaluations = _evaluation_series(read_metrics(run_dir / METRICS_FILE))
    accuracy = {name: series for name, series in evaluations.items() if not name.endswith("/loss")}
    columns = 2 + bool(accuracy)
    figure, axes = plt.subplots(1, columns, figsize=(5 * columns, 3.5))
    loss_axis, scale_axis = axes[0], axes[1]
    loss_axis.plot(steps, [r["loss"] if math.isfinite(r["loss"]) else float("nan") for r in records], label="training")
    for name, (eval_steps, values) in evaluations.items():
        if name.endswith("/loss"):  # held-out loss beside the training loss: overfitting shows as a gap
            loss_axis.plot(eval_steps, values, marker="o", label=f"{name[:-5]} (held-out)")
    loss_axis.set(xlabel="step", ylabel="loss", title="contrastive loss")
    if len(evaluations) > len(accuracy):
        loss_axis.legend(fontsize=8)
    scale_axis.plot(steps, [r.get("logit_scale", float("nan")) for r in records], color="tab:orange")
    scale_axis.set(xlabel="step", ylabel="exp(logit_scale)", title="logit scale (capped at 100)")
    if accuracy:
        for name, (eval_steps, values) in accuracy.items():
            axes[2].plot(eval_steps, values, marker="o", label=name)
        axes[2].set(xlabel="step", ylabel="accuracy / recall", title="evaluation while training", ylim=(0, None))
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    out = run_dir / CURVES_FILE
    try:
        with atomic_path(out) as temporary:  # never a truncated PNG, even on a full disk
            figure.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(figure)
    return out
