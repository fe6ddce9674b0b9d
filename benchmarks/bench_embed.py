"""Embedding throughput: ``clipforge embed`` against open_clip's model in a plain DataLoader loop.

    PYTHONPATH=src /work/peers/bin/python benchmarks/bench_embed.py --images 128 --rounds 2 --threads 2

Both sides embed the same folder of the demo's real images (image modality: open_clip's loop has
no caption handling), with the same architecture (ViT-B/32, random weights: speed does not depend
on their values), the same precision, batch size, DataLoader workers and torch threads. The
open_clip side is what clip-retrieval's inference does per batch: torchvision preprocessing in
workers, ``encode_image``, L2 normalisation, float16 numpy rows; clipforge's also writes the
parts, parquet metadata and manifest. Rounds alternate the two; medians of images/s are reported.
clip-retrieval itself is used when it imports (it cannot load a model here: its loaders download
weights).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def demo_folder(count: int, work: Path) -> Path:
    """``count`` of the demo's real images copied into one folder (no captions)."""
    from clipforge.runtime import cache_root

    listing = cache_root() / "demo" / "data-64px" / "train.jsonl"
    if not listing.is_file():
        sys.exit(f"demo data missing at {listing.parent}; run clipforge demo first")
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows[:: max(1, len(rows) // count)][:count]):
        shutil.copy(listing.parent / row["image"], folder / f"{i:05d}.png")
    return folder


def run_clipforge(folder: Path, work: Path, model, args) -> float:
    from clipforge.search import embed_collection

    out = work / f"clipforge-{time.time_ns()}"
    started = time.perf_counter()
    manifest = embed_collection(folder, out, model, batch_size=args.batch_size, num_workers=args.workers,
                                precision=args.precision, device=args.device, progress=False)
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return manifest["count"] / elapsed


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        return self.preprocess(Image.open(self.paths[index]))


def run_open_clip(folder: Path, model, preprocess, args) -> float:
    paths = sorted(folder.glob("*.png"))
    loader = torch.utils.data.DataLoader(_Files(paths, preprocess), batch_size=args.batch_size,
                                         num_workers=args.workers)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rows = []
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
        for pixels in loader:
            features = torch.nn.functional.normalize(model.encode_image(pixels.to(args.device)).float(), dim=-1)
            rows.append(features.cpu().numpy().astype(np.float16))
    elapsed = time.perf_counter() - started
    return sum(len(r) for r in rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    import clipforge

    try:
        import clip_retrieval  # noqa: F401
        clip_retrieval_note = "clip-retrieval imports, but its model loaders download weights: not run offline"
    except ImportError as err:
        clip_retrieval_note = f"clip-retrieval not importable ({err}); open_clip DataLoader loop instead"
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    folder = demo_folder(args.images, work)
    torch.manual_seed(0)
    ours = clipforge.create_model("ViT-B/32").to(args.device).eval()
    theirs, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device=args.device)
    theirs.eval()
    results = {"clipforge": [], "open_clip": []}
    run_clipforge(folder, work, ours, args)  # warm-up: page cache, worker start, allocator
    for _ in range(args.rounds):
        results["clipforge"].append(run_clipforge(folder, work, ours, args))
        results["open_clip"].append(run_open_clip(folder, theirs, preprocess, args))
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({"images": args.images, "batch_size": args.batch_size, "workers": args.workers,
                      "threads": args.threads, "precision": args.precision, "device": args.device,
                      "images_per_s": {k: round(v, 2) for k, v in medians.items()},
                      "rounds": {k: [round(x, 2) for x in v] for k, v in results.items()},
                      "ratio_clipforge_over_open_clip": round(medians["clipforge"] / medians["open_clip"], 3),
                      "clip_retrieval": clip_retrieval_note}, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
