"""``clipforge convert SRC DST --to {clipforge,openai,hf,onnx}``: move weights between checkpoint layouts.

SRC is anything ``clipforge.load`` reads (OpenAI ``.pt``, open_clip, Hugging Face or clipforge
folder); DST is a folder for ``clipforge``/``hf``/``onnx`` and a ``.pt`` or ``.safetensors`` file for
``openai``. ``--to onnx`` writes the two towers as ONNX graphs that ``clipforge.load(DST)`` runs
with onnxruntime; ``--quantize int8 --calibration DIR`` adds int8 graphs and prints their cosine to
fp32 (and zero-shot top-1 of both when DIR has one sub-folder per class).
"""
from __future__ import annotations

import argparse

from .. import checkpoints

WRITERS = {"clipforge": checkpoints.save, "openai": checkpoints.export_openai, "hf": checkpoints.export_hf}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint to clipforge, OpenAI or Hugging Face layout, or to ONNX (and int8)",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("src", help="checkpoint file or folder, or a released model name in the cache")
    parser.add_argument("dst", help="output folder (clipforge, hf, onnx: new, empty or an earlier "
                        "export) or .pt/.safetensors file (openai)")
    parser.add_argument("--to", required=True, choices=sorted([*WRITERS, "onnx"]), help="output layout")
    parser.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                        help="override the MLP activation the source was trained with "
                             "(default: from its config, else QuickGELU as OpenAI's weights)")
    onnx = parser.add_argument_group("--to onnx")
    onnx.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    onnx.add_argument("--quantize", choices=["int8"], help="also write int8 graphs (loaded by default)")
    onnx.add_argument("--quantize-mode", choices=["static", "dynamic"], default=None,
                      help="static: activation ranges calibrated on --calibration (default); dynamic: per batch "
                           "(--calibration still measures the cost)")
    onnx.add_argument("--calibration", metavar="DIR", help="images to calibrate on (static: up to 256, spread "
                      "over the folder) and to measure int8 against fp32 on (all of them; one sub-folder per "
                      "class adds zero-shot top-1); needed by --quantize")
    onnx.add_argument("--templates", default=None, metavar="NAME|FILE|none",
                      help="prompt templates of that zero-shot check (default: imagenet)")
    onnx.add_argument("--threads", type=int, metavar="N", help="onnxruntime threads (default: torch's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load ``src``, write ``dst``, print one line saying what was written."""
    if args.to == "onnx":
        from ._convert_onnx import check_onnx_args

        check_onnx_args(args)  # before the source, which may be large, is loaded
    elif args.quantize or args.calibration or args.quantize_mode or args.templates:
        raise ValueError("--quantize, --quantize-mode, --calibration and --templates apply to --to onnx only")
    quick_gelu = None if args.activation is None else args.activation == "quick_gelu"
    model = checkpoints.load_model(args.src, quick_gelu=quick_gelu)
    if args.to == "onnx":
        from ._convert_onnx import run_onnx

        return run_onnx(model, args)
    written = WRITERS[args.to](model, args.dst)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {written} ({args.to} layout, {params:,} parameters)")
    return 0
