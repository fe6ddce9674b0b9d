"""Calibrate `clipforge overlap`'s cosine threshold on the demo data's known duplicates.

    PYTHONPATH=src python tools/calibrate_overlap_threshold.py                 # pixel thumbnails
    PYTHONPATH=src python tools/calibrate_overlap_threshold.py --model runs/demo/model  # model embeddings

Duplicates (must be found): each sampled training image against itself resized (64 -> 48 -> 64,
64 -> 128 bicubic) and re-encoded (JPEG quality 75 and 40). Not duplicates (must not be found):
the same emoji drawn in another style (Noto vs Twemoji files of the same code point, and each
Fluent 3D evaluation image against its Noto and Twemoji versions), and each training image's
nearest *other* training image. Prints the cosine quantiles of each group and the threshold
halfway between the highest non-duplicate and the lowest duplicate.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.evaluate import encode_images
from clipforge.evaluate.overlap import PixelThumbnails, nearest_neighbours
from clipforge.runtime import cache_root

THRESHOLDS = (0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.998)
VARIANTS = {
    "resize 64->48->64": lambda im: im.resize((48, 48), Image.BICUBIC).resize(im.size, Image.BICUBIC),
    "resize 64->128": lambda im: im.resize((128, 128), Image.BICUBIC),
    "jpeg q75": None, "jpeg q40": None,
}


def _embed(model, preprocess, paths):
    features = encode_images(model, [str(p) for p in paths], preprocess, 64, 0, progress=False)
    assert len(features.indices) == len(paths), features.skipped
    return torch.nn.functional.normalize(features.features, dim=-1)


def _quantiles(values) -> str:
    values = np.asarray(values)
    q = np.quantile(values, [0, 0.05, 0.5, 0.95, 1])
    return f"n={len(values):4d}  min {q[0]:.4f}  5% {q[1]:.4f}  median {q[2]:.4f}  95% {q[3]:.4f}  max {q[4]:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint, or a preset name (random weights, seed 0); "
                        "default: the model-free pixel thumbnails")
    parser.add_argument("--data", default=str(cache_root() / "demo" / "data-64px"))
    parser.add_argument("--sample", type=int, default=300, help="training images given resized/re-encoded twins")
    args = parser.parse_args()
    data = Path(args.data)
    if args.model is None:
        model, preprocess = PixelThumbnails(), clipforge.image_transform(64)
    elif args.model in clipforge.available_models() and not Path(args.model).exists():
        torch.manual_seed(0)
        model = clipforge.create_model(args.model).eval()
        preprocess = clipforge.image_transform(model.config.vision.image_size)
    else:
        model, preprocess = clipforge.load(args.model, device="cpu")
        model.eval()
    train = sorted(p for style in ("noto", "twemoji", "tuxpaint", "openclipart") for p in (data / "images" / style).glob("*.png"))
    sample = [train[i] for i in np.random.default_rng(0).choice(len(train), min(args.sample, len(train)), replace=False)]
    originals = _embed(model, preprocess, sample)
    groups = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, change in VARIANTS.items():
            paths = []
            for k, source in enumerate(sample):
                image = Image.open(source).convert("RGB")
                if change is None:
                    target = Path(scratch) / f"{name.replace(' ', '_')}_{k}.jpg"
                    image.save(target, format="JPEG", quality=int(name.split("q")[1]))
                else:
                    target = Path(scratch) / f"{name.replace(' ', '_').replace('>', '')}_{k}.png"
                    change(image).save(target)
                paths.append(target)
            groups[f"duplicate: {name}"] = (originals * _embed(model, preprocess, paths)).sum(-1).tolist()
    noto = {p.name: p for p in (data / "images" / "noto").glob("*.png")}
    twemoji = {p.name: p for p in (data / "images" / "twemoji").glob("*.png")}
    shared = sorted(set(noto) & set(twemoji))
    groups["not: Noto vs Twemoji, same emoji"] = (_embed(model, preprocess, [noto[n] for n in shared])
                                                   * _embed(model, preprocess, [twemoji[n] for n in shared])).sum(-1).tolist()
    fluent = sorted((data / "images" / "fluent3d").glob("*.png"))
    for style, table in (("Noto", noto), ("Twemoji", twemoji)):
        pairs = [(f, table[f.name]) for f in fluent if f.name in table]
        if pairs:
            groups[f"not: Fluent 3D vs {style}, same emoji"] = (_embed(model, preprocess, [a for a, _ in pairs])
                                                                 * _embed(model, preprocess, [b for _, b in pairs])).sum(-1).tolist()
    train_features = _embed(model, preprocess, train)
    similarity = train_features @ train_features.T  # (T, T)
    similarity.fill_diagonal_(-2)
    groups["not: nearest other training image"] = similarity.max(dim=1).values.tolist()
    groups["not: Fluent 3D eval image vs nearest training image"] = nearest_neighbours(
        _embed(model, preprocess, fluent), train_features)[0].tolist()
    for name, values in groups.items():
        print(f"{name:<52} {_quantiles(values)}")
    print("\nthreshold  " + "  ".join(f"{name.split(': ')[1][:22]:>22}" for name in groups))
    for threshold in THRESHOLDS:
        cells = [f"{np.mean(np.asarray(v) >= threshold):22.3f}" for v in groups.values()]
        print(f"{threshold:9.3f}  " + "  ".join(cells))
    print("(share of each group at or above the threshold: want 1 for duplicates, 0 for the others)\n")
    lowest_duplicate = min(min(v) for k, v in groups.items() if k.startswith("duplicate"))
    highest_other = max(max(v) for k, v in groups.items() if k.startswith("not"))
    verdict = "separated" if lowest_duplicate > highest_other else "OVERLAPPING"
    print(f"lowest duplicate {lowest_duplicate:.4f}, highest non-duplicate {highest_other:.4f}: {verdict}; "
          f"midpoint {(lowest_duplicate + highest_other) / 2:.4f}")


if __name__ == "__main__":
    sys.exit(main())
