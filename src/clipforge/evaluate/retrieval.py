"""Zero-shot image-text retrieval: recall@k in both directions over a captioned image set.

An image with several captions counts as retrieved when any of its captions is (image-to-text),
and each caption's query has its one image as the answer (text-to-image), as in the paper and
CLIP_benchmark. Scores are computed in chunks (see ``metrics.first_positive_ranks``).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .datasets import RetrievalData
from .features import encode_images, encode_texts
from .metrics import require_finite, retrieval_metrics


def evaluate_retrieval(model: torch.nn.Module, data: RetrievalData, preprocess: Callable | None = None,
                       ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, text_batch_size: int = 256,
                       num_workers: int = 0, device: str | torch.device | None = None,
                       precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, memory_budget_bytes: int = 256 * 2**20) -> dict:
    """Image-to-text and text-to-image recall@k of ``model`` on ``data``, as a JSON-able report.

    Unreadable images are skipped together with their captions and listed under ``skipped``.
    """
    if preprocess is None:
        from ..transforms import image_transform

        preprocess = image_transform(model.config.vision.image_size)
    images = encode_images(model, data.image_paths, preprocess, batch_size, num_workers, device,
                           precision, cache_dir, progress)
    if len(images.indices) == 0:
        raise ValueError(f"{data.source}: none of the {len(data.image_paths)} images could be read, "
                         f"e.g. {images.skipped[0][0]} ({images.skipped[0][1]})")
    texts = encode_texts(model, data.texts, batch_size=text_batch_size, device=device, precision=precision,
                         cache_dir=cache_dir, progress=progress, desc="captions")  # (T, D)
    require_finite(images.features, "image embeddings")
    require_finite(texts, "text embeddings")
    # Rows of `images.features` follow images.indices; renumber the images that were read.
    new_index = torch.full((len(data.image_paths),), -1, dtype=torch.long)
    new_index[images.indices] = torch.arange(len(images.indices))
    text_to_image = new_index[torch.tensor(data.text_to_image)]  # (T,) -1 where the image was skipped
    kept_texts = text_to_image >= 0
    metrics = retrieval_metrics(images.features, texts[kept_texts], text_to_image[kept_texts].tolist(),
                                ks, memory_budget_bytes)
    num_images, num_texts = len(images.indices), int(kept_texts.sum())
    fewest_captions = int(torch.bincount(text_to_image[kept_texts], minlength=num_images).min())
    scored_texts = [text for text, kept in zip(data.texts, kept_texts.tolist()) if kept]
    return {
        "metrics": metrics,
        "num_images": num_images,
        "num_texts": num_texts,
        "skipped": [{"path": path, "reason": reason} for path, reason in images.skipped],
        "notes": list(data.notes) + _cut_captions_notes(model, scored_texts)
        + _trivial_recall_notes(ks, num_images, num_texts, fewest_captions),
    }


def _cut_captions_notes(model: torch.nn.Module, texts: Sequence[str]) -> list[str]:
    """A note counting the captions longer than the model's context, which the text tower saw cut to
    their first tokens (as CLIP and CLIP_benchmark cut them), so a long-caption set is read in part."""
    from ..tokenizer import get_tokenizer

    context_length = int(getattr(model, "context_length", 77))
    encode = get_tokenizer().encode
    cut = sum(1 for text in texts if len(encode(text)) + 2 > context_length)  # + start and end tokens
    if not cut:
        return []
    return [f"{cut} of {len(texts)} captions are longer than the model's context of {context_length} tokens and "
            f"were cut to their first {context_length - 2}"]


def _trivial_recall_notes(ks: Sequence[int], num_images: int, num_texts: int, fewest_captions: int = 1) -> list[str]:
    """Notes naming the recalls that are 100% whatever the model, because k reaches past every wrong
    candidate: a listing of 5 images has text-to-image R@5 = 100%, and with 6 captions, 3 per image,
    an image's best caption ranks 4th at worst, so image-to-text R@5 = 100%."""
    notes = []
    for direction, candidates, right, noun in (("text-to-image", num_images, 1, "images"),
                                               ("image-to-text", num_texts, fewest_captions, "captions")):
        trivial = [k for k in ks if k > candidates - right]  # beyond the wrong candidates: always a hit
        if not trivial:
            continue
        why = f"only {candidates} {noun if candidates != 1 else noun[:-1]} to rank"
        if right > 1 and candidates > min(trivial):
            why = (f"{candidates} {noun} to rank and every image has at least {right} of them, so its best "
                   f"caption ranks {candidates - right + 1} or better")
        notes.append(f"{direction} recall@{', @'.join(map(str, trivial))} is 100% by construction: {why}")
    return notes
