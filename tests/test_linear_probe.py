"""Linear probe: the paper's C search, the splits, and the probe on frozen features of real images."""
import numpy as np
import pytest
from _eval_helpers import ColorCLIP, make_color_folder

from clipforge.evaluate import evaluate_linear_probe, linear_probe, load_classification_data, sweep_c
from clipforge.evaluate.linear_probe import few_shot_split, stratified_split


def gaussian_clusters(per_class: int, num_classes: int = 3, dim: int = 8, spread: float = 1.0, seed: int = 0):
    """Samples around fixed class centers (the same for every seed), with noise drawn from ``seed``."""
    centers = np.random.default_rng(123).normal(size=(num_classes, dim)) * 3
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    return centers[labels] + rng.normal(size=(len(labels), dim)) * spread, labels


def test_sweep_is_the_papers_parametric_binary_search():
    x, y = gaussian_clusters(30, spread=2.0)
    vx, vy = gaussian_clusters(20, spread=2.0, seed=1)
    best, history = sweep_c(x, y, vx, vy)
    log_cs = [round(float(np.log10(c)), 6) for c, _ in history]
    # Coarse grid every two decades, then four halvings around the best: at most 7 + 2 * 4 fits.
    assert {-6, -4, -2, 0, 2, 4, 6} <= set(log_cs) and len(log_cs) <= 15
    assert all(-6 <= v <= 6 for v in log_cs)
    assert any(abs(v * 8 - round(v * 8)) < 1e-6 and v * 8 % 2 for v in log_cs)  # reached 1/8-decade steps
    accuracy = dict(history)
    assert accuracy[best] == max(accuracy.values())
    assert best == min(c for c, a in history if a == accuracy[best])  # ties go to the smaller C


def test_probe_separates_clusters_and_reports_the_chosen_c():
    x, y = gaussian_clusters(40)
    tx, ty = gaussian_clusters(20, seed=3)
    report = linear_probe(x, y, tx, ty)
    assert report["accuracy"] > 0.95
    assert 1e-6 <= report["C"] <= 1e6 and report["sweep"]
    assert (report["num_train"], report["num_val"], report["num_test"]) == (120, 24, 60)


def test_stratified_and_few_shot_splits_hold_out_per_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
    train, val = stratified_split(labels, 0.2)
    assert sorted(np.bincount(labels[val]).tolist()) == [1, 1, 2]
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    shots, held = few_shot_split(labels, 2, seed=0)
    assert np.bincount(labels[shots]).tolist() == [2, 2, 2]
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="fewer than the 3 per class of a 3-shot probe"):
        few_shot_split(labels, 3)


def test_few_shot_probe_trains_on_k_images_per_class():
    x, y = gaussian_clusters(10)
    tx, ty = gaussian_clusters(10, seed=4)
    report = linear_probe(x, y, tx, ty, few_shot=2)
    assert report["num_train"] == 6 and report["num_val"] == 6 and report["few_shot"] == 2
    assert report["accuracy"] > 0.8


def test_probe_on_frozen_features_of_real_images(tmp_path):
    layout = {"red": ["red"] * 4, "green": ["green"] * 4, "blue": ["blue"] * 4}
    train = load_classification_data(make_color_folder(tmp_path / "train", layout))
    test = load_classification_data(make_color_folder(tmp_path / "test", {k: v[:2] for k, v in layout.items()}))
    report = evaluate_linear_probe(ColorCLIP(), train, test, progress=False, num_workers=2)
    assert report["accuracy"] == 1.0 and report["num_test"] == 6 and report["skipped"] == []


def test_test_classes_missing_from_training_are_refused(tmp_path):
    train = load_classification_data(make_color_folder(tmp_path / "train", {"red": ["red"], "blue": ["blue"]}))
    test = load_classification_data(make_color_folder(tmp_path / "test", {"red": ["red"], "teal": ["blue"]}))
    with pytest.raises(ValueError, match=r"classes not in the training data .*\['teal'\]"):
        evaluate_linear_probe(ColorCLIP(), train, test, progress=False)
