"""Tokenizer time on hostile text: long runs without spaces (issue 16, item 13).

Each input is one text, tokenized by a freshly built tokenizer (empty caches) into ``[1, 77]``
with truncation (``truncate=True`` / ``truncation=True``), as a search service taking text from
the network would. clipforge's full ids (``encode``, no truncation) are timed too. Times are CPU
seconds of this process, one thread. open_clip is not run on texts over ``--open-clip-max-chars``
characters: its merge loop costs the word's length per distinct merge, hours on 1 MB of random
letters.
"ids = clipforge" compares the ``[1, 77]`` rows up to end-of-text.

    /work/peers/bin/python benchmarks/bench_tokenizer_long.py

To time another clipforge (e.g. an older commit), put its ``src`` first on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from bench_tokenizer import contenders, same_ids
from clipforge.tokenizer.bpe import Tokenizer

EMOJI = [chr(code) for code in range(0x1F300, 0x1F340)]


def inputs() -> dict[str, str]:
    """name -> one space-free text (seeded)."""
    rng = random.Random(0)
    return {
        "16,000 x one emoji": "\U0001F426" * 16_000,
        "16,000 random emoji": "".join(rng.choice(EMOJI) for _ in range(16_000)),
        "32,000 'x'": "x" * 32_000,
        "1 MB 'x'": "x" * 1_000_000,
        "1 MB random a-z": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000)),
        "1 MB emoji (250,000)": "".join(rng.choice(EMOJI) for _ in range(250_000)),
    }


def cpu_seconds(call) -> tuple[float, object]:
    """CPU seconds of ``call()`` and its result."""
    start = time.process_time()
    result = call()
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--open-clip-max-chars", type=int, default=40_000,
                        help="run open_clip only on texts up to this many characters")
    parser.add_argument("--clipforge-max-chars", type=int, default=None,
                        help="skip longer texts for clipforge too (for a quadratic older version)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        found = contenders(folder)
        print("| text | chars | tokenizer | [1, 77] truncated s | full ids s | tokens | ids = clipforge |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for name, text in inputs().items():
            reference = None
            for label, (build, call) in found.items():
                limit = {"clipforge": args.clipforge_max_chars,
                         "open_clip SimpleTokenizer": args.open_clip_max_chars}.get(label)
                if limit is not None and len(text) > limit:
                    print(f"| {name} | {len(text):,} | {label} | not run | | | |")
                    continue
                tokenizer = build()  # not timed: reading the vocabulary
                truncated_s, tokens = cpu_seconds(lambda: call(tokenizer, [text]))
                full_s, count = "", ""
                if label == "clipforge":
                    reference = tokens
                    tokenizer = Tokenizer()
                    full_s, ids = cpu_seconds(lambda: tokenizer.encode(text))
                    full_s, count = f"{full_s:.2f}", f"{len(ids):,}"
                agree = f"{same_ids(tokens, reference):.0%}" if reference is not None else "-"
                print(f"| {name} | {len(text):,} | {label} | {truncated_s:.2f} | {full_s} | {count} "
                      f"| {agree} |", flush=True)


if __name__ == "__main__":
    main()
