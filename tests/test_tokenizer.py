"""clipforge.tokenizer gives OpenAI's SimpleTokenizer ids, for real captions and for any string.

Three references:
- ``fixtures/tokenizer/cases.jsonl.gz``: ~4,800 texts (real captions in ~100 languages, package
  descriptions, docstrings, locale names, mojibake, entities, control characters, random mixes,
  long texts) with the ids OpenAI's own code gave them (``make_fixtures.py`` beside it);
- ``reference_encode`` below: OpenAI's algorithm written out plainly, run on seeded random
  strings, so new inputs are checked without open_clip at run time;
- open_clip itself, live, when it is installed (skipped otherwise).
"""
from __future__ import annotations

import gzip
import html
import json
import random
import re
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from clipforge.tokenizer import _batch_merge as _bpe_batch
from clipforge.tokenizer.clean import needs_ftfy
from clipforge.tokenizer.bpe import VOCAB_PATH, Tokenizer, clean_text, get_tokenizer, tokenize

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer" / "cases.jsonl.gz"
SOT, EOT = 49406, 49407
SPECIAL_SPELLINGS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    with gzip.open(FIXTURES, "rt", encoding="ascii") as f:
        return [json.loads(line) for line in f]


# --- a plain re-implementation of OpenAI's algorithm, sharing no code with clipforge ----------

def _reference_tables():
    lines = gzip.open(VOCAB_PATH).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:48895]]
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    byte_chars = {b: chr(b) for b in keep}
    for k, b in enumerate(b for b in range(256) if b not in keep):
        byte_chars[b] = chr(256 + k)
    vocab = list(byte_chars.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return byte_chars, {m: r for r, m in enumerate(merges)}, {v: i for i, v in enumerate(vocab)}


REF_BYTES, REF_RANKS, REF_VOCAB = _reference_tables()
REF_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def reference_clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def reference_bpe(word: str) -> list[str]:
    if word in ("<|startoftext|>", "<|endoftext|>"):
        return [word]
    symbols = [REF_BYTES[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
        pairs = list(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: REF_RANKS.get(p, float("inf")))
        if best not in REF_RANKS:
            return symbols
        merged, i = [], 0
        while i < len(symbols):
            if tuple(symbols[i:i + 2]) == best:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def reference_encode(text: str) -> list[int]:
    return [REF_VOCAB[s] for word in REF_PATTERN.findall(reference_clean(text))
            for s in reference_bpe(word)]


def random_texts(seed: int, count: int) -> list[str]:
    """Seeded mixes of the character classes each step of the algorithm treats specially."""
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(32, 127)] * 3,
        [chr(c) for c in range(0, 32)] + list("\x7f\x85\xa0\u2028\u2029\u3000\ufeff\u200b\u180e"),
        [chr(c) for c in range(0xA0, 0x2B0)],  # Latin-1 and Latin Extended: mojibake material
        [chr(c) for c in range(0x370, 0x530)] + [chr(c) for c in range(0x4E00, 0x4E40)],
        [chr(c) for c in range(0x1F300, 0x1F340)] + ["\u200d", "\ufe0f", "\U0001F3FB"],
        [chr(c) for c in range(0x300, 0x370)] + [chr(c) for c in range(0x900, 0x980)],
        [chr(c) for c in range(0xFF01, 0xFF60)] + list("ﬀﬁﬂ’‘“”\u212a\u017fİ"),
        ["&amp;", "&#39;", "&lt;", "&gt;", "&quot;", "&nbsp;", "&#x263A;", "&amp;lt;", "&AMP;",
         "&eacute", "&#0;", "&#150;", "'s", "'T", "'ll", "'ſ", "\r\n", " ", "  ", "\t",
         "<|endoftext|>", "<|STARTOFTEXT|>", "Ã©", "â€™", "Ã¼", "\ud83d\ude00", "\ud800"],
    ]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.choice([1, 2, 5, 12, 40])))
            for _ in range(count)]


# --- fixed facts of the vocabulary ------------------------------------------------------------

def test_vocabulary_has_openai_size_special_ids_and_byte_order():
    tokenizer = get_tokenizer()
    assert (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id) == (49408, SOT, EOT)
    assert tokenizer.decoder[:3] == ["!", '"', "#"] and tokenizer.decoder[256] == "!</w>"
    assert tokenizer.decoder[512] == "in" and tokenizer.decoder[SOT] == "<|startoftext|>"
    assert tokenizer.encoder == REF_VOCAB


def test_default_tokenizer_is_loaded_once():
    assert get_tokenizer() is get_tokenizer()


# --- ids against OpenAI's ---------------------------------------------------------------------

def test_encode_matches_openai_on_every_fixture_text(cases):
    tokenizer = get_tokenizer()
    wrong = [(c["group"], c["text"][:60]) for c in cases if tokenizer.encode(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:5]}"
    groups = {c["group"] for c in cases}
    assert {"tuxpaint-en", "tuxpaint-translated", "debian", "locale", "mojibake", "html", "edge", "random", "long"} <= groups


def test_tokenize_batch_rows_are_sot_ids_eot_then_zero_padding(cases):
    short = [c for c in cases if len(c["ids"]) <= 75]
    tokens = tokenize([c["text"] for c in short])
    assert tokens.dtype == torch.long and tokens.shape == (len(short), 77)
    expected = torch.zeros(len(short), 77, dtype=torch.long)
    for row, case in enumerate(short):
        ids = [SOT, *case["ids"], EOT]
        expected[row, :len(ids)] = torch.tensor(ids)
    assert torch.equal(tokens, expected)


def test_truncate_keeps_openai_cut_and_ends_with_eot(cases):
    long = [c for c in cases if "truncated" in c]
    assert len(long) >= 6
    tokens = tokenize([c["text"] for c in long], truncate=True)
    assert tokens.tolist() == [c["truncated"] for c in long]
    assert (tokens[:, -1] == EOT).all()


def test_text_over_context_length_raises_naming_index_prefix_and_count(cases):
    long_text = next(c for c in cases if c["group"] == "long")["text"]
    count = len(get_tokenizer().encode(long_text)) + 2
    prefix = re.escape(repr(long_text[:40] + "..."))
    with pytest.raises(ValueError, match=rf"texts\[1\] \({prefix}\) has {count} tokens"):
        tokenize(["short caption", long_text])
    # exactly 77 tokens fits; 78 does not
    assert tokenize("x " * 75)[0, -1] == EOT
    with pytest.raises(ValueError, match="has 78 tokens"):
        tokenize("x " * 76)


def test_empty_and_whitespace_only_texts_give_sot_eot_and_padding():
    tokens = tokenize(["", " ", "\t\n \u3000", "&nbsp;"])
    assert tokens[:, :2].tolist() == [[SOT, EOT]] * 4 and not tokens[:, 2:].any()
    assert tokenize([]).shape == (0, 77)


@pytest.mark.parametrize("size", [1, 3, 16, 17, 200])
def test_batches_pad_and_truncate_like_a_plain_loop(cases, size):
    texts = [c["text"] for c in cases][:size]
    tokenizer = get_tokenizer()
    rows = tokenizer(texts, context_length=20, truncate=True)
    expected = torch.zeros(len(texts), 20, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT, *tokenizer.encode(text)[:18], EOT]
        expected[row, :len(ids)] = torch.tensor(ids)
    assert rows.dtype == torch.long and torch.equal(rows, expected)


def test_other_context_lengths_and_single_string():
    assert tokenize("a photo of a cat", context_length=8).tolist() == [
        [SOT, 320, 1125, 539, 320, 2368, EOT, 0]]
    assert tokenize("a photo of a cat", context_length=4, truncate=True).tolist() == [
        [SOT, 320, 1125, EOT]]


@pytest.mark.parametrize("seed", range(4))
def test_random_strings_match_reference_implementation(seed):
    tokenizer = Tokenizer()  # fresh caches: every word goes through BPE here
    texts = random_texts(seed, 500)
    wrong = [t for t in texts if tokenizer.encode(t) != reference_encode(t)]
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:3]!r}"


def test_one_batch_of_many_new_texts_matches_reference_implementation():
    # thousands of new words in one call: BPE runs in numpy on the batch, not word by word
    tokenizer = Tokenizer()
    texts = random_texts(11, 1500)
    expected = [reference_encode(t) for t in texts]
    assert tokenizer.encode_batch(texts) == expected
    rows = Tokenizer()(texts, context_length=400).tolist()
    assert [row[:len(ids) + 2] for row, ids in zip(rows, expected)] == \
        [[SOT, *ids, EOT] for ids in expected]
    assert not any(any(row[len(ids) + 2:]) for row, ids in zip(rows, expected))


def test_batch_merger_equals_one_word_merge_loop(cases, monkeypatch):
    tokenizer = Tokenizer()
    words = {w for c in cases for w in REF_PATTERN.findall(reference_clean(c["text"]))}
    words |= {w for t in random_texts(12, 1000) for w in REF_PATTERN.findall(reference_clean(t))}
    words = sorted(words - {"<|startoftext|>", "<|endoftext|>"})
    assert len(words) > 10000 and max(len(w.encode()) for w in words) > 100  # every length group
    data = [w.encode("utf-8") for w in words]
    def batch(words):
        return [memoryview(ids).cast("H").tolist() for ids in tokenizer._batch_merger(words)]

    assert batch(data) == [tokenizer._merge(d) for d in data]
    assert batch(data[:1]) == [tokenizer._merge(data[0])]
    monkeypatch.setattr(_bpe_batch, "MIN_BATCH_WORDS", 1)  # numpy rounds to the very last word
    monkeypatch.setattr(_bpe_batch, "TAIL_WORDS", 1)
    assert batch(data[:3000]) == [tokenizer._merge(d) for d in data[:3000]]


def test_fast_path_skips_ftfy_only_where_ftfy_and_html_change_nothing(cases):
    rng = random.Random(0)
    printable = [chr(c) for c in range(32, 127)]
    texts = [a + b for a in printable for b in printable]  # every printable ASCII pair
    texts += [chr(c) + "x" + chr(d) for c in range(128) for d in (ord("&"), ord(" "), 10, 13)]
    texts += ["".join(rng.choice("&#;xX0aAmp lgt19 .") for _ in range(rng.randint(1, 12)))
              for _ in range(3000)]
    texts += [c["text"] for c in cases]
    fast = [t for t in texts if not needs_ftfy(t)]
    assert len(fast) > 9000
    changed = [t for t in fast if ftfy.fix_text(t) != t or html.unescape(t) != t]
    assert not changed, changed[:5]
    assert [clean_text(t) for t in texts] == [reference_clean(t) for t in texts]


def test_every_word_final_vocabulary_entry_is_what_bpe_makes_of_its_word():
    # the premise of the tokenizer's whole-word cache, checked on all of OpenAI's vocabulary
    tokenizer = Tokenizer()
    byte_of = {char: byte for byte, char in REF_BYTES.items()}
    checked = 0
    for symbol, index in REF_VOCAB.items():
        if index >= 256 and symbol.endswith("</w>"):
            try:
                word = bytes(byte_of[c] for c in symbol[:-4]).decode("utf-8")
            except UnicodeDecodeError:  # no text's word has these bytes
                continue
            assert tokenizer._merge(word.encode("utf-8")) == [index], symbol
            checked += 1
    assert checked == 34337  # of 34,483 word-final merges; the rest are not UTF-8


def test_words_and_space_free_pieces_split_into_themselves(cases):
    # the premise of caching by piece: matches never cross spaces, a word's only match is itself
    texts = [c["text"] for c in cases] + random_texts(5, 500)
    for text in map(reference_clean, texts):
        words = REF_PATTERN.findall(text)
        assert words == [w for piece in text.split(" ") for w in REF_PATTERN.findall(piece)]
        assert all(REF_PATTERN.findall(word) == [word] for word in words)


def test_every_letter_is_a_word_of_its_own_for_the_regex():
    # the premise of skipping the regex for pieces where str.isalpha() holds
    letters = [chr(code) for code in range(0x110000) if chr(code).isalpha()]
    assert len(letters) > 100_000
    joined = " ".join(letters)
    assert REF_PATTERN.findall(joined) == letters
    assert REF_PATTERN.findall("".join(letters[:5000])) == ["".join(letters[:5000])]


def test_letters_between_ascii_punctuation_are_three_words_for_the_regex():
    # the premise of splitting such pieces without the regex: every run of ASCII punctuation but
    # "'" before or after a run of letters is a word of its own
    from clipforge.tokenizer.bpe import _EDGE_PUNCTUATION

    rng = random.Random(0)
    letters = [chr(code) for code in range(0x110000) if chr(code).isalpha()]
    for _ in range(20_000):
        before = "".join(rng.choices(_EDGE_PUNCTUATION, k=rng.choice([0, 1, 1, 3])))
        after = "".join(rng.choices(_EDGE_PUNCTUATION, k=rng.choice([0, 1, 1, 2])))
        word = "".join(rng.choices(letters, k=rng.choice([1, 2, 7])))
        piece = before + word + after
        if "<|" not in piece:
            assert REF_PATTERN.findall(piece) == [w for w in (before, word, after) if w], ascii(piece)


def test_pieces_near_contractions_and_special_tokens_match_reference():
    tokenizer = Tokenizer()  # fresh caches
    texts = ["(pavão), «g». ...abc... -x- $€x ~ñ~ x|y ||ab ab<| <b>bold</b>",
             "<|endoftext|>. (<|startoftext|> .<|endoftext|>x 's. .'s a.'s (it's) 'quoted' ('x')",
             "cimetière. павук, 思想的气球。 ऑक्टोबर| ok? (hi) [a] {b} @c #d %e ^f &g *h +i =j"]
    assert tokenizer.encode_batch(texts * 100) == [reference_encode(text) for text in texts] * 100


def test_word_cache_stays_bounded_and_ids_stay_exact():
    tokenizer = Tokenizer(cache_size=50)
    texts = random_texts(7, 300) + [f"word{i} w{i}x" for i in range(200)]
    assert [tokenizer.encode(t) for t in texts] == [reference_encode(t) for t in texts]
    assert len(tokenizer._cache) - len(tokenizer._whole_word_pieces) <= 50


# --- decode and bad input ---------------------------------------------------------------------

def test_decode_returns_cleaned_text_with_word_ends_as_spaces():
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("A Photo of 日本語 😀, &amp; more")) == \
        "a photo of 日本語 😀, & more "
    assert tokenizer.decode(torch.tensor([SOT, 320, EOT])) == "<|startoftext|>a <|endoftext|>"
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([49408])


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tokenize(["ok", 3])
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        tokenize("a", context_length=1)
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        Tokenizer(tmp_path / "missing.txt.gz")
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="expected 48894 merge lines"):
        Tokenizer(broken)


# --- live comparison, only where open_clip is installed ---------------------------------------

def test_live_open_clip_gives_the_same_tensors(cases):
    open_clip = pytest.importorskip("open_clip")
    texts = [c["text"] for c in cases] + random_texts(99, 500)
    texts = [t for t in texts if not any(s in reference_clean(t) for s in SPECIAL_SPELLINGS)]
    assert torch.equal(tokenize(texts, truncate=True), open_clip.tokenize(texts))
