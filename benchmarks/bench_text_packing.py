"""The training text tower alone: packed captions against the padded batch (length groups).

ViT-B/32's text tower, forward and backward of ``encode_text`` in training mode on the same
captions as ``bench_train.py`` (``--captions coco``: one sentence each; ``web``: 1-5 sentences),
``model.pack_text`` on and off in alternation, ``--pairs`` timed pairs after two warm-up pairs.
Prints the median seconds of each and the median of per-pair ratios (> 1: packing is faster).

    PYTHONPATH=$PWD/src python benchmarks/bench_text_packing.py --captions coco
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_train import _batch, _build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--captions", default="coco", choices=["coco", "web"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = _build("clipforge", args, device)[1][0]
    _, tokens = _batch(args, device, model.config.vision.image_size, model.config.text.context_length)

    def run(pack: bool) -> float:
        model.pack_text = pack
        start = time.perf_counter()
        model.encode_text(tokens).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):
        run(True), run(False)
    seconds = {True: [], False: []}
    for _ in range(args.pairs):
        for pack in (True, False):
            seconds[pack].append(run(pack))
    ratio = statistics.median(padded / packed for packed, padded in zip(seconds[True], seconds[False]))
    lengths = (tokens.argmax(-1) + 1).tolist()
    print(f"{args.model} text tower, batch {args.batch}, {args.captions} captions ({sum(lengths)} real tokens of "
          f"{max(lengths) * len(lengths)} trimmed), {args.threads} threads, {args.pairs} pairs")
    print(f"packed {statistics.median(seconds[True]):.3f} s, padded {statistics.median(seconds[False]):.3f} s; "
          f"padded / packed (median of pairs): {ratio:.2f}x")


if __name__ == "__main__":
    main()
