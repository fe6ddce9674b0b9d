"""Inference speed and peak memory: clipforge vs open_clip vs transformers, same weights, one run.

Every implementation gets the same random weights (a clipforge model's, exported) and the same
inputs; each case runs in a fresh subprocess so peak RSS (VmHWM) is its own. Run in a venv that has
open_clip_torch and transformers besides clipforge (e.g. ``pip install --no-deps -e .`` into it):

    /work/peers/bin/python benchmarks/bench_models.py --model ViT-B/32 --threads 2

On a GPU, ``--device cuda --precision fp16`` times each implementation under ``torch.autocast``
(fp32 weights, as open_clip's and transformers' defaults hold them) and reports peak GPU memory
(``torch.cuda.max_memory_allocated``) instead of RSS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Real caption lengths are short: these are typical alt-text captions (COCO-style).
CAPTIONS = [
    "a photo of a dog", "a man riding a wave on top of a surfboard",
    "two cats sleeping on a red couch next to a remote control",
    "a plate of food with broccoli, rice and a piece of grilled chicken",
    "a street sign on the corner of a busy intersection in the city at night",
    "an emoji of a smiling face with heart-shaped eyes",
]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mean seconds per call of ``fn`` after one warm-up call, and its last output."""
    out = fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats, out


def _features(output):
    """transformers 5 returns a ModelOutput whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def build(impl: str, name: str, weights_dir: Path):
    """The model of ``impl`` holding the shared weights, and an encode(images, tokens) pair."""
    import clipforge

    if impl == "clipforge":
        model, _ = clipforge.load(str(weights_dir / "clipforge"))
        return model.eval(), model.encode_image, model.encode_text
    if impl == "open_clip":
        import open_clip

        oc_name = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "RN50": "RN50", "ViT-L/14": "ViT-L-14"}[name]
        model = open_clip.create_model(oc_name, pretrained=None, force_quick_gelu=True).eval()
        model.load_state_dict(torch.load(weights_dir / "openai.pt", weights_only=True), strict=False)
        return model, model.encode_image, model.encode_text
    if impl == "transformers":
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(str(weights_dir / "hf"), attn_implementation="sdpa").eval()

        def encode_text(tokens):
            # HF's processor pads to the longest caption and passes an attention mask.
            lengths = tokens.argmax(-1) + 1
            ids = tokens[:, : int(lengths.max())]
            mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
            return _features(model.get_text_features(input_ids=ids, attention_mask=mask))

        def encode_image(images):
            return _features(model.get_image_features(pixel_values=images))

        return model, encode_image, encode_text
    raise ValueError(impl)


def run_case(impl: str, name: str, weights_dir: Path, batch: int, text_batch: int, repeats: int, threads: int,
             device: str = "cpu", precision: str = "fp32") -> dict:
    """Time one implementation's encode_image and encode_text; its peak memory; save its first outputs."""
    import clipforge

    torch.set_num_threads(threads)
    device = torch.device(device)
    size = clipforge.get_config(name).vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    model, encode_image, encode_text = build(impl, name, weights_dir)
    model.to(device)
    tokens = clipforge.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(text_batch)]).to(device)
    dtype = PRECISIONS[precision]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        image_s, image_out = timed(lambda: encode_image(images), repeats, device)
        text_s, text_out = timed(lambda: encode_text(tokens), repeats, device)
    torch.save({"image": image_out[:4].float().cpu(), "text": text_out[:4].float().cpu()}, weights_dir / f"out_{impl}.pt")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {"impl": impl, "images_per_s": batch / image_s, "texts_per_s": text_batch / text_s, "peak_mib": peak}


def export_weights(name: str, weights_dir: Path) -> None:
    import clipforge
    from clipforge.checkpoints import export_hf, export_openai

    torch.manual_seed(0)
    model = clipforge.create_model(name)
    clipforge.save(model, weights_dir / "clipforge")
    export_openai(model, weights_dir / "openai.pt")
    export_hf(model, weights_dir / "hf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=32, help="images per encode_image call")
    parser.add_argument("--text-batch", type=int, default=256, help="captions per encode_text call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", default="clipforge,open_clip,transformers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast dtype (fp32: none)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available to torch here; use --device cpu")
    if args.case:
        result = run_case(args.case, args.model, Path(args.weights_dir), args.batch, args.text_batch,
                          args.repeats, args.threads, args.device, args.precision)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights_dir = Path(tmp)
        export_weights(args.model, weights_dir)
        rows = []
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--case", impl, "--weights-dir", tmp, "--model", args.model,
                   "--batch", str(args.batch), "--text-batch", str(args.text_batch),
                   "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--device", args.device, "--precision", args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{impl}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        reference = torch.load(weights_dir / "out_clipforge.pt")
        base = rows[0]
        memory = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
        print(f"model {args.model}, {args.batch} images/call, {args.text_batch} captions/call, {args.threads} threads, "
              f"{args.device}, {args.precision}, torch {torch.__version__}")
        print(f"| implementation | images/s (clipforge speed-up) | texts/s (clipforge speed-up) | {memory} | max abs diff vs clipforge (img, txt) |")
        print("|---|---|---|---|---|")
        for row in rows:
            out = torch.load(weights_dir / f"out_{row['impl']}.pt")
            diff = ((out["image"] - reference["image"]).abs().max().item(), (out["text"] - reference["text"]).abs().max().item())
            print(f"| {row['impl']} | {row['images_per_s']:.1f} ({base['images_per_s'] / row['images_per_s']:.2f}x)"
                  f" | {row['texts_per_s']:.1f} ({base['texts_per_s'] / row['texts_per_s']:.2f}x) | {row['peak_mib']:.0f}"
                  f" | {diff[0]:.1e}, {diff[1]:.1e} |")


if __name__ == "__main__":
    main()
