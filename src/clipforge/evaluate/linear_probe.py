"""Linear-probe evaluation: logistic regression on frozen image features, as in the paper.

The paper (appendix A.3) fits scikit-learn's L-BFGS logistic regression and picks the L2 strength
on a validation split with a parametric binary search: start from 10^-6, 10^-4, ..., 10^6, then
repeatedly halve the log-spaced step around the best value until the resolution is 8 steps per
decade. We search scikit-learn's C (the inverse strength) over the same symmetric range; among
equally good values the smaller C (stronger regularisation) wins. The final model is refit with
the chosen C on train + validation and scored on the test set.

Validation: a stratified ``val_fraction`` of the training images; in the few-shot setting (k
images per class) up to k further images per class from the training pool, when there are any.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from .datasets import ClassificationData
from .features import encode_images
from .metrics import require_finite

SMALL_PROBLEM = 2**22  # feature values below which the fit runs single-threaded


def _sklearn():
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise ImportError("the linear probe needs scikit-learn: pip install 'clipforge[eval]'") from error
    return LogisticRegression, ConvergenceWarning


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000):
    """An L-BFGS multinomial logistic regression; convergence warnings are silenced."""
    LogisticRegression, ConvergenceWarning = _sklearn()
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    # On small problems BLAS threads cost more in hand-offs than they save (10x slower on 2 busy cores).
    threads = 1 if features.size < SMALL_PROBLEM else None
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model


def sweep_c(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
            low: float = -6, high: float = 6, steps_per_decade: int = 8,
            max_iter: int = 1000, on_fit: Optional[Callable[[float, float], None]] = None
            ) -> tuple[float, list[tuple[float, float]]]:
    """``(best C, [(C, validation accuracy), ...])`` by the paper's parametric binary search;
    ``on_fit(C, accuracy)`` is called after each fit (a progress bar)."""
    scores: dict[float, float] = {}  # log10 C -> validation accuracy

    def score(log_c: float) -> float:
        if log_c not in scores:
            model = fit_logistic(train_x, train_y, 10.0 ** log_c, max_iter)
            scores[log_c] = float((model.predict(val_x) == val_y).mean())
            if on_fit is not None:
                on_fit(10.0 ** log_c, scores[log_c])
        return scores[log_c]

    def best_of(candidates) -> float:
        return max(sorted(candidates), key=score)  # sorted: ties go to the smaller C

    step = 2.0
    best = best_of(np.arange(low, high + 1e-9, step).round(6).tolist())
    while step > 1 / steps_per_decade:
        step /= 2
        candidates = [c for c in (round(best - step, 6), best, round(best + step, 6)) if low <= c <= high]
        best = best_of(candidates)
    history = [(10.0 ** log_c, accuracy) for log_c, accuracy in sorted(scores.items())]
    return 10.0 ** best, history


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, validation indices)`` holding out ``val_fraction`` of each class (at
    least one image when a class has two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        held = min(max(held, 1 if len(members) > 1 else 0), len(members) - 1)
        val += members[:held].tolist()
        train += members[held:].tolist()
    return np.array(sorted(train), dtype=int), np.array(sorted(val), dtype=int)


def few_shot_split(labels: np.ndarray, shots: int, seed: int = 0,
                   class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(k per class for training, up to k more per class for validation)``; ``class_names[label]``
    names a class in errors."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < shots:
            name = repr(class_names[label]) if class_names else str(label)
            raise ValueError(f"class {name} has {len(members)} training images, fewer than the {shots} per class of a {shots}-shot probe")
        train += members[:shots].tolist()
        val += members[shots: 2 * shots].tolist()
    return np.array(sorted(train), dtype=int), np.array(sorted(val), dtype=int)


def shared_images(train: ClassificationData, test: ClassificationData) -> str | None:
    """A line saying how many training images are also test images (links and ``..`` resolved), or
    None when the two are apart: a probe fitted on test images overstates its accuracy."""
    test_keys = {os.path.realpath(path) for path in test.paths if isinstance(path, str)}
    shared = [path for path in train.paths if isinstance(path, str) and os.path.realpath(path) in test_keys]
    if not shared:
        return None
    return (f"{train.source}: {len(shared)} of its {len(train.paths)} training images are also test images of "
            f"{test.source} (e.g. {shared[0]}); a probe fitted on test images overstates its accuracy")


def _test_scores(model, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Top-1, top-5 (None under 5 classes, as zero-shot reports it) and mean per-class recall."""
    probabilities = model.predict_proba(test_x)  # (N, C) columns in model.classes_ order
    ranked = model.classes_[np.argsort(-probabilities, axis=1, kind="stable")]  # (N, C) labels, best first
    top1 = ranked[:, 0] == test_y
    top5 = None if ranked.shape[1] < 5 else float((ranked[:, :5] == test_y[:, None]).any(axis=1).mean())
    recalls = [float(top1[test_y == label].mean()) for label in np.unique(test_y)]
    return {"accuracy": float(top1.mean()), "top5": top5, "mean_per_class_recall": float(np.mean(recalls))}


def _untuned_note(train_y: np.ndarray, class_names: list[str] | None) -> str:
    """Why C kept its default: the classes with a single training image, or no validation images."""
    labels, counts = np.unique(train_y, return_counts=True)
    single = [class_names[label] if class_names else str(label) for label, n in zip(labels, counts) if n < 2]
    shown = ", ".join(repr(name) for name in single[:5]) + (" ..." if len(single) > 5 else "")
    why = (f"{len(single)} class(es) have a single training image ({shown}), so none could be held out"
           if single else "no validation images were left")
    return (f"C was not tuned: {why} to choose C on; used C=1.0. Give each class at least 2 "
            "training images (or --few-shot K with 2K per class) to tune it")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 few_shot: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000, class_names: list[str] | None = None, progress: bool = False) -> dict:
    """Choose C on a validation split, refit on train + validation, score the test set
    (``accuracy``, ``top5``, ``mean_per_class_recall``).

    When no image can be held out (one training image per class), C stays 1.0 and the report's
    ``notes`` say so, naming the classes (``class_names[label]``, else the label numbers).
    ``progress``: a bar counting the fits (up to 15 for the sweep, then the final one), each of which
    can take minutes on ImageNet-sized features.
    """
    from tqdm.auto import tqdm

    train_x, test_x = np.asarray(train_x, dtype=np.float32), np.asarray(test_x, dtype=np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    notes: list[str] = []
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the training data")
    if few_shot:
        fit_idx, val_idx = few_shot_split(train_y, few_shot, seed, class_names)
    else:
        fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    with tqdm(desc="linear probe fits", unit="fit", disable=None if progress else True) as bar:
        def on_fit(C: float, accuracy: float) -> None:
            bar.set_postfix_str(f"C={C:.3g} val {accuracy:.4f}", refresh=False)
            bar.update(1)

        if len(val_idx) and len(np.unique(train_y[fit_idx])) > 1:
            C, sweep = sweep_c(train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx],
                               max_iter=max_iter, on_fit=on_fit)
            val_accuracy = max(accuracy for _, accuracy in sweep)
        else:
            C, sweep, val_accuracy = 1.0, [], None  # nothing to validate on: keep the default C
            notes.append(_untuned_note(train_y, class_names))
        final_idx = np.concatenate([fit_idx, val_idx]) if not few_shot else fit_idx
        model = fit_logistic(train_x[final_idx], train_y[final_idx], C, max_iter)
        bar.update(1)
    return {
        **_test_scores(model, test_x, test_y), "C": C, "val_accuracy": val_accuracy, "sweep": sweep,
        "num_train": int(len(final_idx)), "num_val": int(len(val_idx)), "num_test": int(len(test_y)),
        "few_shot": few_shot, "notes": notes,
    }


def evaluate_linear_probe(model: torch.nn.Module, train: ClassificationData, test: ClassificationData,
                          preprocess: Callable | None = None, few_shot: int | None = None,
                          val_fraction: float = 0.2, seed: int = 0, batch_size: int = 64,
                          num_workers: int = 0, device: str | torch.device | None = None,
                          precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                          progress: bool = True) -> dict:
    """Linear-probe accuracy of ``model``'s image features; test classes are matched by name. Test
    images that are also training images are scored all the same, and the report's ``notes`` say so."""
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise ValueError(f"{test.source}: classes not in the training data {train.source}: {unknown[:5]}")
    overlap = shared_images(train, test)  # asked for explicitly here: said, not refused
    if preprocess is None:
        from ..transforms import image_transform

        preprocess = image_transform(model.config.vision.image_size)
    arrays, skipped = [], []
    for data, name in ((train, "train"), (test, "test")):
        features = encode_images(model, data.paths, preprocess, batch_size, num_workers, device,
                                 precision, cache_dir, progress, desc=name)
        if len(features.indices) == 0:
            raise ValueError(f"{data.source}: none of the {len(data.paths)} images could be read")
        to_train_label = np.array([train.classes.index(c) for c in data.classes])
        labels = to_train_label[np.asarray(data.labels)[features.indices.numpy()]]
        require_finite(features.features, f"image embeddings for {data.source}")
        arrays.append((features.features.numpy(), labels))
        listed = {entry["path"] for entry in skipped}  # a file in both sets is one unreadable image
        skipped += [{"path": path, "reason": reason} for path, reason in features.skipped if path not in listed]
    (train_x, train_y), (test_x, test_y) = arrays
    report = linear_probe(train_x, train_y, test_x, test_y, few_shot, val_fraction, seed,
                          class_names=list(train.classes), progress=progress)
    report["skipped"] = skipped
    report["notes"] = [*report["notes"], *([overlap] if overlap else [])]
    return report
