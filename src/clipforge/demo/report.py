"""What ``clipforge demo`` shows a person: the results table and the grid of predictions."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from ..files import atomic_path

NOISE_ERRORS = 2.0  # the ensemble is "ahead beyond the noise" by more than this many paired standard errors

GRID_IMAGES = 24  # eval images shown in predictions.png


def draw_prediction_grid(data, result, path: str | os.PathLike, count: int = GRID_IMAGES, columns: int = 6,
                         seed: int = 0) -> Path:
    """A PNG of ``count`` eval images (a seeded sample), each with its true label and top-3 predictions.

    ``data`` is the :class:`~clipforge.evaluate.ClassificationData` and ``result`` the
    :class:`~clipforge.evaluate.ZeroShotResult` scored on it; a correct prediction is green.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows_of = {int(index): row for row, index in enumerate(result.indices.tolist())}
    chosen = sorted(random.Random(seed).sample(sorted(rows_of), min(count, len(rows_of))))
    probabilities = result.logits.softmax(dim=-1)  # (M, C)
    font = ImageFont.load_default(size=11)
    cell_w, thumb, line = 190, 96, 14
    cell_h = thumb + 6 + 4 * line + 8
    grid_rows = math.ceil(len(chosen) / columns)
    canvas = Image.new("RGB", (columns * cell_w, max(1, grid_rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for slot, index in enumerate(chosen):
        x, y = (slot % columns) * cell_w, (slot // columns) * cell_h
        with Image.open(data.paths[index]) as image:
            canvas.paste(image.convert("RGB").resize((thumb, thumb)), (x + (cell_w - thumb) // 2, y + 4))
        truth = data.labels[index]
        draw.text((x + 4, y + thumb + 6), _fit(f"true: {data.classes[truth]}", draw, font, cell_w - 8),
                  fill="black", font=font)
        top = probabilities[rows_of[index]].topk(3)
        for rank, (score, label) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            text = _fit(f"{rank}. {data.classes[label]} {score:.0%}", draw, font, cell_w - 8)
            draw.text((x + 4, y + thumb + 6 + rank * line), text,
                      fill=(0, 140, 0) if label == truth else (90, 90, 90), font=font)
    path = Path(path)
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
    return path


def _fit(text: str, draw, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def format_results(results: dict) -> str:
    """The short results table ``clipforge demo`` prints."""
    zeroshot, retrieval, seconds = results["zeroshot"], results["retrieval"], results["seconds"]
    chance = zeroshot["chance"]
    margin = zeroshot["ensemble_minus_bare"]
    lines = [
        f"clipforge demo: {results['model']}, {results['steps']} steps x {results['batch_size']} pairs "
        f"({results['epochs']} epochs) on {results['device']}, {results['threads']} threads",
        "",
        f"zero-shot on Fluent 3D emoji ({zeroshot['classes']} classes, chance {chance:.1%})   top-1    top-5",
        f"  class name only                                           {zeroshot['bare']['top1']:6.1%}   "
        f"{zeroshot['bare']['top5']:6.1%}",
        f"  prompt ensemble ({len(zeroshot['ensemble']['templates'])} templates)                              "
        f"{zeroshot['ensemble']['top1']:6.1%}   {zeroshot['ensemble']['top5']:6.1%}",
        f"  ensemble minus class name only: {margin['top1'] * 100:+.1f} points (paired standard error "
        f"{margin['paired_standard_error'] * 100:.1f}; {_margin_reading(margin)} the noise of {NOISE_ERRORS:g} errors)",
        f"  {_margin_sentence(margin)}; "
        + (f"quality floor (20x chance = {20 * chance:.0%} top-1) {'met' if results['floor']['met'] else 'NOT met'}"
           if 20 * chance < 1 else "too few classes for the 20x-chance floor"),
        "",
        f"retrieval on held-out pairs ({retrieval['images']} images, {retrieval['texts']} captions)   "
        "R@1     R@5    R@10",
    ]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        recalls = "  ".join(f"{retrieval[f'{direction}_recall@{k}']:6.1%}" for k in (1, 5, 10))
        lines.append(f"  {label:<56}{recalls}")
    lines += ["", f"time: data {seconds['prepare']:.0f} s, {_training_time(results)}, "
                  f"evaluation {seconds['evaluate']:.0f} s, total {seconds['total']:.0f} s"]
    return "\n".join(lines)


def _training_time(results: dict) -> str:
    """What training took in this call: done by an earlier call, resumed, or trained now (of its budget)."""
    if results.get("trained_by_earlier_call"):
        return "training done by an earlier call"
    seconds = results["seconds"]
    spent = results.get("training_budget_spent_s", seconds["calibrate"] + seconds["train"])
    budget = f" of its {results['training_budget_s']:.0f} s budget" if results.get("training_budget_s") else ""
    step = results.get("resumed_from_step")
    resumed = f", resumed at step {step}" if step is not None else ""
    return f"training {spent:.0f} s{budget}{resumed} (speed check {seconds['calibrate']:.0f} s)"


def _margin_sentence(margin: dict) -> str:
    """The ensemble's top-1 against bare names', honest about the noise: 'ensemble top-1 above bare
    names' (within the noise)'."""
    if margin["top1"] == 0:
        return "ensemble top-1 equal to bare names'"
    side = "above" if margin["top1"] > 0 else "below"
    noise = "within" if _margin_reading(margin) == "within" else "beyond"
    return f"ensemble top-1 {side} bare names' ({noise} the noise)"


def _margin_reading(margin: dict) -> str:
    """Where the ensemble's margin over bare names stands against the noise, in either direction."""
    if margin["beyond_noise"]:
        return "ahead beyond"
    if margin["top1"] < -NOISE_ERRORS * margin["paired_standard_error"]:
        return "behind beyond"
    return "within"
