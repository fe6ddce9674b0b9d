"""Metric code against independent computations: scikit-learn, brute force, and hand-made cases."""
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from clipforge.evaluate.metrics import (
    BYTES_PER_SCORE,
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


@pytest.mark.parametrize("num_classes", [3, 7, 40])
def test_topk_accuracy_matches_sklearn_top_k_accuracy_score(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    scores = torch.randn(300, num_classes, generator=generator)
    targets = torch.randint(0, num_classes, (300,), generator=generator)
    ks = [k for k in (1, 3, 5) if k < num_classes]
    ours = topk_accuracy(scores, targets, ks)
    for k in ks:
        expected = top_k_accuracy_score(targets.numpy(), scores.numpy(), k=k, labels=np.arange(num_classes))
        assert ours[k] == pytest.approx(expected)


def test_topk_accuracy_leaves_out_k_larger_than_the_class_count():
    scores, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert set(topk_accuracy(scores, targets, ks=(1, 5))) == {1}


def test_mean_per_class_recall_matches_sklearn_balanced_accuracy_with_an_unpredicted_class():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (200,), generator=generator)
    predictions = torch.randint(0, 7, (200,), generator=generator)  # class 6 predicted, never true
    with pytest.warns(UserWarning):  # sklearn warns about class 6; we drop it the same way
        expected = balanced_accuracy_score(targets.numpy(), predictions.numpy())
    assert mean_per_class_recall(predictions, targets, 7) == pytest.approx(expected)


def test_confusion_matrix_matches_sklearn_rows_true_columns_predicted():
    targets = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    expected = sk_confusion_matrix(targets.numpy(), predictions.numpy(), labels=[0, 1, 2])
    assert confusion_matrix(predictions, targets, 3).tolist() == expected.tolist()


def test_per_class_recall_is_nan_for_a_class_without_samples():
    recall, support = per_class_recall(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    assert recall[:2].tolist() == [0.5, 1.0] and torch.isnan(recall[2])
    assert support.tolist() == [2, 1, 0]


def test_ties_rank_the_lower_class_index_first():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],
                           [0.2, 0.9, 0.9, 0.9]])
    # Row 0: classes 0, 1, 2 tie for first: class 2 is third. Row 1: class 3 is third among the ties.
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [2, 2]
    assert topk_accuracy(scores, torch.tensor([2, 3]), ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    assert topk_accuracy(scores, torch.tensor([0, 1]), ks=(1,)) == {1: 1.0}


def test_metric_inputs_with_wrong_shapes_or_labels_raise():
    with pytest.raises(ValueError, match="targets must lie in"):
        topk_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="scores must be"):
        topk_accuracy(torch.randn(3), torch.tensor([0, 1, 2]))


def brute_force_ranks(queries, keys, positives):
    """Stable descending sort of the full score matrix; position of the first correct key."""
    order = torch.sort(queries @ keys.t(), dim=1, descending=True, stable=True).indices
    return torch.tensor([
        min(order[q].tolist().index(k) for k in positives[q]) for q in range(len(queries))
    ])


@pytest.mark.parametrize("rows", [1, 3, 17, 40])  # queries scored per chunk
def test_chunked_first_positive_ranks_equal_brute_force(rows):
    generator = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(40, 8, generator=generator), torch.randn(50, 8, generator=generator)
    positives = [torch.randperm(50, generator=generator)[: 1 + q % 4].tolist() for q in range(40)]
    ranks = first_positive_ranks(queries, keys, positives, memory_budget_bytes=BYTES_PER_SCORE * 50 * rows)
    assert ranks.tolist() == brute_force_ranks(queries, keys, positives).tolist()


def test_chunked_ranks_equal_brute_force_with_many_ties():
    generator = torch.Generator().manual_seed(2)
    # Integer-valued embeddings in {-1, 0, 1}: dot products tie constantly.
    queries = torch.randint(-1, 2, (30, 3), generator=generator).float()
    keys = torch.randint(-1, 2, (25, 3), generator=generator).float()
    positives = [torch.randperm(25, generator=generator)[: 1 + q % 3].tolist() for q in range(30)]
    for rows in (1, 7, 30):
        ranks = first_positive_ranks(queries, keys, positives, memory_budget_bytes=BYTES_PER_SCORE * 25 * rows)
        assert ranks.tolist() == brute_force_ranks(queries, keys, positives).tolist()


def test_retrieval_hit_when_any_of_several_captions_is_in_the_top_k():
    # Two images, five captions: image 0 has captions 0, 1, 2; image 1 has captions 3, 4.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0],    # caption 0 (of image 0) points at image 1
                          [0.6, 0.8],    # caption 1 (of image 0)
                          [0.8, 0.6],    # caption 2 (of image 0): image 0's best caption
                          [0.0, 1.0],    # caption 3 (of image 1)
                          [1.0, 0.0]])   # caption 4 (of image 1) points at image 0
    metrics = retrieval_metrics(images, texts, [0, 0, 0, 1, 1], ks=(1, 2, 3))
    # image 0: scores 0, .6, .8, 0, 1 -> caption 4 first, caption 2 second: hit at 2.
    # image 1: scores 1, .8, .6, 1, 0 -> caption 0 (index 0) beats the tied caption 3: hit at 2.
    assert metrics["image_to_text_recall@1"] == 0.0
    assert metrics["image_to_text_recall@2"] == 1.0
    # captions 0, 4 rank their image second; 1 ties .6/.8 -> second; 2 first; 3 first.
    assert metrics["text_to_image_recall@1"] == pytest.approx(2 / 5)
    assert metrics["text_to_image_recall@2"] == 1.0
    assert metrics["image_to_text_median_rank"] == 2.0


def test_recall_at_k_and_queries_without_answers():
    assert recall_at_k(torch.tensor([0, 3, 9, 10]), ks=(1, 5, 10)) == {1: 0.25, 5: 0.5, 10: 0.75}
    with pytest.raises(ValueError, match="no correct item"):
        first_positive_ranks(torch.randn(2, 3), torch.randn(4, 3), [[1], []])
    with pytest.raises(ValueError, match="must index the 3 images"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(2, 4), [0, 3])


def test_paired_difference_matches_the_mean_and_error_of_per_item_differences():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(200, generator=generator) < 0.4
    b = a.clone()
    flip = torch.rand(200, generator=generator) < 0.15  # the methods disagree on about 30 items
    b[flip] = ~b[flip]
    difference, error = paired_difference(a, b)
    per_item = a.double() - b.double()  # (200,) in {-1, 0, 1}
    assert difference == pytest.approx(float(a.double().mean() - b.double().mean()), abs=1e-12)
    assert error == pytest.approx(float(per_item.std(unbiased=False)) / 200 ** 0.5, rel=1e-9)
    unpaired = (0.4 * 0.6 / 200 * 2) ** 0.5
    assert error < unpaired / 2  # agreement on most items makes the paired error far smaller
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same N"):
        paired_difference(a, b[:10])
