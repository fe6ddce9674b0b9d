"""``clipforge models``: the table of architectures (name, parameters, image size, embedding size) and
whether OpenAI's released weights for each are in the cache folder, where a bare name is loaded from."""
from __future__ import annotations

import argparse

import torch

from ..checkpoints import cache_dir, released_weights_file
from ..models import available_models, create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    parser = subparsers.add_parser("models", help="list the model architectures and the cached weights",
                                   description="List every registered architecture with its size, and whether "
                                               "its released weights are in the cache folder.")
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


def weights_status(name: str) -> str:
    """``cached``, ``not cached`` (released, but not in the cache folder) or ``-`` (no released weights)."""
    path = released_weights_file(name)
    return "-" if path is None else "cached" if path.is_file() else "not cached"


def run(args: argparse.Namespace) -> int:
    """Print the table, then where the released weights are looked up."""
    rows = [("model", "parameters", "image size", "embed dim", "weights")]
    rows += [(name, f"{params:,}", str(size), str(dim), weights_status(name))
             for name, params, size, dim in model_table()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:-1])),
              row[-1], sep="  ")
    print(f"\nweights: OpenAI's released files, loaded by name from {cache_dir()} (set CLIPFORGE_CACHE to "
          "change it; clipforge never downloads them)")
    return 0
