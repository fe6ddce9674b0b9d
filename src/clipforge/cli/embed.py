"""``clipforge embed SOURCE OUT --model CKPT``: image (and caption) embeddings in clip-retrieval's layout.

Examples::

    clipforge embed photos/ photos-emb/ --model ckpt/
    clipforge embed captions.jsonl coco-emb/ --model ViT-B-32.pt --precision fp16
    clipforge embed 'shards/cc3m-{0000..0331}.tar' cc3m-emb/ --model ckpt/ --batch-size 512
    torchrun --nproc_per_node=8 -m clipforge.cli embed 'pipe:aws s3 cp s3://b/{0..999}.tar -' out/ --model ckpt/

Run it again on the same OUT to continue after a kill: complete parts are kept. The exit status
is 1 when some inputs were skipped (listed in OUT/manifest.json and summarised on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed``."""
    from ._common import add_model_arguments, non_negative_int, positive_int

    parser = subparsers.add_parser("embed", help="embed images and captions for search (clip-retrieval layout)",
                                   description="Embed an image folder, a CSV/TSV/JSONL listing or WebDataset "
                                   "shards into OUT/img_emb, OUT/text_emb, OUT/metadata and OUT/manifest.json.")
    parser.add_argument("source", metavar="SOURCE", help="image folder, .csv/.tsv/.jsonl listing, or shards "
                        "(path, brace pattern, folder of .tar, pipe: or http(s):// URL)")
    parser.add_argument("out", metavar="OUT", help="output folder (resumed when it holds complete parts)")
    add_model_arguments(parser)
    parser.add_argument("--modalities", default=None, metavar="image[,text]",
                        help="what to embed (default: image,text when the source has captions, else image)")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="N")
    parser.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="DataLoader processes reading and decoding images")
    parser.add_argument("--part-size", type=positive_int, default=10000, metavar="N",
                        help="rows per output part for folders and listings (shards: one part per shard)")
    parser.add_argument("--images", metavar="DIR", help="folder that a listing's relative paths are under "
                        "(default: the listing's folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``clipforge embed``."""
    from ..runtime import resolve_device
    from ..search import embed_collection
    from ..search.embed import rank_and_world
    from ._common import load_model_arg

    device = resolve_device(args.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    model, preprocess = load_model_arg(args.model, device, args.seed)
    manifest = embed_collection(args.source, args.out, model, preprocess, modalities=args.modalities,
                                batch_size=args.batch_size, num_workers=args.workers, precision=args.precision,
                                device=device, part_size=args.part_size, image_root=args.images,
                                model_spec=args.model, progress=not args.quiet)
    rank, world = rank_and_world()
    if not manifest.get("complete"):
        print(f"rank {rank}/{world}: my parts are written; the last rank to finish writes {args.out}/manifest.json",
              file=sys.stderr)
        return 0
    print(f"embedded {manifest['count']} rows ({', '.join(manifest['modalities'])}, dim {manifest['dim']}) "
          f"in {len(manifest['parts'])} parts into {args.out}")
    from ._common import warn_skipped

    return warn_skipped(manifest["skipped"], "input", "input(s)", "manifest.json")
