"""Hostile text: long runs without spaces tokenize with OpenAI's ids on every merge path, and bad
arguments to ``tokenize`` fail with a clear TypeError.

The reference is ``reference_bpe`` of ``test_tokenizer.py``: OpenAI's merge loop written out
plainly. The lengths are chosen around ``LONG_WORD_BYTES`` (one-word loop below it, heap above)
and ``ROUNDS_WORD_BYTES`` (numpy rounds, then the heap), so each path is checked.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clipforge.tokenizer import _batch_merge, _long_merge
from clipforge.tokenizer.bpe import Tokenizer, tokenize
from test_tokenizer import REF_VOCAB, reference_bpe, reference_encode

LONG, ROUNDS = _long_merge.LONG_WORD_BYTES, _long_merge.ROUNDS_WORD_BYTES
# Space-free material whose regex words are long: letters of one script, runs of symbols.
POOLS = {
    "few letters": "ab",
    "latin": "abcdefghijklmnopqrstuvwxyz",
    "x": "x",
    "emoji": "".join(chr(c) for c in range(0x1F300, 0x1F340)) + "\u200d\ufe0f",
    "punctuation": "!#$%()*+,-./:;=?@[]^_{|}~",
    "cjk": "".join(chr(c) for c in range(0x4E00, 0x4E40)),
}


def random_word(rng: random.Random, pool: str, size_bytes: int) -> str:
    """A regex word of one pool's characters, about ``size_bytes`` bytes of UTF-8 long."""
    word = ""
    while len(word.encode("utf-8")) < size_bytes:
        word += rng.choice(pool)
    return word


def reference_ids(word: str) -> list[int]:
    return [REF_VOCAB[symbol] for symbol in reference_bpe(word)]


def start_ids(tokenizer: Tokenizer, word: str) -> list[int]:
    """A word's byte ids with ``</w>`` on the last, as BPE starts from them."""
    ids = list(word.encode("utf-8").translate(tokenizer._byte_ids))
    ids[-1] += 256
    return ids


@pytest.mark.parametrize("size", [LONG - 8, LONG + 1, 3 * LONG, ROUNDS + 1])
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_long_word_matches_reference_merge_on_every_path(pool, size):
    tokenizer = Tokenizer()
    rng = random.Random(f"{pool}-{size}")
    for _ in range(1 if size > ROUNDS else 3):  # the reference is slow on long words
        word = random_word(rng, POOLS[pool], size)
        expected = reference_ids(word)
        assert tokenizer._batch_merger.merge_word(word.encode("utf-8")) == expected
        assert tokenizer.encode(word) == expected


def test_heap_and_rounds_equal_the_one_word_loop_on_random_words():
    tokenizer = Tokenizer()
    merger = tokenizer._batch_merger
    rng = random.Random(1)
    for trial in range(40):
        pool = rng.choice(list(POOLS.values()))
        word = random_word(rng, pool, rng.choice([2, 9, 60, 300, 1500]))
        ids = start_ids(tokenizer, word)
        loop = _batch_merge.merge_ids(list(ids), merger.merges, merger.no_merge)
        assert _long_merge.merge_ids_heap(list(ids), merger.merges) == loop
        # rounds stop anywhere; the heap must finish from wherever they stopped
        after_rounds = _long_merge.merge_ids_rounds(np.array(ids, dtype=np.int64), merger._merged,
                                                    merger.no_merge)
        assert _long_merge.merge_ids_heap(after_rounds.tolist(), merger.merges) == loop


def test_overlapping_pairs_merge_leftmost_first_in_rounds():
    """Runs of one byte ("aaa") are chains of the same overlapping pair: OpenAI merges the first,
    skips one, merges the next; every run length, odd and even, must agree."""
    tokenizer = Tokenizer()
    for char in "xa.!":
        for length in [*range(2, 40), ROUNDS, ROUNDS + 1, ROUNDS + 2, ROUNDS + 3]:
            word = char * length
            assert tokenizer._batch_merger.merge_word(word.encode()) == reference_ids(word), length


def test_batch_of_many_new_words_with_long_ones_matches_reference():
    """Batches of at least MIN_BATCH_WORDS new words go through numpy; long words leave them."""
    rng = random.Random(2)
    texts = [" ".join(random_word(rng, rng.choice(list(POOLS.values())), rng.choice([3, 7, 20, 200, 600]))
                      for _ in range(3)) for _ in range(_batch_merge.MIN_BATCH_WORDS)]
    tokenizer = Tokenizer()
    assert tokenizer.encode_batch(texts) == [reference_encode(text) for text in texts]


def test_hostile_runs_from_the_issue_match_reference():
    """32,000 'x' (was 5 s) and a long run of emoji (16,000 took 20 s) give OpenAI's ids."""
    tokenizer = Tokenizer()
    for text in ["x" * 32_000, random_word(random.Random(3), POOLS["emoji"], 12_000)]:
        assert tokenizer.encode(text) == reference_encode(text)


def test_truncate_merges_only_the_first_pieces_and_keeps_openai_cut():
    rng = random.Random(4)
    texts = [" ".join(random_word(rng, POOLS["latin"], rng.choice([1, 4, 30])) for _ in range(n))
             for n in (1, 5, 74, 75, 76, 300)]
    texts.append("\u180e " * 100 + "tail words")  # pieces that might make no id are redone in full
    expected = torch.zeros(len(texts), 77, dtype=torch.int64)
    for row, text in zip(expected, texts):
        ids = reference_encode(text)[:75]
        row[:len(ids) + 2] = torch.tensor([49406, *ids, 49407])
    tokenizer = Tokenizer()
    assert torch.equal(tokenizer(texts, context_length=77, truncate=True), expected)
    # the 300-piece text's pieces after the 75th were never merged
    merged = {piece for text in texts[:5] + texts[6:] for piece in text.split()}
    merged.update(texts[5].split()[:75])
    never = set(texts[5].split()[75:]) - merged
    assert len(never) > 100 and not never & set(tokenizer._cache)


def test_empty_list_gives_empty_rows():
    assert tokenize([]).shape == (0, 77)
    assert tokenize([], context_length=24).dtype == torch.int64
    assert tokenize([], context_length=24).shape == (0, 24)


@pytest.mark.parametrize("texts", [None, 5, b"a cat", bytearray(b"x"), {"a": "cat"}, 3.5])
def test_tokenize_rejects_what_is_not_a_string_or_a_list_of_strings(texts):
    with pytest.raises(TypeError, match="texts must be a string or a list of strings, got"):
        tokenize(texts)


def test_tokenize_names_a_bad_element_and_accepts_tuples_and_generators():
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got bytes"):
        tokenize(["a cat", b"a dog"])
    assert torch.equal(tokenize(("a cat", "a dog")), tokenize(["a cat", "a dog"]))
    assert torch.equal(tokenize(text for text in ["a cat"]), tokenize("a cat"))
