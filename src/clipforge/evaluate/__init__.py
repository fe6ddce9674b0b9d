"""Evaluation: zero-shot classification, image-text retrieval and linear probes.

    from clipforge.evaluate import zero_shot_classifier, classify, load_classification_data, evaluate_zeroshot
    classifier = zero_shot_classifier(model, ["dog", "cat"], "imagenet")  # (embed_dim, 2)
    result = evaluate_zeroshot(model, load_classification_data("val/"), templates="imagenet")
    print(result.metrics)  # {'top1': ..., 'top5': ..., 'mean_per_class_recall': ...}

The paper's class names and prompt templates ship in ``clipforge.evaluate.metadata``.
"""
from . import metadata
from .datasets import (
    ClassificationData,
    RetrievalData,
    load_image_folder,
    load_labels_csv,
    load_retrieval_data,
)
from .features import ImageFeatures, encode_images, encode_texts, model_fingerprint
from .linear_probe import evaluate_linear_probe, linear_probe, sweep_c
from .metrics import (
    confusion_matrix,
    first_positive_ranks,
    mean_per_class_recall,
    paired_difference,
    per_class_recall,
    recall_at_k,
    retrieval_metrics,
    target_ranks,
    topk_accuracy,
)
from .retrieval import evaluate_retrieval
from .protocols import load_classification_data
from .prompts import check_classnames, fill_template, resolve_classnames, resolve_templates
from .zeroshot import ZeroShotResult, classify, evaluate_zeroshot, zero_shot_classifier, zero_shot_logits, zero_shot_predict

__all__ = [
    "ClassificationData", "ImageFeatures", "RetrievalData", "ZeroShotResult", "check_classnames", "classify",
    "confusion_matrix", "encode_images", "encode_texts", "evaluate_linear_probe", "evaluate_retrieval",
    "evaluate_zeroshot", "fill_template", "first_positive_ranks", "linear_probe",
    "load_classification_data", "load_image_folder", "load_labels_csv", "load_retrieval_data",
    "mean_per_class_recall", "metadata", "model_fingerprint", "paired_difference", "per_class_recall", "recall_at_k",
    "resolve_classnames", "resolve_templates", "retrieval_metrics", "sweep_c", "target_ranks",
    "topk_accuracy", "zero_shot_classifier", "zero_shot_logits", "zero_shot_predict",
]
