"""What int8 costs: cosine of int8 to fp32 embeddings and zero-shot top-1 of both, on the calibration set.

Zero-shot scoring is clipforge.evaluate's (prompt ensembles, ``logit_scale * cosine``, top-k), so
the numbers match what ``clipforge eval zeroshot --model OUT`` reports for each precision.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .calibration import CalibrationSet


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (N,)
    return float(cosine.mean()), float(cosine.min())


def compare_precisions(folder: str | os.PathLike, calibration: CalibrationSet, templates="imagenet",
                       batch_size: int = 32, threads: int | None = None, progress: bool = True) -> dict:
    """Mean (and min) cosine of int8 to fp32 image and text embeddings; zero-shot top-1 of both when
    ``calibration`` has classes. Returns a JSON-able dict."""
    from ..evaluate import encode_images, encode_texts, topk_accuracy, zero_shot_classifier, zero_shot_logits
    from ..evaluate.zeroshot import logit_scale_of
    from .onnx_model import load_export

    report: dict = {"images": 0, "texts": len(calibration.prompts), "source": calibration.source}
    features, text_features, models = {}, {}, {}
    for precision in ("fp32", "int8"):
        model, preprocess = load_export(folder, threads=threads, precision=precision, allow_unfinished=True)
        models[precision] = model
        encoded = encode_images(model, calibration.paths, preprocess, batch_size, progress=progress,
                                desc=f"{precision} images")
        features[precision] = encoded
        text_features[precision] = encode_texts(model, calibration.prompts, batch_size=256)
    if not torch.equal(features["fp32"].indices, features["int8"].indices):
        raise ValueError(f"{calibration.source}: images readable in one precision but not the other")
    report["images"] = len(features["fp32"].indices)
    report["image_cosine_mean"], report["image_cosine_min"] = _mean_cosine(features["fp32"].features,
                                                                           features["int8"].features)
    report["text_cosine_mean"], report["text_cosine_min"] = _mean_cosine(text_features["fp32"], text_features["int8"])
    if calibration.classes:
        names = [" ".join(c.replace("_", " ").split()) for c in calibration.classes]
        targets = torch.tensor(calibration.labels)[features["fp32"].indices]
        label = "none" if templates is None else templates if isinstance(templates, str) else "custom"
        report.update(classes=len(names), templates=label)
        for precision, model in models.items():
            classifier = zero_shot_classifier(model, names, templates)  # (D, C)
            logits = zero_shot_logits(features[precision].features, classifier, logit_scale_of(model))  # (N, C)
            report[f"zeroshot_top1_{precision}"] = topk_accuracy(logits, targets, ks=(1,))[1]
    return report
