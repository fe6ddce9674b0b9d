"""Which nodes to leave in fp32 when quantising to int8: cosine, zero-shot top-1 and speed per policy.

    PYTHONPATH=src python benchmarks/bench_onnx_keep_fp32.py --model /work/onnx-demo-run/model \
        --calibration /root/.cache/clipforge/demo/data-64px/eval/fluent3d
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import clipforge
from clipforge.export import compare_precisions, export_onnx, load_export, quantize_export
from clipforge.export.calibration import image_batches, read_calibration_folder, token_batches
from clipforge.export.quantize import KEEP_FP32

POLICIES = {
    "keep first/last fp32 (default)": KEEP_FP32,
    "quantize all weight layers": {"image": (), "text": ()},
    "keep only patch embedding fp32": {"image": ("/visual/conv1/Conv",), "text": ()},
    "keep only projections fp32": {"image": ("/visual/MatMul", "/visual/attnpool/c_proj/Gemm"), "text": ("/MatMul",)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint path, or a preset name (random weights)")
    parser.add_argument("--calibration", required=True, metavar="DIR")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if Path(args.model).exists():
        model = clipforge.load_model(args.model)
    else:
        torch.manual_seed(0)
        model = clipforge.create_model(args.model).eval()
    calibration = read_calibration_folder(args.calibration)
    preprocess = clipforge.image_transform(model.config.vision.image_size)
    images = image_batches(calibration.paths, preprocess)
    tokens = token_batches(calibration.prompts, model.context_length)
    size = model.config.vision.image_size
    pixels = torch.randn(32, 3, size, size)
    print("| policy | image cosine mean (min) | text cosine mean (min) | zero-shot top-1 fp32 | "
          "zero-shot top-1 int8 | images/s @32 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32")
        for index, (name, keep) in enumerate(POLICIES.items()):
            folder = shutil.copytree(fp32, Path(tmp) / f"policy{index}")
            quantize_export(folder, "static", images, tokens, keep_fp32=keep)
            a = compare_precisions(folder, calibration, None, threads=args.threads, progress=False)
            int8, _ = load_export(folder, threads=args.threads)
            int8.encode_image(pixels)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                int8.encode_image(pixels)
                times.append(time.perf_counter() - start)
            top1 = (f"{a['zeroshot_top1_fp32']:.3f} | {a['zeroshot_top1_int8']:.3f}" if "zeroshot_top1_fp32" in a
                    else "- | -")
            print(f"| {name} | {a['image_cosine_mean']:.5f} ({a['image_cosine_min']:.4f}) | "
                  f"{a['text_cosine_mean']:.5f} ({a['text_cosine_min']:.4f}) | {top1} | "
                  f"{32 / statistics.median(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
