"""The suite's tasks, each writing its CLIP_benchmark-schema JSON as soon as it is done."""
from __future__ import annotations

import math
import re

import numpy as np

from .datasets import load_retrieval_data
from .protocols import load_classification_data
from .features import encode_images
from ._suite_report import write_json_atomic
from .protocols.ood import imagenet_o_aupr


def _metric(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def _load(entry, path: str | None = None, split: str = "test"):
    path = path or entry.data
    if entry.dataset == "wds":
        from .protocols.clip_benchmark_wds import load_wds_classification

        return load_wds_classification(entry.data if path == "train" else path, split=split)
    return load_classification_data(path, entry.images, dataset=entry.dataset)


_WNID = re.compile(r"n\d{8}")


def _refuse_plain_folder_mistakes(entry, data) -> None:
    """A plain folder whose classes are all wnids would be prompted as "a photo of a n01443537"; one
    with a single class (a release's top folder under a misspelt protocol name) scores 100%."""
    if entry.dataset is None and len(data.classes) == 1:
        import difflib

        from .protocols import PROTOCOL_NAMES

        close = difflib.get_close_matches(entry.name.lower(), PROTOCOL_NAMES, n=1, cutoff=0.75)
        hint = f"; is {entry.name!r} a misspelt {close[0]!r}?" if close else ""
        raise ValueError(f"{entry.data}: one class folder ({data.classes[0]!r}) and {entry.name!r} names no "
                         f"protocol, so every image would be right{hint}")
    if entry.dataset is None and not entry.classnames and data.classes and all(
            _WNID.fullmatch(name) for name in data.classes):
        raise ValueError(f"{entry.data}: its {len(data.classes)} class folders are ImageNet wnids "
                         f"({data.classes[0]}, ...) but {entry.name!r} names no protocol; name the set after its "
                         "protocol (imagenet, imagenet-r, imagenet-sketch, ...), set dataset = NAME, or give classnames")


def zeroshot(run, entry, reuse: bool = True) -> tuple[dict, object | None]:
    """``(record, result)``; ``result`` is None when an existing record was reused."""
    from . import evaluate_zeroshot

    task = "zeroshot_classification"
    settings = run.settings(entry)
    cached = run.existing(entry.name, task, settings) if reuse else None
    if cached is not None:
        return cached, None
    data = _load(entry)
    _refuse_plain_folder_mistakes(entry, data)
    if entry.dataset:
        from .protocols import evaluate_protocol

        result = evaluate_protocol(run.model, data, entry.scoring, entry.templates, run.preprocess,
                                   run.batch_size, **run.common)
    else:
        result = evaluate_zeroshot(run.model, data, entry.classnames, entry.templates or "imagenet",
                                   run.preprocess, run.batch_size, **run.common)
    metrics = {"acc1": _metric(result.metrics["top1"]), "acc5": _metric(result.metrics.get("top5")),
               "mean_per_class_recall": _metric(result.metrics["mean_per_class_recall"])}
    record = run.record(entry.name, task, metrics, settings, protocol=entry.dataset,
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


def few_shot_probes(run, entry, shots: list[int]) -> tuple[list[dict], list[tuple[str, Exception]]]:
    """``(records, errors)``: a linear probe per ``k`` in ``shots`` (k training images per class),
    scored on the eval set; a ``k`` that fails (a class with fewer than k images) is an error of
    its own, the other shots still count."""
    from .linear_probe import linear_probe, shared_images

    settings = run.settings(entry, probe=True)
    done = {k: run.existing(entry.name, f"linear_probe_{k}shot", settings) for k in shots}
    records = [record for record in done.values() if record is not None]
    pending = [k for k, record in done.items() if record is None]
    if not pending:
        return records, []
    try:
        test = _load(entry)
        train = _load(entry, entry.probe_train, split="train")
        overlap = shared_images(train, test)
        if overlap:  # the few-shot curve would be compared with zero-shot on images it was fitted on
            raise ValueError(f"{overlap}; give probe_train a split apart from the test set")
        index = {name: i for i, name in enumerate(test.classes)}
        unknown = sorted(set(train.classes) - set(index))
        if unknown and train.classes != test.classes:
            raise ValueError(f"{entry.probe_train}: classes not in {entry.data}: {unknown[:5]}")
        to_test = np.arange(len(train.classes)) if train.classes == test.classes else \
            np.array([index[name] for name in train.classes])
        train_x, train_y = _features(run, train, f"{entry.name} probe train")
        test_x, test_y = _features(run, test, f"{entry.name} probe test")
    except Exception as error:  # noqa: BLE001 - reported with the zero-shot row kept
        return records, [("linear probe", error)]
    errors = []
    for k in pending:
        try:
            report = linear_probe(train_x, to_test[train_y], test_x, test_y, few_shot=k, seed=run.seed,
                                  class_names=test.classes)
        except Exception as error:  # noqa: BLE001 - the other shots still count
            errors.append((f"{k}-shot probe", error))
            continue
        metrics = {"lp_acc1": report["accuracy"], "lp_acc5": report["top5"],  # CLIP_benchmark's names
                   "lp_mean_per_class_recall": report["mean_per_class_recall"], "fewshot_k": k, "seed": run.seed}
        record = run.record(entry.name, "linear_probe", metrics, settings, fewshot_k=k,
                            C=report["C"], num_train=report["num_train"], num_val=report["num_val"],
                            num_test=report["num_test"])
        write_json_atomic(record, run.path(entry.name, f"linear_probe_{k}shot"))
        records.append(record)
    return sorted(records, key=lambda r: r["fewshot_k"]), errors


def aupr_pair_to_recompute(run, entries) -> set[str]:
    """Names of the ImageNet and ImageNet-O entries to score again although resuming: the AUPR
    needs both sets' logits in memory, so unless ImageNet-O's finished record already holds an
    AUPR and ImageNet's is reusable too, both are scored (their features come from the cache)."""
    by_protocol = {entry.dataset: entry for entry in entries if entry.dataset in ("imagenet", "imagenet-o")}
    if len(by_protocol) < 2 or not run.skip_existing:
        return set()
    imagenet, imagenet_o = by_protocol["imagenet"], by_protocol["imagenet-o"]
    task = "zeroshot_classification"
    done_o = run.existing(imagenet_o.name, task, run.settings(imagenet_o), quiet=True)
    done_in = run.existing(imagenet.name, task, run.settings(imagenet), quiet=True)
    if done_o is not None and "aupr" in done_o["metrics"] and done_in is not None:
        return set()
    return {imagenet.name, imagenet_o.name}


NO_AUPR = ("no AUPR: ImageNet-O's own metric (detection AUPR, Hendrycks et al. 2021) needs ImageNet validation "
           "images of its 200 classes; add the imagenet set to the suite")


def add_imagenet_o_aupr(run, records: list[dict], in_memory: dict) -> list[dict]:
    """Add ``aupr`` to ImageNet-O's record when ImageNet and ImageNet-O were both just scored (either
    scoring: the AUPR always ranks by the softmax over the 200 classes); without ImageNet in the
    suite, ImageNet-O's record notes why it has no AUPR."""
    if "imagenet-o" not in in_memory:
        return records
    entry, imagenet_o = in_memory["imagenet-o"]
    record = next(r for r in records if r["dataset"] == entry.name and r["task"] == "zeroshot_classification")
    if "imagenet" not in in_memory:
        run.say(f"{entry.name}: {NO_AUPR}")
        record["notes"] = [*record.get("notes", []), NO_AUPR]
    else:
        record["metrics"]["aupr"] = imagenet_o_aupr(in_memory["imagenet"][1], imagenet_o)
    write_json_atomic(record, run.path(entry.name, "zeroshot_classification"))
    return records


def retrieval(run, entry) -> dict:
    """Recall@1/5/10 both ways, in CLIP_benchmark's metric names."""
    from .retrieval import evaluate_retrieval

    task = "zeroshot_retrieval"
    settings = run.settings(entry)
    cached = run.existing(entry.name, task, settings)
    if cached is not None:
        return cached
    data = load_retrieval_data(entry.data, entry.images, entry.split)
    result = evaluate_retrieval(run.model, data, run.preprocess, batch_size=run.batch_size, **run.common)
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = result["metrics"][f"text_to_image_recall@{k}"]
        metrics[f"text_retrieval_recall@{k}"] = result["metrics"][f"image_to_text_recall@{k}"]
    record = run.record(entry.name, task, metrics, settings, num_images=result["num_images"],
                        num_texts=result["num_texts"])
    write_json_atomic(record, run.path(entry.name, task))
    return record
