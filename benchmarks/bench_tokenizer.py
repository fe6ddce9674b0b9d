"""Tokenizer speed: clipforge vs open_clip's SimpleTokenizer vs transformers' CLIPTokenizer(Fast).

All tokenizers run in one process, on the same captions, producing ``[N, 77]`` tensors; the
captions are the real ones stored in ``tests/fixtures/tokenizer/cases.jsonl.gz`` that fit in 77
tokens, in two sets: ``english`` (Tux Paint stamp captions, Debian package summaries and
sentences, docstrings: mostly ASCII) and ``multilingual`` (the stamp captions' translations in
~100 languages and locale names: non-ASCII, so every text goes through ftfy).

Three timings, each the best of a few rounds run round-robin over the tokenizers:
``cold``, the first call of a freshly built tokenizer (empty caches) on all captions;
``steady``, a call on the second half of the captions after the tokenizer has seen the first
half (common words cached, new captions: a training run after its first batches);
``warm``, the second half again (everything cached: a later epoch); ``single``, the second
half again one caption per call (a loop over prompts). Building the tokenizer
(reading the vocabulary) is timed apart. Times are CPU time of this process (torch and the
Hugging Face tokenizers run on one thread), so other load on the machine doesn't skew them.
Run with::

    /work/peers/bin/python benchmarks/bench_tokenizer.py

(a venv with torch, ftfy, regex, clipforge, and optionally open_clip_torch and transformers).
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from clipforge.tokenizer.bpe import VOCAB_PATH, NUM_MERGES, Tokenizer

CASES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer" / "cases.jsonl.gz"
SETS = {"english": {"tuxpaint-en", "debian", "docstring"},
        "multilingual": {"tuxpaint-translated", "locale"}}


def load_captions() -> dict[str, list[str]]:
    """Fixture captions that fit in 77 tokens, split into the english and multilingual sets."""
    with gzip.open(CASES, "rt", encoding="ascii") as f:
        cases = [json.loads(line) for line in f]
    captions = {name: [] for name in SETS}
    for case in cases:
        for name, groups in SETS.items():
            if case["group"] in groups and len(case["ids"]) <= 75:
                captions[name].append(case["text"])
    for texts in captions.values():
        random.Random(0).shuffle(texts)  # so both halves mix all sources
    return captions


def hf_vocab_files(folder: str) -> tuple[str, str]:
    """OpenAI's vocabulary in Hugging Face's vocab.json + merges.txt form (no hub download)."""
    tokenizer = Tokenizer()
    vocab_file, merges_file = f"{folder}/vocab.json", f"{folder}/merges.txt"
    Path(vocab_file).write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = gzip.open(VOCAB_PATH, "rt", encoding="utf-8").read().split("\n")[1:NUM_MERGES + 1]
    Path(merges_file).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def contenders(folder: str) -> dict:
    """name -> (build(), call(tokenizer, texts) -> LongTensor[N, 77]) for what is importable."""
    found = {"clipforge": (Tokenizer, lambda tok, texts: tok(texts, truncate=True))}
    try:
        import open_clip
        found["open_clip SimpleTokenizer"] = (open_clip.tokenizer.SimpleTokenizer,
                                              lambda tok, texts: tok(texts, context_length=77))
    except ImportError:
        print("open_clip not importable: skipped")
    try:
        import transformers
        files = hf_vocab_files(folder)
        for name in ("CLIPTokenizer", "CLIPTokenizerFast"):
            cls = getattr(transformers, name)
            label = f"transformers {name}" + (" (= CLIPTokenizerFast)" if name == "CLIPTokenizer"
                                              and cls is transformers.CLIPTokenizerFast else "")
            if name == "CLIPTokenizerFast" and cls is transformers.CLIPTokenizer:
                continue  # transformers 5 has only the Rust-backed one, under both names
            found[label] = (lambda cls=cls: cls(*files), lambda tok, texts: tok(
                texts, padding="max_length", max_length=77, truncation=True,
                return_tensors="pt")["input_ids"])
    except ImportError:
        print("transformers not importable: skipped")
    return found


def same_ids(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows equal to the reference up to and including the first end-of-text
    (Hugging Face pads with 49407 where OpenAI pads with 0)."""
    equal = 0
    for row, ref in zip(tokens.tolist(), reference.tolist()):
        end = ref.index(49407) + 1
        equal += row[:end] == ref[:end]
    return equal / len(reference)


def timed(call, tokenizer, texts) -> tuple[float, torch.Tensor]:
    """CPU seconds of one call: on a shared machine, wall time also counts other processes."""
    start = time.process_time()
    tokens = call(tokenizer, texts)
    return time.process_time() - start, tokens


def run(captions: list[str], found: dict, rounds: int) -> list[tuple]:
    """Round-robin over the tokenizers, ``rounds`` times, keeping each one's best times, so
    that load from other processes hits all of them alike."""
    half = len(captions) // 2
    best = {name: [float("inf")] * 5 for name in found}  # build, cold, steady, warm, single s
    tokens = {}
    for _ in range(rounds):
        for name, (build, call) in found.items():
            start = time.process_time()
            tokenizer = build()
            build_s = time.process_time() - start
            cold_s, tokens[name] = timed(call, tokenizer, captions)
            tokenizer = build()
            call(tokenizer, captions[:half])  # caches filled by other captions
            steady_s, _ = timed(call, tokenizer, captions[half:])
            warm_s, _ = timed(call, tokenizer, captions[half:])  # the same captions again
            start = time.process_time()
            for caption in captions[half:]:
                call(tokenizer, [caption])
            single_s = time.process_time() - start
            best[name] = [min(a, b) for a, b in
                          zip(best[name], (build_s, cold_s, steady_s, warm_s, single_s))]
    reference = tokens["clipforge"]
    sizes = (len(captions), len(captions) - half, len(captions) - half, len(captions) - half)
    return [(name, times[0], *(n / t for n, t in zip(sizes, times[1:])),
             same_ids(tokens[name], reference)) for name, times in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; best one is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        found = contenders(folder)
        for set_name, captions in load_captions().items():
            rows = run(captions, found, args.rounds)
            base = next((r for r in rows if r[0] == "open_clip SimpleTokenizer"), None)
            print(f"\n{set_name}: {len(captions)} captions, one batch call, 1 thread, "
                  f"best of {args.rounds} rounds\n")
            print("| tokenizer | build s | cold captions/s | steady captions/s | warm captions/s "
                  "| single captions/s | cold / steady / warm / single x open_clip "
                  "| ids = clipforge |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name, build_s, cold, steady, warm, single, agree in rows:
                ratios = " / ".join(f"{mine / theirs:.1f}x" for mine, theirs in
                                    zip((cold, steady, warm, single), base[2:6])) if base else "-"
                print(f"| {name} | {build_s:.2f} | {cold:,.0f} | {steady:,.0f} | {warm:,.0f} "
                      f"| {single:,.0f} | {ratios} | {agree:.1%} |")


if __name__ == "__main__":
    main()
