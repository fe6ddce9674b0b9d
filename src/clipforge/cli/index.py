"""``clipforge index OUT``: FAISS indexes over the embeddings ``clipforge embed`` wrote.

Examples::

    clipforge index photos-emb/                       # type chosen from the count and 4 GiB
    clipforge index cc3m-emb/ --memory 16GiB
    clipforge index cc3m-emb/ --factory 'IVF4096,PQ32'

Writes OUT/image.index and OUT/text.index (when captions were embedded) with an info JSON beside
each: the factory, the tuned search parameters, recall@10 against exact search, build time and
peak memory. A build killed midway leaves the previous index in place.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``index``."""
    parser = subparsers.add_parser("index", help="build FAISS indexes over an embedding folder",
                                   description="Build OUT/image.index and OUT/text.index (inner product on the "
                                   "normalised embeddings), tuned to recall@10 >= --target-recall.")
    parser.add_argument("out", metavar="OUT", help="folder written by clipforge embed")
    parser.add_argument("--memory", default="4GiB", metavar="SIZE",
                        help="memory budget of the index and its build, e.g. 512MiB, 4GiB (default: 4GiB)")
    parser.add_argument("--factory", metavar="STRING", help="FAISS index_factory string instead of the automatic "
                        "choice (e.g. Flat, HNSW32, IVF1024,Flat, OPQ32_128,IVF4096,PQ32)")
    parser.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                        help="recall@10 against exact search the search parameters are tuned to (default 0.95)")
    parser.add_argument("--modalities", default="image,text", metavar="image[,text]",
                        help="which embeddings to index, when present (default: both)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``clipforge index``."""
    from ..search import build_index

    modalities = tuple(name.strip() for name in args.modalities.split(",") if name.strip())
    unknown = [name for name in modalities if name not in ("image", "text")]
    if unknown or not modalities:
        raise ValueError(f"--modalities takes image, text or image,text, got {args.modalities!r}")
    infos = build_index(args.out, memory=args.memory, factory=args.factory, target_recall=args.target_recall,
                        modalities=modalities, progress=not args.quiet)
    for modality, info in infos.items():
        print(f"{args.out}/{modality}.index: {info['factory']}, {info['count']} x {info['dim']}, "
              f"recall@10 {info['recall_at_10']:.3f} with {info['search_params'] or 'exact search'}, "
              f"built in {info['build_seconds']} s, peak memory {info['peak_memory_bytes'] / 2**20:.0f} MiB")
    return 0
