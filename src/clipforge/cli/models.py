"""``clipforge models``: the table of architectures (name, parameters, image size, embedding size)."""
from __future__ import annotations

import argparse

import torch

from ..models import available_models, create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    parser = subparsers.add_parser("models", help="list the model architectures",
                                   description="List every registered architecture with its size.")
    parser.set_defaults(func=run)


def model_table() -> list[tuple[str, int, int, int]]:
    """``(name, parameters, image_size, embed_dim)`` per preset; built on the meta device, so instant."""
    rows = []
    for name in available_models():
        with torch.device("meta"):  # shapes only: no memory, no random init
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, model.config.vision.image_size, model.config.embed_dim))
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the table."""
    rows = [("model", "parameters", "image size", "embed dim")]
    rows += [(name, f"{params:,}", str(size), str(dim)) for name, params, size, dim in model_table()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:])), sep="  ")
    return 0
