"""The training loader per core against a plain PIL loop over the same image-caption listing.

``loader``: ``clipforge.data.make_train_loader`` in this process (no workers), everything a
training step receives: the listing read in shuffled order, per-sample seeding (the crop of a
sample is the same on any number of processes), decode, random resized crop, tokenization, collate.
``plain``: the same images in listing order, ``Image.open`` + RGB + the same train transform,
stacked into batches; no captions, no seeding. One thread; the two interleaved per round; samples/s
is the median over rounds. The difference is what the loader's own machinery costs per sample.

    PYTHONPATH=$PWD/src /work/venv-dev/bin/python benchmarks/bench_loader.py ~/.cache/clipforge/demo/data-64px/train.jsonl --size 32
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from clipforge.data import make_train_loader, open_dataset
from clipforge.tokenizer import tokenize
from clipforge.transforms import image_transform


def _image_paths(dataset, count: int) -> list[Path]:
    """The first ``count`` image files of the listing, in its order."""
    return [dataset.image_root / dataset.images[index] for index in range(min(count, len(dataset)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listing", help="a CSV/TSV/JSONL image-caption listing")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = open_dataset(args.listing)
    if dataset.sequential:
        parser.error("give an image-caption listing (CSV, TSV or JSONL), not shards")
    preprocess = image_transform(args.size, train=True, scale=(0.9, 1.0))
    tokenizer = partial(tokenize, context_length=77, truncate=True)
    samples = args.batch * args.batches
    paths = _image_paths(dataset, samples)

    def plain() -> None:
        for start in range(0, len(paths), args.batch):
            torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start:start + args.batch]])

    def loader(epoch: int) -> None:
        batches = make_train_loader(dataset, preprocess, tokenizer, args.batch, epoch=epoch, seed=0, rank=0,
                                    world_size=1, num_workers=0)
        for _ in itertools.islice(iter(batches), args.batches):
            pass

    rates = {"plain": [], "loader": []}
    plain(), loader(0)  # warm the page cache and the tokenizer's cache
    for round_index in range(args.rounds):
        for name, run in (("plain", plain), ("loader", lambda: loader(round_index + 1))):
            started = time.perf_counter()
            run()
            rates[name].append(samples / (time.perf_counter() - started))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.listing}: {samples} samples a round at {args.size} px, 1 thread, {args.rounds} rounds")
    print("| path | samples/s/core (median) |\n|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    print(f"loader / plain: {median['loader'] / median['plain']:.2f}x")


if __name__ == "__main__":
    main()
