"""CLIP's byte-level BPE tokenizer, id for id the same as OpenAI's ``SimpleTokenizer``.

The algorithm (Radford et al. 2021, and OpenAI's released code) is:

1. clean: ``ftfy.fix_text``, ``html.unescape`` applied twice, whitespace runs collapsed to one
   space, ends stripped, lower-cased;
2. split into words with CLIP's regex (the two special tokens, English contractions, runs of
   letters, single digits, runs of other non-space characters);
3. map each word's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark the
   last one with ``</w>``, and apply the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz`` by
   rank, merging every occurrence of the best-ranked adjacent pair until none applies;
4. look the pieces up in the 49,408-entry vocabulary: 256 bytes, 256 bytes + ``</w>``, one entry
   per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Speed comes from shortcuts that leave the ids unchanged (``tests/test_tokenizer.py`` checks them
against OpenAI's ids and against a plain re-implementation on thousands of inputs): cleaning
skips ftfy and html where both are provably the identity, the ids of each space-free piece of
text are cached, BPE runs on integer ids and is skipped for words that are one vocabulary entry,
and the padded batch is filled in one numpy assignment.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
OPENAI_VOCAB_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"

# IGNORECASE matters even on lower-cased text: it lets "'s" match "'ſ" (long s), as OpenAI's does.
WORD_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                             r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# An '&' that starts an entity for html.unescape or ftfy needs a non-space character after it.
_ENTITY_START = regex.compile(r"&[^ ]")


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's table from each byte value to a printable character.

    Bytes that are already printable and not space (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    map to themselves; the other 68 map, in byte order, to ``chr(256)``, ``chr(257)``, ... .
    The table's order is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + k) for k, byte in enumerate(others)})
    return table


def _needs_ftfy(text: str) -> bool:
    """False only for printable ASCII in which no ``&`` is followed by a non-space character.

    ftfy changes only non-ASCII characters, control characters and entities, and html.unescape
    only entities, so both return such text unchanged (the tests check this on many inputs).
    """
    return not (text.isascii() and text.isprintable()
                and ("&" not in text or _ENTITY_START.search(text) is None))


def _clean_pieces(text: str) -> list[str]:
    """The cleaned text's space-separated pieces (see :func:`clean_text`)."""
    if _needs_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # lower() neither makes nor changes whitespace, so lower-then-split is split-then-lower.
    return text.lower().split()


def clean_text(text: str) -> str:
    """Clean ``text`` exactly as OpenAI does: ftfy, html.unescape twice, whitespace, lower case.

    ``str.split`` equals OpenAI's ``regex.sub(r"\\s+", " ", ...)`` here: the only characters on
    which the two disagree (U+001C..U+001F) are removed by ftfy and never made by html.unescape.
    """
    return " ".join(_clean_pieces(text))


class Tokenizer:
    """CLIP's BPE tokenizer: ``encode``/``decode`` single texts, ``__call__`` for padded batches.

    Args:
        vocab_path: gzipped merges file (default: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``).
        cache_size: most pieces of text (words, or runs between spaces) whose ids are kept; the
            cache is emptied when full.
    """

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, cache_size: int = 100_000):
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"BPE vocabulary {vocab_path} not found; expected a gzipped "
                                    "merges file such as bpe_simple_vocab_16e6.txt.gz")
        raw = gzip.decompress(vocab_path.read_bytes())
        lines = raw.decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a header
        if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{vocab_path}: expected {NUM_MERGES} merge lines of two symbols "
                             f"after the header, found {len(merges)}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        byte_symbols = list(self.byte_encoder.values())
        vocab = [*byte_symbols, *(s + "</w>" for s in byte_symbols),
                 *("".join(pair) for pair in merges), SOT_TOKEN, EOT_TOKEN]
        self.encoder = {symbol: index for index, symbol in enumerate(vocab)}
        self.decoder = vocab
        self.vocab_size = len(vocab)  # 49,408
        self.sot_token_id = self.encoder[SOT_TOKEN]  # 49406
        self.eot_token_id = self.encoder[EOT_TOKEN]  # 49407
        # BPE runs on ids. Merge k creates id 512 + k, so the best-ranked pair is the one whose
        # merged id is smallest: (left_id << 16 | right_id) -> merged id says both at once.
        self._byte_ids = bytes(self.encoder[self.byte_encoder[byte]] for byte in range(256))
        self._merges = {self.encoder[a] << 16 | self.encoder[b]: self.encoder[a + b]
                        for a, b in merges}
        # In OpenAI's file every word-final entry ("cat</w>") is what BPE makes of its word (the
        # tests check all 34,337), so such words skip the merge loop; other files always run it.
        is_openai = hashlib.sha256(raw).hexdigest() == OPENAI_VOCAB_SHA256
        self._whole_words = self.encoder if is_openai else {}
        self.cache_size = cache_size
        self._cache: dict[str, list[int]] = {}  # piece of cleaned text -> its ids

    def _bpe(self, word: str) -> list[int]:
        """Ids of one word of the regex split.

        OpenAI's rule: find the best-ranked adjacent pair, merge all its occurrences left to
        right, repeat until no adjacent pair is a merge. Merging the leftmost occurrence at a time
        is the same: a merged id is larger than its parts, so the pairs a merge creates rank
        after it and the same pair stays best until its last occurrence is merged.
        """
        if word in (SOT_TOKEN, EOT_TOKEN):
            return [self.encoder[word]]
        data = word.encode("utf-8")
        symbol = word if len(data) == len(word) and word.isprintable() else \
            "".join(self.byte_encoder[byte] for byte in data)  # printable ASCII maps to itself
        whole = self._whole_words.get(symbol + "</w>")
        if whole is not None:
            return [whole]
        ids = list(data.translate(self._byte_ids))  # byte ids are 0..255
        ids[-1] += 256  # the same byte with </w>
        merges, no_merge = self._merges, self.vocab_size
        merged = [merges.get(a << 16 | b, no_merge) for a, b in zip(ids, ids[1:])]  # pair i, i+1
        while merged:
            best = min(merged)
            if best == no_merge:
                break
            i = merged.index(best)
            ids[i:i + 2] = [best]
            del merged[i]
            if i < len(merged):
                merged[i] = merges.get(best << 16 | ids[i + 1], no_merge)
            if i > 0:
                merged[i - 1] = merges.get(ids[i - 1] << 16 | best, no_merge)
        return ids

    def _piece_ids(self, piece: str) -> list[int]:
        """Ids of a space-free piece of cleaned text (cached).

        No regex match crosses a space, so a text's ids are its pieces' ids in a row; and each
        regex word is a piece whose only match is itself, so words share the same cache.
        """
        ids = self._cache.get(piece)
        if ids is None:
            # ASCII letters are one word; else the matches cover every non-space character, so
            # a single match is the piece itself.
            words = [piece] if piece.isascii() and piece.isalpha() else WORD_PATTERN.findall(piece)
            if len(words) == 1:
                ids = self._bpe(piece)
            else:
                ids = [i for word in words for i in self._piece_ids(word)]
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Return the BPE ids of ``text`` without start/end tokens."""
        cache, ids = self._cache, []
        for piece in _clean_pieces(text):
            piece_ids = cache.get(piece)
            ids += self._piece_ids(piece) if piece_ids is None else piece_ids
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Return the text of 1-D ``ids`` as OpenAI does: ``</w>`` becomes a space, bad UTF-8 is
        replaced. Padding zeros are not removed (id 0 is ``!``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        text = "".join(self.decoder[i] for i in ids)
        data = bytes(self.byte_decoder[char] for char in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = 77,
                 truncate: bool = False) -> torch.Tensor:
        """Tokenize ``texts`` into a zero-padded ``LongTensor[N, context_length]``.

        Each row is ``[sot, ids..., eot, 0, ...]``. A text with more than ``context_length``
        tokens (start and end included) raises ``ValueError`` unless ``truncate`` is true, in
        which case it is cut and its last id set to end-of-text.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(context_length, bool) or not isinstance(context_length, int) \
                or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for the start and end "
                             f"tokens), got {context_length!r}")
        flat_ids, lengths = [], []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
            ids = self.encode(text)
            if len(ids) + 2 > context_length:
                if not truncate:
                    prefix = text if len(text) <= 40 else text[:40] + "..."
                    raise ValueError(
                        f"texts[{index}] ({prefix!r}) has {len(ids) + 2} tokens with start and "
                        f"end, more than context_length={context_length}; shorten it or pass "
                        "truncate=True")
                del ids[context_length - 2:]  # keep sot + (L - 2) ids + eot: OpenAI's cut
            flat_ids += (self.sot_token_id, *ids, self.eot_token_id)
            lengths.append(len(ids) + 2)
        # numpy fills the padded block ~5x faster than torch indexing for small batches.
        lengths = np.array(lengths, dtype=np.int64).reshape(-1, 1)  # (N, 1)
        tokens = np.zeros((len(lengths), context_length), dtype=np.int64)  # (N, L)
        tokens[np.arange(context_length) < lengths] = flat_ids  # row-major, same order as flat_ids
        return torch.from_numpy(tokens)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """Return the shared default :class:`Tokenizer` (the vocabulary is read once)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77,
             truncate: bool = False) -> torch.Tensor:
    """Tokenize ``texts`` with CLIP's BPE into ``LongTensor[N, context_length]``.

    Same ids as OpenAI's ``clip.tokenize``: ``[49406, ids..., 49407, 0, ...]`` per text. Raises
    ``ValueError`` naming the text when it needs more than ``context_length`` tokens, unless
    ``truncate=True`` (then the row is cut and ends with 49407).
    """
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)
