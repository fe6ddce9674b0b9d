"""The suite's tasks, each writing its CLIP_benchmark-schema JSON as soon as it is done."""
from __future__ import annotations

import math

import numpy as np
import torch

from .datasets import load_retrieval_data
from .protocols import load_classification_data
from .features import encode_images
from ._suite_report import write_json_atomic


def _metric(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _load(entry, path: str | None = None, split: str = "test"):
    path = path or entry.data
    if entry.dataset == "wds":
        from .protocols.clip_benchmark_wds import load_wds_classification

        return load_wds_classification(entry.data if path == "train" else path, split=split)
    return load_classification_data(path, entry.images, dataset=entry.dataset)


def zeroshot(run, entry) -> tuple[dict, object | None]:
    """``(record, result)``; ``result`` is None when an existing record was reused."""
    from . import evaluate_zeroshot

    task = "zeroshot_classification"
    cached = run.existing(entry.name, task)
    if cached is not None:
        return cached, None
    data = _load(entry)
    if entry.dataset:
        from .protocols import evaluate_protocol

        result = evaluate_protocol(run.model, data, entry.scoring, entry.templates, run.preprocess,
                                   run.batch_size, **run.common)
    else:
        result = evaluate_zeroshot(run.model, data, entry.classnames, entry.templates or "imagenet",
                                   run.preprocess, run.batch_size, **run.common)
    metrics = {"acc1": _metric(result.metrics["top1"]), "acc5": _metric(result.metrics.get("top5")),
               "mean_per_class_recall": _metric(result.metrics["mean_per_class_recall"])}
    record = run.record(entry.name, task, metrics, protocol=entry.dataset,
                        scoring=entry.scoring if entry.dataset else None, num_images=len(result.targets),
                        num_classes=len(data.classes), num_skipped=len(result.skipped),
                        notes=list(getattr(data, "notes", [])))
    write_json_atomic(record, run.path(entry.name, task))
    return record, result


def _features(run, data, desc: str) -> tuple[np.ndarray, np.ndarray]:
    preprocess = data.wrap_preprocess(run.preprocess) if hasattr(data, "wrap_preprocess") else run.preprocess
    features = encode_images(run.model, data.paths, preprocess, run.batch_size, run.common.get("num_workers", 0),
                             run.common.get("device"), run.common.get("precision", "fp32"),
                             run.common.get("cache_dir"), run.common.get("progress", True), desc=desc)
    if len(features.indices) == 0:
        raise ValueError(f"{data.source}: none of the {len(data.paths)} images could be read")
    return features.features.numpy(), np.asarray(data.labels)[features.indices.numpy()]


def few_shot_probes(run, entry, shots: list[int]) -> list[dict]:
    """A linear probe per ``k`` in ``shots`` (k training images per class), scored on the eval set."""
    from .linear_probe import linear_probe

    pending = [k for k in shots if run.existing(entry.name, f"linear_probe_{k}shot") is None]
    records = [run.existing(entry.name, f"linear_probe_{k}shot") for k in shots if k not in pending]
    if not pending:
        return records
    test = _load(entry)
    train = _load(entry, entry.probe_train, split="train")
    index = {name: i for i, name in enumerate(test.classes)}
    unknown = sorted(set(train.classes) - set(index))
    if unknown and train.classes != test.classes:
        raise ValueError(f"{entry.probe_train}: classes not in {entry.data}: {unknown[:5]}")
    to_test = np.arange(len(train.classes)) if train.classes == test.classes else \
        np.array([index[name] for name in train.classes])
    train_x, train_y = _features(run, train, f"{entry.name} probe train")
    test_x, test_y = _features(run, test, f"{entry.name} probe test")
    for k in pending:
        report = linear_probe(train_x, to_test[train_y], test_x, test_y, few_shot=k, seed=run.seed)
        record = run.record(entry.name, "linear_probe", {"lp_acc1": report["accuracy"]}, fewshot_k=k,
                            C=report["C"], num_train=report["num_train"], num_val=report["num_val"],
                            num_test=report["num_test"])
        write_json_atomic(record, run.path(entry.name, f"linear_probe_{k}shot"))
        records.append(record)
    return sorted(records, key=lambda r: r["fewshot_k"])


def imagenet_o_aupr(imagenet, imagenet_o, subset: list[int]) -> float:
    """ImageNet-O's detection AUPR (Hendrycks et al.): ImageNet-O images are the positives, ImageNet
    validation images of the same 200 classes the negatives, scored by minus the top softmax
    probability over those 200 classes (``subset``: their ImageNet class indices)."""
    from sklearn.metrics import average_precision_score

    keep = torch.isin(imagenet.targets, torch.tensor(subset))
    in_scores = -imagenet.logits[keep][:, subset].softmax(-1).max(-1).values  # (N_in,)
    out_scores = -imagenet_o.logits.softmax(-1).max(-1).values  # (N_out,) label logits: the 200 classes
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(average_precision_score(labels, torch.cat([in_scores, out_scores]).numpy()))


def add_imagenet_o_aupr(run, records: list[dict], in_memory: dict) -> list[dict]:
    """Add ``aupr`` to ImageNet-O's record when ImageNet and ImageNet-O were both just scored (subset)."""
    if "imagenet" not in in_memory or "imagenet-o" not in in_memory:
        return records
    (_, imagenet), (entry, imagenet_o) = in_memory["imagenet"], in_memory["imagenet-o"]
    if imagenet.scoring != "subset" or imagenet_o.scoring != "subset":
        return records
    from .protocols._data import wnid_table

    all_wnids = wnid_table("imagenet")
    aupr = imagenet_o_aupr(imagenet, imagenet_o, [all_wnids.index(w) for w in wnid_table("imagenet_o")])
    for record in records:
        if record["dataset"] == entry.name and record["task"] == "zeroshot_classification":
            record["metrics"]["aupr"] = aupr
            write_json_atomic(record, run.path(entry.name, "zeroshot_classification"))
    return records


def retrieval(run, entry) -> dict:
    """Recall@1/5/10 both ways, in CLIP_benchmark's metric names."""
    from .retrieval import evaluate_retrieval

    task = "zeroshot_retrieval"
    cached = run.existing(entry.name, task)
    if cached is not None:
        return cached
    data = load_retrieval_data(entry.data, entry.images, entry.split)
    result = evaluate_retrieval(run.model, data, run.preprocess, batch_size=run.batch_size, **run.common)
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = result["metrics"][f"text_to_image_recall@{k}"]
        metrics[f"text_retrieval_recall@{k}"] = result["metrics"][f"image_to_text_recall@{k}"]
    record = run.record(entry.name, task, metrics, num_images=result["num_images"], num_texts=result["num_texts"])
    write_json_atomic(record, run.path(entry.name, task))
    return record
