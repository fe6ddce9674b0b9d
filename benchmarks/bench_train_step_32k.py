"""The paper's contrastive batch on one CPU: a full training step of tiny-vit over 32,768 real
image-text pairs within 8 GiB, and the same step at 4,096 pairs checked against a direct
full-batch forward/backward.

Images are the PNGs under ``--images`` (default: Debian's openclipart-png clip art), captions come
from their file names; the batch repeats them through clipforge's train transform (random
resized crop), so no two repeats are the same crop. The step is
``clipforge.train.grad_cache.contrastive_step`` (two passes in chunks of ``--chunk-size``), then
AdamW and the logit-scale clamp. Peak memory is the process's peak RSS (VmHWM, reset just before
the step) both in total and above what the process held before the step (model, batch).

    .venv/bin/python benchmarks/bench_train_step_32k.py --threads 1

On a GPU (``--device cuda --model ViT-B/32 --precision bf16``) the batch lives on the GPU and the
peak is the GPU's (``torch.cuda.max_memory_allocated``), in total and above the model and batch.
"""
from __future__ import annotations

import argparse
import copy
import re
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

import clipforge
from clipforge.tokenizer import tokenize
from clipforge.loss import clamp_logit_scale_, contrastive_loss
from clipforge.train.grad_cache import contrastive_step
from clipforge.transforms import image_transform


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _caption(path: Path) -> str:
    words = re.sub(r"[^a-zA-Z]+", " ", path.stem).strip().lower()
    return f"a clip art of {words or 'something'}"[:200]


def load_pairs(folder: Path, distinct: int, side: int) -> list[tuple[Image.Image, str]]:
    """Up to ``distinct`` (RGB image resized to ``side`` px, caption) pairs from ``folder``'s PNGs."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge files are skipped below
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no PNG files under {folder}; pass --images with a folder of images")
    step = max(1, len(paths) // distinct)
    pairs = []
    for path in paths[::step][:distinct]:
        try:
            with Image.open(path) as image:
                if image.width * image.height > 4096 * 4096:
                    continue  # a few clip-art posters are huge; they add nothing here
                image = image.convert("RGBA")
                rgb = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
        except (OSError, Image.DecompressionBombError):
            continue  # unreadable or oversized file: skip it
        rgb.thumbnail((side, side))
        pairs.append((rgb, _caption(path)))
    return pairs


def build_batch(pairs, size: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` augmented pairs: images (size, 3, H, W) and tokens (size, 77), repeating ``pairs``."""
    transform = image_transform(image_size, train=True, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(seed))
    tokens_of = tokenize([caption for _, caption in pairs], truncate=True)  # (distinct, 77)
    images = torch.empty(size, 3, image_size, image_size)
    for index in range(size):
        images[index] = transform(pairs[index % len(pairs)][0])
    tokens = tokens_of[torch.arange(size) % len(pairs)]  # (size, 77)
    return images, tokens


def _step(model, images, tokens, chunk_size, optimizer=None, autocast_dtype=None):
    loss, stats = contrastive_step(
        model, images, tokens, lambda i, t: contrastive_loss(i, t, model.logit_scale), chunk_size,
        autocast_dtype=autocast_dtype,
    )
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(model.logit_scale)
    return loss, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=Path("/usr/share/openclipart/png"))
    parser.add_argument("--distinct", type=int, default=2048, help="distinct images to repeat")
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--check-batch", type=int, default=4096, help="batch compared with the direct step")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast of the encoders")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available to torch here; use --device cpu")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    cuda = device.type == "cuda"

    torch.manual_seed(0)
    model = clipforge.create_model(args.model).to(device)
    image_size = model.config.vision.image_size
    started = time.perf_counter()
    pairs = load_pairs(args.images, args.distinct, side=image_size * 5 // 4)
    images, tokens = build_batch(pairs, args.batch, image_size, seed=0)
    images, tokens = images.to(device), tokens.to(device)
    print(f"model {args.model}, {len(pairs)} distinct real images -> batch {args.batch} "
          f"({images.numel() * 4 / 2**30:.2f} GiB of pixels), built in {time.perf_counter() - started:.0f} s, "
          f"torch {torch.__version__}, {args.device}, {args.precision}, {args.threads} thread(s)", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    if cuda:
        _step(model, images[:args.chunk_size], tokens[:args.chunk_size], None, autocast_dtype=autocast_dtype)
        model.zero_grad(set_to_none=True)  # the warm-up above loads the kernels; it is not timed
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
        before = _status_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    loss, stats = _step(model, images, tokens, args.chunk_size, optimizer, autocast_dtype)
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _status_mib("VmHWM")
    where = "GPU memory" if cuda else "RSS"
    print(f"step at {args.batch}: loss {loss.item():.4f}, {stats['chunks']:.0f} chunks of {args.chunk_size}, "
          f"wall {wall:.1f} s (embed {stats['embed_s']:.1f}, loss {stats['loss_s']:.1f}, "
          f"re-forward+backward {stats['backward_s']:.1f}), CPU {cpu:.1f} s; "
          f"peak {where} {peak / 1024:.2f} GiB in total, {peak - before:.0f} MiB above the model and batch", flush=True)
    del images, tokens

    # The same step at a batch a direct forward/backward can hold: weights and gradients must agree.
    images, tokens = build_batch(pairs, args.check_batch, image_size, seed=1)
    images, tokens = images.to(device), tokens.to(device)
    torch.manual_seed(0)
    cached = clipforge.create_model(args.model).to(device)
    direct = copy.deepcopy(cached)
    cached_loss, _ = _step(cached, images, tokens, args.chunk_size, autocast_dtype=autocast_dtype)
    direct_loss, _ = _step(direct, images, tokens, None, autocast_dtype=autocast_dtype)
    worst_name, worst = "", 0.0
    for (name, a), b in zip(cached.named_parameters(), direct.parameters()):
        error = ((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item()
        if error > worst:
            worst_name, worst = name, error
    for model_ in (cached, direct):
        step = torch.optim.AdamW(model_.parameters(), lr=1e-4, weight_decay=0.2)
        step.step()
    weight_diff = max((a - b).abs().max().item() for a, b in zip(cached.parameters(), direct.parameters()))
    print(f"check at {args.check_batch}: loss cached {cached_loss.item():.6f} vs direct {direct_loss.item():.6f}; "
          f"worst gradient relative error {worst:.2e} ({worst_name}); "
          f"max |weight difference| after one AdamW step {weight_diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
