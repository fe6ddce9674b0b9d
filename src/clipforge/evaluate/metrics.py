"""Classification and retrieval metrics, with one rule for ties.

Ties: among equal scores the item with the lower index ranks first, the order a stable descending
sort gives (``torch.sort(..., descending=True, stable=True)``). Results therefore do not depend on
the hardware's ``topk``, whose order among equal scores is unspecified (CLIP_benchmark uses
``topk``; scikit-learn's ``top_k_accuracy_score`` lets the higher index win). With continuous
scores from real models ties are rare and all of these agree.

Retrieval follows the paper and CLIP_benchmark: a query is a hit at k when ANY of its correct
items is among the k best-scored keys. Recall is computed from the rank of the best-ranked correct
item, in chunks of queries, so the full (queries x keys) matrix never exists: 25,000 images x
125,000 captions needs the embeddings plus one chunk (``memory_budget_bytes``), not 12.5 GB.
"""
from __future__ import annotations

from typing import Sequence

import torch

BYTES_PER_SCORE = 12  # peak working memory per (query, key) score in first_positive_ranks

def require_finite(values: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` when ``values`` (embeddings or scores) hold NaN or infinity.

    A model whose weights blew up in training scores every input as NaN; its ranking would be
    meaningless, so evaluation stops rather than print it.
    """
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).reshape(len(values), -1).any(dim=1).sum()) if values.ndim else 1
        raise ValueError(f"the model gave non-finite {what} ({bad} of {len(values) if values.ndim else 1} "
                         "rows are NaN or infinite): its weights are probably not finite (a diverged training?); "
                         "use a checkpoint from before the divergence")


def _check_scores(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must be ({scores.shape[0]},), got shape {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]}), got {targets.min()}..{targets.max()}")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target class among ``scores`` (N, C), ties to the lower index."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    _check_scores(scores, targets)
    target_scores = scores.gather(1, targets[:, None])  # (N, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)  # (C,)
    ahead = (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))
    return ahead.sum(dim=1)  # (N,)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the k best scores, for each k <= number of classes."""
    ranks = target_ranks(scores, targets)
    if len(ranks) == 0:
        raise ValueError("no samples to score")
    # Counted in integers, divided in Python: a float32 mean would report 3/200 as 0.01499999966.
    return {k: int((ranks < k).sum()) / len(ranks) for k in ks if k <= scores.shape[1]}


def paired_difference(hits_a: torch.Tensor, hits_b: torch.Tensor) -> tuple[float, float]:
    """(accuracy of a minus accuracy of b, its standard error) for two methods scored on the same items.

    ``hits_a`` and ``hits_b`` are (N,) booleans, item i right or wrong for each method. The error
    is the paired one (McNemar's): only items where the methods disagree add to it, so it is much
    smaller than the error of either accuracy alone when the two mostly agree.
    """
    if hits_a.shape != hits_b.shape or hits_a.ndim != 1 or len(hits_a) == 0:
        raise ValueError(f"hits must be two (N,) tensors of the same N > 0, got {tuple(hits_a.shape)} "
                         f"and {tuple(hits_b.shape)}")
    n = len(hits_a)
    only_a = int((hits_a.bool() & ~hits_b.bool()).sum())
    only_b = int((hits_b.bool() & ~hits_a.bool()).sum())
    variance = max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0) / n ** 2  # of the mean difference
    return (only_a - only_b) / n, variance ** 0.5


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``(num_classes, num_classes)``: row = true class, column = predicted class."""
    predictions = torch.as_tensor(predictions, dtype=torch.long).cpu()
    targets = torch.as_tensor(targets, dtype=torch.long).cpu()
    flat = targets * num_classes + predictions  # (N,) cell index, row-major
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_recall(predictions: torch.Tensor, targets: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recall, support)`` per class; recall is NaN for a class with no samples."""
    counts = confusion_matrix(predictions, targets, num_classes)
    support = counts.sum(dim=1)  # (C,)
    recall = counts.diagonal().double() / support.double()  # NaN where support == 0
    return recall, support


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes that have samples (scikit-learn's balanced accuracy)."""
    recall, support = per_class_recall(predictions, targets, num_classes)
    return float(recall[support > 0].mean())


def _positives_csr(positives: Sequence[Sequence[int]], num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query lists of correct keys as (offsets (Q+1,), key indices (P,))."""
    counts = torch.tensor([len(items) for items in positives], dtype=torch.long)
    if len(counts) and counts.min() == 0:
        raise ValueError(f"query {int((counts == 0).nonzero()[0])} has no correct item to retrieve")
    offsets = torch.zeros(len(positives) + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    flat = torch.tensor([index for items in positives for index in items], dtype=torch.long)
    if len(flat) and (flat.min() < 0 or flat.max() >= num_keys):
        raise ValueError(f"correct items must index the {num_keys} keys, got {flat.min()}..{flat.max()}")
    return offsets, flat


def first_positive_ranks(queries: torch.Tensor, keys: torch.Tensor, positives: Sequence[Sequence[int]],
                         memory_budget_bytes: int = 256 * 2**20) -> torch.Tensor:
    """0-based rank of the best-ranked correct key per query, by dot product, ties to the lower index.

    ``queries`` (Q, D) and ``keys`` (K, D) are usually L2-normalised; ``positives[q]`` lists the
    correct key indices of query q. Scores are made for as many queries at a time as fit
    ``memory_budget_bytes`` (about 12 bytes per score: the float, two boolean masks and an int32
    copy of one while it is summed).
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (Q, D) and keys (K, D) must share D, got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    if len(positives) != len(queries):
        raise ValueError(f"positives has {len(positives)} entries for {len(queries)} queries")
    offsets, flat = _positives_csr(positives, len(keys))
    device = queries.device
    offsets, flat = offsets.to(device), flat.to(device)
    keys_t = keys.float().t()  # (D, K) view: matmul reads it transposed, no copy
    num_keys = keys.shape[0]
    columns = torch.arange(num_keys, device=device)  # (K,)
    chunk = max(1, memory_budget_bytes // (BYTES_PER_SCORE * max(num_keys, 1)))
    ranks = torch.empty(len(queries), dtype=torch.long, device=device)
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        scores = queries[start:stop].float() @ keys_t  # (q, K)
        counts = offsets[start + 1: stop + 1] - offsets[start:stop]  # (q,)
        rows = torch.repeat_interleave(torch.arange(stop - start, device=device), counts)  # (P,)
        cols = flat[offsets[start]: offsets[stop]]  # (P,)
        positive_scores = scores[rows, cols]  # (P,)
        best = torch.full((stop - start,), float("-inf"), device=device)
        best = best.scatter_reduce(0, rows, positive_scores, reduce="amax")  # (q,)
        at_best = positive_scores == best[rows]
        first = torch.full((stop - start,), num_keys, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, rows[at_best], cols[at_best], reduce="amin")  # (q,)
        # int32 sums: summing a bool matrix to the default int64 would copy it at 8 bytes a score.
        ahead = (scores > best[:, None]).sum(dim=1, dtype=torch.int32)
        tied_before = scores == best[:, None]  # (q, K)
        tied_before &= columns < first[:, None]
        ranks[start:stop] = ahead + tied_before.sum(dim=1, dtype=torch.int32)
    return ranks


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose first correct item ranks within the top k, for each k."""
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    return {k: int((ranks < k).sum()) / len(ranks) for k in ks}  # exact fractions, not float32 means


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                      memory_budget_bytes: int = 256 * 2**20) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k and median rank (1-based) from embeddings.

    ``text_to_image[j]`` is the index of the image that caption j describes; an image may have
    several captions and is a hit when any of them is retrieved. Features are L2-normalised here.
    In CLIP_benchmark's names, image-to-text recall is ``text_retrieval_recall`` and
    text-to-image recall is ``image_retrieval_recall``.
    """
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    if len(text_to_image) != len(text_features):
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {len(text_features)} texts")
    if len(text_to_image) and not 0 <= min(text_to_image) <= max(text_to_image) < len(image_features):
        raise ValueError(f"text_to_image must index the {len(image_features)} images, "
                         f"got {min(text_to_image)}..{max(text_to_image)}")
    image_to_texts: list[list[int]] = [[] for _ in range(len(image_features))]
    for text_index, image_index in enumerate(text_to_image):
        image_to_texts[image_index].append(text_index)
    results = {}
    for direction, queries, keys, positives in (
        ("image_to_text", image_features, text_features, image_to_texts),
        ("text_to_image", text_features, image_features, [[i] for i in text_to_image]),
    ):
        ranks = first_positive_ranks(queries, keys, positives, memory_budget_bytes)
        for k, value in recall_at_k(ranks, ks).items():
            results[f"{direction}_recall@{k}"] = value
        results[f"{direction}_median_rank"] = median_rank(ranks)
    return results


def median_rank(ranks: torch.Tensor) -> float:
    """1-based median rank of 0-based ``ranks`` as the retrieval literature reports it (VSE++, Karpathy's
    evaluation): ``floor(median) + 1``, the median of an even count being the mean of the middle two
    (``torch.median`` would give the lower one: 225 where numpy's median gives 226)."""
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    ordered = ranks.sort().values  # (Q,)
    middle = (int(ordered[(len(ordered) - 1) // 2]) + int(ordered[len(ordered) // 2])) // 2  # floor of the mean
    return float(middle + 1)
