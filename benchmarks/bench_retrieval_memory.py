"""Peak memory and time of chunked retrieval recall at COCO-5k / Flickr scale and beyond.

The full similarity matrix of 25,000 images x 125,000 captions is 12.5 GB in float32; the chunked
computation in ``clipforge.evaluate.metrics`` needs the embeddings plus one chunk. This script
builds random unit embeddings (5 captions per image, each caption near its image so the recalls
are not trivial), runs ``retrieval_metrics`` and prints peak resident memory and wall time.
On a small case it also checks the chunked ranks against a brute-force stable sort.

    python benchmarks/bench_retrieval_memory.py                      # 25,000 x 125,000, dim 512
    python benchmarks/bench_retrieval_memory.py --images 5000        # COCO 5k test split size
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from clipforge.evaluate.metrics import BYTES_PER_SCORE, first_positive_ranks, retrieval_metrics


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def embeddings(num_images: int, captions_per_image: int, dim: int, noise: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)  # (I, D)
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)  # (T,)
    texts = torch.empty(len(text_to_image), dim)
    for start in range(0, len(texts), 16384):  # in slices, so building the data stays small too
        owners = text_to_image[start:start + 16384]
        texts[start:start + 16384] = F.normalize(
            images[owners] + noise / dim**0.5 * torch.randn(len(owners), dim, generator=generator), dim=-1)
    return images, texts, text_to_image.tolist()


def check_small_case() -> None:
    images, texts, text_to_image = embeddings(300, 5, 16, noise=3.0, seed=1)
    positives = [[] for _ in range(len(images))]
    for text, image in enumerate(text_to_image):
        positives[image].append(text)
    order = torch.sort(images @ texts.t(), dim=1, descending=True, stable=True).indices
    brute = [min(order[q].tolist().index(k) for k in positives[q]) for q in range(len(images))]
    chunked = first_positive_ranks(images, texts, positives, memory_budget_bytes=BYTES_PER_SCORE * 1500 * 7)
    assert chunked.tolist() == brute, "chunked ranks differ from brute force"
    print("small case: chunked ranks == brute-force stable sort (300 images x 1,500 captions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget-mib", type=int, default=256, help="memory for one chunk of scores")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_small_case()
    images, texts, text_to_image = embeddings(args.images, args.captions_per_image, args.dim, noise=6.0)
    data_gib = (images.numel() + texts.numel()) * 4 / 2**30
    full_gib = len(images) * len(texts) * 4 / 2**30
    before = peak_rss_gib()
    started = time.perf_counter()
    metrics = retrieval_metrics(images, texts, text_to_image, memory_budget_bytes=args.budget_mib * 2**20)
    elapsed = time.perf_counter() - started
    print(f"{len(images):,} images x {len(texts):,} captions, dim {args.dim}, {args.threads} thread(s), "
          f"chunk budget {args.budget_mib} MiB")
    print(f"embeddings {data_gib:.2f} GiB; a full float32 score matrix would be {full_gib:.1f} GiB")
    print(f"peak RSS {peak_rss_gib():.2f} GiB (before scoring {before:.2f} GiB), time {elapsed:.1f} s")
    print({name: round(value, 4) for name, value in metrics.items()})


if __name__ == "__main__":
    main()
