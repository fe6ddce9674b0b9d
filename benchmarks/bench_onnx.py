"""ONNX Runtime fp32 and int8 vs PyTorch (clipforge, open_clip): speed, latency and the accuracy cost.

Every implementation runs the same weights (a clipforge checkpoint, or a preset's random weights,
loaded into open_clip through OpenAI's state-dict layout) on the same inputs, each case in a fresh
subprocess with its own thread count. The int8 graphs are calibrated on --calibration (the demo's
Fluent 3D evaluation set), and their cost is measured there: mean cosine of int8 to fp32
embeddings and zero-shot top-1 of both (what ``clipforge convert --quantize int8`` prints).
Run in a venv with open_clip_torch, onnx and onnxruntime, clipforge on PYTHONPATH:

    PYTHONPATH=src /work/peers/bin/python benchmarks/bench_onnx.py --model /work/onnx-demo-run/model \
        --calibration /root/.cache/clipforge/demo/data-64px/eval/fluent3d
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_models import CAPTIONS  # the same alt-text-like captions as the model benchmark

IMPLS = ["clipforge", "open_clip", "onnx-fp32", "onnx-int8-static", "onnx-int8-dynamic"]


def open_clip_model(config, state_dict_path: Path):
    """open_clip's CLIP with clipforge's architecture and weights (OpenAI key layout)."""
    import open_clip

    vision = config.vision
    if vision.is_resnet:
        vision_cfg = dict(image_size=vision.image_size, layers=tuple(vision.layers), width=vision.width,
                          head_width=vision.width * 32 // vision.num_heads)
    else:
        vision_cfg = dict(image_size=vision.image_size, layers=vision.layers, width=vision.width,
                          patch_size=vision.patch_size, head_width=vision.width // vision.num_heads,
                          mlp_ratio=vision.mlp_ratio)
    text = config.text
    text_cfg = dict(context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
                    heads=text.heads, layers=text.layers, mlp_ratio=text.mlp_ratio)
    model = open_clip.model.CLIP(config.embed_dim, vision_cfg, text_cfg, quick_gelu=config.quick_gelu).eval()
    missing, unexpected = model.load_state_dict(torch.load(state_dict_path, weights_only=True), strict=False)
    if [k for k in missing if k != "attn_mask"] or unexpected:
        raise RuntimeError(f"open_clip layout mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def build(impl: str, work: Path, threads: int):
    """``(encode_image, encode_text, config)`` of one implementation."""
    import clipforge
    from clipforge.export import load_export

    model, _ = clipforge.load(str(work / "clipforge"))
    if impl == "clipforge":
        return model.encode_image, model.encode_text, model.config
    if impl == "open_clip":
        oc = open_clip_model(model.config, work / "openai.pt")
        return oc.encode_image, oc.encode_text, model.config
    folder = {"onnx-fp32": "onnx-static", "onnx-int8-static": "onnx-static",
              "onnx-int8-dynamic": "onnx-dynamic"}[impl]
    exported, _ = load_export(work / folder, threads=threads, precision="fp32" if impl == "onnx-fp32" else "int8")
    return exported.encode_image, exported.encode_text, model.config


def median_seconds(fn, repeats: int, min_time: float = 0.3) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of one call of ``fn`` over ``repeats`` rounds.

    On a shared machine wall time counts other tenants' load; with one thread, CPU time does not.
    """
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        walls.append(elapsed / calls)
        cpus.append((time.process_time() - cpu_start) / calls)
    return statistics.median(walls), statistics.median(cpus)


def run_case(impl: str, work: Path, threads: int, batches: list[int], repeats: int) -> dict:
    """images/s and texts/s of one implementation at each batch size; batch-1 latency in ms."""
    import clipforge

    torch.set_num_threads(threads)
    encode_image, encode_text, config = build(impl, work, threads)
    size = config.vision.image_size
    row = {"impl": impl, "threads": threads}
    with torch.inference_mode():
        for batch in batches:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            tokens = clipforge.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)],
                                        context_length=config.text.context_length, truncate=True)
            image_s, image_cpu = median_seconds(lambda: encode_image(images), repeats)
            text_s, text_cpu = median_seconds(lambda: encode_text(tokens), repeats)
            row[f"images_per_s@{batch}"], row[f"texts_per_s@{batch}"] = batch / image_s, batch / text_s
            row[f"images_per_cpu_s@{batch}"], row[f"texts_per_cpu_s@{batch}"] = batch / image_cpu, batch / text_cpu
            if batch == 1:
                row["image_latency_ms"], row["text_latency_ms"] = 1000 * image_s, 1000 * text_s
    return row


def prepare(spec: str, calibration: str, work: Path) -> dict:
    """Weights in clipforge and OpenAI layout, and static and dynamic int8 exports; returns their accuracy."""
    import clipforge
    from clipforge.checkpoints import export_openai
    from clipforge.export import convert_to_onnx

    if Path(spec).exists():
        model = clipforge.load_model(spec)
    else:
        torch.manual_seed(0)
        model = clipforge.create_model(spec).eval()
    clipforge.save(model, work / "clipforge")
    export_openai(model, work / "openai.pt")
    accuracy = {}
    for mode in ("static", "dynamic"):
        summary = convert_to_onnx(model, work / f"onnx-{mode}", quantize="int8", mode=mode, calibration=calibration,
                                  templates=None, progress=False)
        accuracy[mode] = {**summary["accuracy"], "parity": summary["parity"], "sizes_mb": summary["sizes_mb"]}
    with torch.no_grad():  # open_clip holds the same weights: its embeddings must match clipforge's
        size = model.config.vision.image_size
        images = torch.randn(2, 3, size, size)
        tokens = clipforge.tokenize(CAPTIONS[:2], context_length=model.context_length, truncate=True)
        oc = open_clip_model(model.config, work / "openai.pt")
        accuracy["open_clip_max_abs"] = max(float((oc.encode_image(images) - model.encode_image(images)).abs().max()),
                                            float((oc.encode_text(tokens) - model.encode_text(tokens)).abs().max()))
    return accuracy


def print_tables(spec: str, rows: list[dict], accuracy: dict, batches: list[int]) -> None:
    base = {row["threads"]: row for row in rows if row["impl"] == "open_clip"}
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nmodel {spec}; torch {torch.__version__}; medians; ratios are to open_clip fp32 at the same threads; "
          f"load average at the end {load} on {os.cpu_count()} cores")
    heads = [f"images/s @{b}" for b in batches] + [f"texts/s @{b}" for b in batches]
    print("| implementation | threads | " + " | ".join(heads) + " | latency b1 image / text ms |")
    print("|---|---|" + "---|" * len(heads) + "---|")
    for row in rows:
        ref = base.get(row["threads"])
        cells = []
        for kind in ("images", "texts"):
            for b in batches:
                value = row[f"{kind}_per_s@{b}"]
                ratio = f" ({value / ref[f'{kind}_per_s@{b}']:.2f}x)" if ref else ""
                cells.append(f"{value:.1f}{ratio}")
        latency = f"{row.get('image_latency_ms', float('nan')):.2f} / {row.get('text_latency_ms', float('nan')):.2f}"
        print(f"| {row['impl']} | {row['threads']} | " + " | ".join(cells) + f" | {latency} |")
    print("\none thread, per CPU-second of the process (insensitive to other tenants' load)")
    print("| implementation | " + " | ".join(f"{h} per CPU-s" for h in heads) + " |")
    print("|---|" + "---|" * len(heads))
    ref = base.get(1)
    for row in [r for r in rows if r["threads"] == 1]:
        cells = []
        for kind in ("images", "texts"):
            for b in batches:
                value = row[f"{kind}_per_cpu_s@{b}"]
                ratio = f" ({value / ref[f'{kind}_per_cpu_s@{b}']:.2f}x)" if ref else ""
                cells.append(f"{value:.1f}{ratio}")
        print(f"| {row['impl']} | " + " | ".join(cells) + " |")
    print(f"\naccuracy of int8 vs fp32 on the calibration set (open_clip vs clipforge max abs: "
          f"{accuracy['open_clip_max_abs']:.1e})")
    print("| int8 mode | images | image cosine mean (min) | text cosine mean (min) | zero-shot top-1 fp32 | "
          "zero-shot top-1 int8 | fp32 parity max abs (img, txt) | graph sizes MB |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("static", "dynamic"):
        a = accuracy[mode]
        top1 = (f"{a['zeroshot_top1_fp32']:.3f} | {a['zeroshot_top1_int8']:.3f}" if "zeroshot_top1_fp32" in a
                else "- | -")
        sizes = ", ".join(f"{k} {v}" for k, v in a["sizes_mb"].items())
        print(f"| {mode} | {a['images']} | {a['image_cosine_mean']:.4f} ({a['image_cosine_min']:.4f}) | "
              f"{a['text_cosine_mean']:.4f} ({a['text_cosine_min']:.4f}) | {top1} | "
              f"{a['parity']['image_max_abs']:.1e}, {a['parity']['text_max_abs']:.1e} | {sizes} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32", help="checkpoint path, or a preset name (random weights)")
    parser.add_argument("--calibration", required=True, metavar="DIR", help="images (class folders) for int8")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.case:
        impl, threads = args.case.split(":")
        print(json.dumps(run_case(impl, Path(args.work), int(threads), batches, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        accuracy = prepare(args.model, args.calibration, work)
        rows = []
        for threads in args.threads.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--case", f"{impl}:{threads}", "--work", tmp, "--model", args.model,
                       "--calibration", args.calibration, "--batches", args.batches, "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(f"{impl} ({threads} threads): failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"done {impl} {threads} threads", file=sys.stderr, flush=True)
        print_tables(args.model, rows, accuracy, batches)


if __name__ == "__main__":
    main()
