"""``clipforge shards``: pack a folder of images plus a caption file into WebDataset tar shards.

Example::

    clipforge shards photos/ photos/captions.csv shards/ --max-count 5000 --max-size 500
    clipforge train --data 'shards/data-{000000..000011}.tar' ...
"""
from __future__ import annotations

import argparse

from . import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``shards`` sub-command."""
    parser = subparsers.add_parser(
        "shards",
        help="pack images + a CSV/TSV/JSONL caption file into WebDataset tar shards",
        description="Pack the images listed in CAPTIONS (paths relative to SRC_DIR) into tar shards in "
        "OUT_DIR, with a sizes.json the loader reads. Rows are shuffled (--seed) unless --no-shuffle.",
    )
    parser.add_argument("src_dir", metavar="SRC_DIR", help="folder the image paths in CAPTIONS are relative to")
    parser.add_argument("captions", metavar="CAPTIONS", help=".csv, .tsv or .jsonl file of (image, caption) rows")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the shards into")
    parser.add_argument("--max-count", type=int, default=10000, metavar="N", help="samples per shard at most (default 10000)")
    parser.add_argument("--max-size", type=float, default=1000.0, metavar="MB", help="shard size in MB at most (default 1000)")
    parser.add_argument("--prefix", default="data", help="shard file name prefix (default data: data-000000.tar)")
    parser.add_argument("--image-key", metavar="COLUMN", help="image column (default: image, filepath, file_name, path)")
    parser.add_argument("--caption-key", metavar="COLUMN", help="caption column (default: caption, title, text)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row shuffle (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the caption file's row order")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the shards and print where they are and how to use them."""
    import signal

    from ..data.shards import write_shards  # imported here so `clipforge --help` stays fast

    def stop(signum, frame):  # SIGTERM as Ctrl-C: the half-written set is removed on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        written = write_shards(
            args.captions, args.out_dir, image_root=args.src_dir, max_count=args.max_count,
            max_size_mb=args.max_size, prefix=args.prefix, shuffle=not args.no_shuffle, seed=args.seed,
            image_key=args.image_key, caption_key=args.caption_key, overwrite=args.overwrite,
        )
    except FileExistsError as err:
        raise CliError(f"{err} (--overwrite)") from None
    print(f"wrote {written.num_samples} samples in {len(written.paths)} shards ({written.num_bytes / 1e6:.1f} MB)")
    if written.num_skipped:
        share = written.num_skipped / (written.num_skipped + written.num_samples)
        print(f"left out {written.num_skipped} rows ({share:.1%}): {written.num_corrupt} corrupt images, "
              f"{written.num_no_caption} without a caption, "
              f"{written.num_skipped - written.num_corrupt - written.num_no_caption} whose image could not be "
              "read (see the log above)")
    print(f"train with: --data '{written.pattern}'")
    return 0
