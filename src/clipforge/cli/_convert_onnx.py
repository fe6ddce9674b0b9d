"""The ``--to onnx`` branch of ``clipforge convert``: run the export pipeline, print what it measured."""
from __future__ import annotations

import argparse
import sys


def run_onnx(model, args: argparse.Namespace) -> int:
    """Export (and quantise) ``model`` to ``args.dst``; print parity, sizes and the int8 accuracy cost."""
    from ..evaluate import resolve_templates
    from ..export import convert_to_onnx

    templates = None if args.templates == "none" else args.templates
    resolve_templates(templates)  # a bad --templates fails before the export
    summary = convert_to_onnx(model, args.dst, args.opset, args.quantize, args.quantize_mode, args.calibration,
                              templates, args.threads, progress=sys.stderr.isatty())
    parity = summary["parity"]
    sizes = ", ".join(f"{name} {size} MB" for name, size in summary["sizes_mb"].items())
    print(f"wrote {summary['folder']} (onnx, opset {args.opset}: {sizes})")
    print(f"fp32 parity with PyTorch: image max abs {parity['image_max_abs']:.2e}, "
          f"text max abs {parity['text_max_abs']:.2e}")
    accuracy = summary.get("accuracy")
    if accuracy:
        print(f"int8 ({args.quantize_mode}) vs fp32 on {accuracy['images']} images / {accuracy['texts']} prompts "
              f"of {accuracy['source']}: image cosine mean {accuracy['image_cosine_mean']:.4f} "
              f"(min {accuracy['image_cosine_min']:.4f}), text cosine mean {accuracy['text_cosine_mean']:.4f} "
              f"(min {accuracy['text_cosine_min']:.4f})")
        if "zeroshot_top1_fp32" in accuracy:
            print(f"zero-shot top-1 over {accuracy['classes']} classes: fp32 {accuracy['zeroshot_top1_fp32']:.4f}, "
                  f"int8 {accuracy['zeroshot_top1_int8']:.4f}")
    return 0
