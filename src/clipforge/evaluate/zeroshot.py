"""Zero-shot classification: class embeddings from prompts, images scored by cosine similarity.

For each class every template is filled with the class name (and each synonym, when a class is a
list of names), the prompts are embedded and L2-normalised, averaged, and normalised again: the
paper's prompt ensembling. The stacked class embeddings form a (embed_dim, classes) matrix, so
``logit_scale * normalize(image_features) @ classifier`` gives the logits.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import metadata
from .datasets import ClassificationData
from .features import encode_images, encode_texts, model_device
from .metrics import confusion_matrix, mean_per_class_recall, per_class_recall, topk_accuracy

_PLACEHOLDER = re.compile(r"\{c?\}")


def fill_template(template: str, classname: str) -> str:
    """``template`` with its ``{}`` (OpenAI style) or ``{c}`` placeholder replaced by ``classname``."""
    return _PLACEHOLDER.sub(lambda _: classname, template)


def _read_list_file(path: Path) -> list:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """Templates from None/"none" (class name only), a dataset name, a file, one template or a list.

    A file is a JSON list or one template per line (``#`` comments allowed). Every template must
    hold a ``{}`` or ``{c}`` placeholder.
    """
    if templates is None or (isinstance(templates, str) and templates.strip().lower() == "none"):
        return ["{}"]
    if isinstance(templates, str):
        if os.path.isfile(templates):
            resolved = _read_list_file(Path(templates))
            source = templates
        elif metadata.has_templates(templates):
            return metadata.templates(templates)
        elif _PLACEHOLDER.search(templates):
            return [templates]
        else:
            raise ValueError(f"templates {templates!r} is not a file, a known dataset "
                             f"({', '.join(metadata.dataset_names())}), 'none', or a template with {{}}")
    else:
        resolved, source = list(templates), "templates"
    if not resolved or not isinstance(resolved, list):
        raise ValueError(f"{source}: expected a non-empty list of templates")
    for template in resolved:
        if not isinstance(template, str) or not _PLACEHOLDER.search(template):
            raise ValueError(f"{source}: template {template!r} has no {{}} or {{c}} placeholder for the class name")
    return resolved


def _names(entry) -> list[str]:
    names = [entry] if isinstance(entry, str) else list(entry)
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise ValueError(f"class name {entry!r} must be a non-empty string or list of strings")
    return names


def check_classnames(classnames: Sequence) -> None:
    """Raise ``ValueError`` for an empty list or a class name given twice (case-insensitive)."""
    if len(classnames) == 0:
        raise ValueError("no class names given")
    seen: dict[str, int] = {}
    for index, entry in enumerate(classnames):
        key = " ".join(_names(entry)).strip().lower()
        if key in seen:
            raise ValueError(f"label {_names(entry)[0]!r} is given twice (positions {seen[key]} and {index})")
        seen[key] = index


def zero_shot_classifier(model: torch.nn.Module, classnames: Sequence, templates=None,
                         tokenizer: Callable | None = None, device: str | torch.device | None = None,
                         batch_size: int = 256, precision: str = "fp32",
                         cache_dir: str | os.PathLike | None = None, progress: bool = False) -> torch.Tensor:
    """Class embeddings ``(embed_dim, num_classes)`` by prompt ensembling, L2-normalised per class.

    ``classnames``: a name per class, or a list of synonyms. ``templates``: see
    :func:`resolve_templates` (None: the bare class name). Returned on ``device`` (default: the
    model's).
    """
    check_classnames(classnames)
    templates = resolve_templates(templates)
    device = torch.device(device) if device is not None else model_device(model)
    prompts, owners = [], []
    for class_index, entry in enumerate(classnames):
        for name in _names(entry):
            prompts += [fill_template(template, name) for template in templates]
            owners += [class_index] * len(templates)
    prompt_features = encode_texts(model, prompts, tokenizer, batch_size, device, precision, cache_dir,
                                   progress, desc="prompts")
    prompt_features = F.normalize(prompt_features, dim=-1)  # (P, D)
    owners = torch.tensor(owners)  # (P,)
    sums = torch.zeros(len(classnames), prompt_features.shape[1]).index_add_(0, owners, prompt_features)
    means = sums / torch.bincount(owners, minlength=len(classnames))[:, None]  # (C, D)
    return F.normalize(means, dim=-1).t().contiguous().to(device)  # (D, C)


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor,
                     logit_scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """``logit_scale * cosine`` of images (N, D) against class embeddings (D, C): (N, C)."""
    image_features = F.normalize(image_features.float(), dim=-1)
    return float(logit_scale) * image_features @ classifier.to(image_features.device).float()


def zero_shot_predict(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(N, C)`` for a preprocessed batch ``(N, 3, H, W)``: softmax of
    ``exp(logit_scale) * cosine`` against a :func:`zero_shot_classifier` matrix."""
    with torch.no_grad():
        features = model.encode_image(images.to(model_device(model)))
    return zero_shot_logits(features, classifier, logit_scale_of(model)).softmax(dim=-1)


def logit_scale_of(model: torch.nn.Module) -> float:
    """The model's learned temperature ``exp(logit_scale)``, or 100 (OpenAI's cap) if it has none."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


def _default_preprocess(model: torch.nn.Module) -> Callable:
    from ..transforms import image_transform

    return image_transform(model.config.vision.image_size)


def classify(model: torch.nn.Module, images: Sequence, labels: Sequence, templates="imagenet",
             preprocess: Callable | None = None, top_k: int = 5, batch_size: int = 32,
             device: str | torch.device | None = None, precision: str = "fp32",
             num_workers: int = 0) -> list[dict]:
    """Zero-shot labels for images (paths or PIL images), like transformers' pipeline.

    Returns per image ``{"image": ..., "predictions": [{"label", "score"}, ...]}`` with the
    ``top_k`` softmax probabilities (``logit_scale * cosine`` over ``labels``), best first, or
    ``{"image": ..., "error": reason}`` for an image that could not be read.
    """
    classifier = zero_shot_classifier(model, labels, templates, device=device, precision=precision)
    features = encode_images(model, list(images), preprocess or _default_preprocess(model), batch_size,
                             num_workers, device, precision, progress=False)
    results = [{"image": str(image) if isinstance(image, (str, os.PathLike)) else index}
               for index, image in enumerate(images)]
    # The loader runs in order, so skipped images come in ascending position.
    unread = sorted(set(range(len(images))) - set(features.indices.tolist()))
    for index, (_, reason) in zip(unread, features.skipped):
        results[index]["error"] = reason
    if len(features.indices):
        probs = zero_shot_logits(features.features, classifier, logit_scale_of(model)).softmax(dim=-1)
        top = probs.topk(min(top_k, len(labels)), dim=-1)  # (N, k)
        for row, index in enumerate(features.indices.tolist()):
            results[index]["predictions"] = [
                {"label": _names(labels[c])[0], "score": float(p)}
                for p, c in zip(top.values[row].tolist(), top.indices[row].tolist())
            ]
    return results


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def resolve_classnames(spec, classes: Sequence[str]) -> list:
    """Prompt names for a dataset's ``classes`` (folder names or CSV labels, in label order).

    ``spec``: None (the class names with ``_`` as spaces); a dict or JSON object file mapping each
    class to a name or synonyms; a list, text file (one per line) or JSON list, in label order;
    or a built-in dataset name (its names matched to the classes by name, or to integer folder
    names by index). A list that matches the classes by name or integer index is aligned that way.
    """
    if spec is None:
        names = [" ".join(c.replace("_", " ").split()) for c in classes]
    else:
        source = str(spec)
        if isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
            spec = _read_list_file(Path(spec))
        elif isinstance(spec, str):
            if not metadata.has_classnames(spec):
                raise ValueError(f"classnames {spec!r} is neither a file nor a known dataset "
                                 f"({', '.join(metadata.dataset_names())})")
            spec = metadata.classnames(spec)
        names = _align(spec, classes, source)
    check_classnames(names)
    return names


def _align(spec, classes: Sequence[str], source: str) -> list:
    if isinstance(spec, dict):
        missing = [c for c in classes if c not in spec]
        if missing:
            raise ValueError(f"{source}: no name for class(es) {missing[:5]}")
        return [spec[c] for c in classes]
    spec = list(spec)
    if len(spec) != len(classes):
        raise ValueError(f"{source}: {len(spec)} class names for {len(classes)} classes in the data")
    by_name = {_norm(_names(entry)[0]): entry for entry in spec}
    if all(_norm(c) in by_name for c in classes):
        return [by_name[_norm(c)] for c in classes]
    if all(c.strip().isdigit() for c in classes) and sorted(int(c) for c in classes) == list(range(len(spec))):
        return [spec[int(c)] for c in classes]
    return spec


@dataclass
class ZeroShotResult:
    """Scores and metrics of a zero-shot evaluation; ``to_report()`` gives the JSON form."""

    classes: list[str]  # the data's class labels (folder names / CSV labels)
    classnames: list  # the names put into the prompts
    num_templates: int
    logits: torch.Tensor  # (M, C) logit_scale * cosine for the readable images
    indices: torch.Tensor  # (M,) position of each row's image in the data
    targets: torch.Tensor  # (M,) true labels
    metrics: dict[str, float]
    confusion: torch.Tensor  # (C, C) rows = true class
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_report(self) -> dict:
        recall, support = per_class_recall(self.logits.argmax(-1), self.targets, len(self.classes))
        return {
            "metrics": self.metrics,
            "num_images": len(self.targets),
            "num_classes": len(self.classes),
            "num_templates": self.num_templates,
            "per_class": [
                {"class": c, "name": _names(n)[0], "recall": None if s == 0 else float(r), "support": int(s)}
                for c, n, r, s in zip(self.classes, self.classnames, recall.tolist(), support.tolist())
            ],
            "confusion_matrix": self.confusion.tolist(),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def evaluate_zeroshot(model: torch.nn.Module, data: ClassificationData, classnames=None, templates="imagenet",
                      preprocess: Callable | None = None, batch_size: int = 64, num_workers: int = 0,
                      device: str | torch.device | None = None, precision: str = "fp32",
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ZeroShotResult:
    """Top-1, top-5 (with at least 5 classes) and mean per-class recall of zero-shot predictions.

    ``classnames`` as in :func:`resolve_classnames`, ``templates`` as in :func:`resolve_templates`.
    Unreadable images are skipped and listed in ``skipped``; none readable raises ``ValueError``.
    """
    names = resolve_classnames(classnames, data.classes)
    template_list = resolve_templates(templates)
    classifier = zero_shot_classifier(model, names, template_list, device=device, precision=precision,
                                      cache_dir=cache_dir, progress=progress)
    features = encode_images(model, data.paths, preprocess or _default_preprocess(model), batch_size,
                             num_workers, device, precision, cache_dir, progress)
    if len(features.indices) == 0:
        raise ValueError(f"{data.source}: none of the {len(data.paths)} images could be read, "
                         f"e.g. {features.skipped[0][0]} ({features.skipped[0][1]})")
    logits = zero_shot_logits(features.features, classifier, logit_scale_of(model)).cpu()  # (M, C)
    targets = torch.tensor(data.labels)[features.indices]  # (M,)
    accuracy = topk_accuracy(logits, targets, ks=(1, 5))
    predictions = logits.argmax(dim=-1)
    metrics = {f"top{k}": value for k, value in accuracy.items()}
    metrics["mean_per_class_recall"] = mean_per_class_recall(predictions, targets, len(names))
    return ZeroShotResult(
        classes=list(data.classes), classnames=names, num_templates=len(template_list), logits=logits,
        indices=features.indices, targets=targets, metrics=metrics,
        confusion=confusion_matrix(predictions, targets, len(names)), skipped=features.skipped,
    )
