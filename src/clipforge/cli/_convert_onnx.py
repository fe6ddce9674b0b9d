"""The ``--to onnx`` branch of ``clipforge convert``: run the export pipeline, print what it measured."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def check_onnx_args(args: argparse.Namespace) -> None:
    """Refuse options that do nothing, and bad ones, before the (maybe large) source is loaded."""
    from ..evaluate import resolve_templates
    from ..export.pipeline import check_convert_settings

    for option, value in (("--quantize-mode", args.quantize_mode), ("--templates", args.templates)):
        if value and not args.quantize:
            raise ValueError(f"{option} applies to --quantize int8 only")
    check_convert_settings(args.opset, args.quantize, args.quantize_mode or "static", args.calibration, args.threads)
    resolve_templates(None if args.templates == "none" else args.templates)  # a bad --templates fails here


def run_onnx(model, args: argparse.Namespace) -> int:
    """Export (and quantise) ``model`` to ``args.dst``; print parity, sizes and the int8 accuracy cost.

    ``args`` passed :func:`check_onnx_args` (``convert.run`` calls it before loading the source)."""
    from ..export import convert_to_onnx
    from ..export.onnx import EXPORT_FILES

    mode = args.quantize_mode or "static"
    templates = None if args.templates == "none" else args.templates or "imagenet"
    replacing = Path(args.dst).is_dir() and any((Path(args.dst) / name).exists() for name in EXPORT_FILES)
    summary = convert_to_onnx(model, args.dst, args.opset, args.quantize, mode, args.calibration,
                              templates, args.threads, progress=sys.stderr.isatty())
    parity = summary["parity"]
    sizes = ", ".join(f"{name} {size} MB" for name, size in summary["sizes_mb"].items())
    replaced = "; replaced the earlier export there" if replacing else ""
    print(f"wrote {summary['folder']} (onnx, opset {args.opset}: {sizes}{replaced})")
    print(f"fp32 parity with PyTorch: image max abs {parity['image_max_abs']:.2e}, "
          f"text max abs {parity['text_max_abs']:.2e} (within the {parity['tolerance']:.1e} checked)")
    accuracy = summary.get("accuracy")
    if accuracy:
        print(f"int8 ({mode}) vs fp32 on {accuracy['images']} images / {accuracy['texts']} prompts "
              f"of {accuracy['source']}: image cosine mean {accuracy['image_cosine_mean']:.4f} "
              f"(min {accuracy['image_cosine_min']:.4f}), text cosine mean {accuracy['text_cosine_mean']:.4f} "
              f"(min {accuracy['text_cosine_min']:.4f})")
        if "zeroshot_top1_fp32" in accuracy:
            print(f"zero-shot top-1 over {accuracy['classes']} classes: fp32 {accuracy['zeroshot_top1_fp32']:.4f}, "
                  f"int8 {accuracy['zeroshot_top1_int8']:.4f}")
    return 0
