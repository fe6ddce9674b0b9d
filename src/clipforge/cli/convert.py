"""``clipforge convert SRC DST --to {clipforge,openai,hf}``: move weights between checkpoint layouts.

SRC is anything ``clipforge.load`` reads (OpenAI ``.pt``, open_clip, Hugging Face or clipforge
folder); DST is a folder for ``clipforge``/``hf`` and a ``.pt`` or ``.safetensors`` file for ``openai``.
"""
from __future__ import annotations

import argparse

from .. import checkpoints

WRITERS = {"clipforge": checkpoints.save, "openai": checkpoints.export_openai, "hf": checkpoints.export_hf}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint to clipforge, OpenAI or Hugging Face layout",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("src", help="checkpoint file or folder, or a released model name in the cache")
    parser.add_argument("dst", help="output folder (clipforge, hf) or .pt/.safetensors file (openai)")
    parser.add_argument("--to", required=True, choices=sorted(WRITERS), help="output layout")
    parser.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                        help="override the MLP activation the source was trained with "
                             "(default: from its config, else QuickGELU as OpenAI's weights)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load ``src``, write ``dst``, print one line saying what was written."""
    quick_gelu = None if args.activation is None else args.activation == "quick_gelu"
    model = checkpoints.load_model(args.src, quick_gelu=quick_gelu)
    written = WRITERS[args.to](model, args.dst)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {written} ({args.to} layout, {params:,} parameters)")
    return 0
