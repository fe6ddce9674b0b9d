"""Training-loader decode + augment per core: clipforge's draft-mode JPEG decode against a plain
PIL decode, both followed by the same random resized crop to the model input, on real JPEGs.

``plain``: ``Image.open`` + ``load`` + RGB, as a torchvision pipeline does. ``clipforge``:
``clipforge.data.samples.decode_image(bytes, draft_size)`` with the draft size the training loop
uses for that input and crop scale (``clipforge.train.loop.draft_size``). One thread, the two
interleaved per round; images/s is the median over rounds.

    PYTHONPATH=$PWD/src /work/venv-dev/bin/python benchmarks/bench_decode.py --size 224 tests/fixtures/transforms/images/hopper_huge.jpg
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from PIL import Image

from clipforge.data.samples import decode_image
from clipforge.train.loop import draft_size
from clipforge.transforms import image_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--min-crop", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="decodes of each image per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = image_transform(args.size, train=True, scale=(args.min_crop, 1.0))
    side = draft_size(args.size, args.min_crop)
    print(f"input {args.size}, crop area >= {args.min_crop}: draft decodes JPEGs >= {2 * side} px to >= {side} px; "
          f"load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| image | size | plain PIL img/s | clipforge img/s | speed-up |")
    print("|---|---|---|---|---|")
    for path in args.images:
        data = open(path, "rb").read()

        def plain():
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return transform(image.convert("RGB"))

        decoders = {"plain": plain, "clipforge": lambda: transform(decode_image(data, side))}
        rates = {name: [] for name in decoders}
        for _ in range(args.rounds):
            for name, decode in decoders.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    decode()
                rates[name].append(args.repeats / (time.perf_counter() - start))
        ratio = statistics.median(c / p for c, p in zip(rates["clipforge"], rates["plain"]))
        size = "x".join(map(str, Image.open(path).size))
        print(f"| {path.rsplit('/', 1)[-1]} | {size} | {statistics.median(rates['plain']):.1f} | "
              f"{statistics.median(rates['clipforge']):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
