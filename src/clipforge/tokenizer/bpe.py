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
skips ftfy where it provably changes nothing (:mod:`clipforge.tokenizer.clean`); a batch is handled
as a whole, so each new space-free piece of text, and each new word, is split and merged once
however often it occurs (ASCII pieces split by the stdlib's ``re``, twice as fast as ``regex``),
and the cached ids of known pieces, kept as 16-bit bytes, are joined by ``bytes.join``; BPE
runs on integer ids, is skipped for words that are one vocabulary entry, and runs on many new
words at once in numpy (:mod:`clipforge.tokenizer._batch_merge`); the padded rows are one ``bytes.join``
widened to int64 by numpy.

Work stays bounded on hostile text: a word longer than 128 bytes (a run without spaces) is merged
in O(n log n) by a heap over its pairs (:mod:`clipforge.tokenizer._long_merge`), so 1 MB without
a space takes seconds, not hours; with ``truncate=True`` only a text's first ``context_length - 2``
space-separated pieces are split and merged.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import regex
import torch

from ._batch_merge import SEPARATOR, BatchMerger, id_bytes
from .clean import clean_pieces, clean_text, fixed_pieces, ftfy_is_identity, needs_ftfy  # noqa: F401

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
OPENAI_VOCAB_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"

# IGNORECASE matters even on lower-cased text: it lets "'s" match "'ſ" (long s), as OpenAI's does.
WORD_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                             r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# WORD_PATTERN, plus newline as a match of its own: the separator of pieces split in one call.
_SPLIT_PATTERN = regex.compile("\n|" + WORD_PATTERN.pattern, regex.IGNORECASE)
# The same on ASCII text, where letters are [a-z] and numbers [0-9], in the stdlib's faster re.
_SPLIT_PATTERN_ASCII = re.compile(r"\n|<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                  r"[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE | re.ASCII)
_SPECIAL_TOKENS = frozenset((SOT_TOKEN, EOT_TOKEN))
# ASCII punctuation but "'": the regex makes a run of it beside letters one word of its own
_EDGE_PUNCTUATION = "".join(char for char in string.punctuation if char != "'")


@functools.lru_cache(maxsize=8)
def _zero_bytes(size: int) -> bytes:
    """``size`` zero bytes: the padding that rows are cut from."""
    return bytes(size)


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


class Tokenizer:
    """CLIP's BPE tokenizer: ``encode``/``decode`` single texts, ``__call__`` for padded batches.

    Args:
        vocab_path: gzipped merges file (default: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``).
        cache_size: most pieces of text (words, or runs between spaces) whose ids are kept
            besides the vocabulary's whole words; the cache is emptied when a batch would
            overfill it.
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
        self._sot_bytes, self._eot_bytes = id_bytes([self.sot_token_id]), id_bytes([self.eot_token_id])
        # BPE runs on ids. Merge k creates id 512 + k, so the best-ranked pair is the one whose
        # merged id is smallest: (left_id << 16 | right_id) -> merged id says both at once.
        self._byte_ids = bytes(self.encoder[self.byte_encoder[byte]] for byte in range(256))
        self._merges = {self.encoder[a] << 16 | self.encoder[b]: self.encoder[a + b]
                        for a, b in merges}
        # In OpenAI's file every word-final entry ("cat</w>") is what BPE makes of its word (the
        # tests check all 34,337), so such words start in the cache; other files merge them.
        is_openai = hashlib.sha256(raw).hexdigest() == OPENAI_VOCAB_SHA256
        self._whole_words = self.encoder if is_openai else {}
        self._batch_merger = BatchMerger(self._merges, self._byte_ids, self.vocab_size)
        self.cache_size = cache_size
        # piece of cleaned text -> its ids; always holds the vocabulary's whole words
        self._whole_word_pieces = self._pieces_of_whole_words()
        self._cache: dict[str, bytes] = dict(self._whole_word_pieces)

    def _pieces_of_whole_words(self) -> dict[str, bytes]:
        """The words that are one vocabulary entry, as pieces of text, with their id as cache
        values: ``{"cat": id_bytes([2368]), ...}``.

        In the cache from the start, so the commonest words never reach BPE; only words that
        the regex keeps whole (``"a1</w>"`` is an entry, but the text "a1" is two words).
        """
        to_latin1 = {ord(char): byte for char, byte in self.byte_decoder.items()}
        pieces = {}
        for symbol, index in self._whole_words.items():
            if index < 512 or not symbol.endswith("</w>"):
                continue  # single bytes are cheap anyway
            try:
                word = symbol[:-4].translate(to_latin1).encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:  # no text's word has these bytes
                continue
            if word.isascii() and word.isalpha() or WORD_PATTERN.findall(word) == [word]:
                pieces[word] = id_bytes([index])
        return pieces

    def _merge(self, data: bytes) -> list[int]:
        """BPE ids of a word's UTF-8 bytes, one merge at a time."""
        return self._batch_merger.merge_word(data)

    def _add_words(self, words: set[str]) -> None:
        """Cache the ids of new words, merged in one batch. The cache always holds the words that
        are one vocabulary entry, so a new word is a special token or needs BPE (merging would
        give the same single id anyway: the tests check every entry)."""
        cache = self._cache
        cache.update((word, id_bytes([self.encoder[word]])) for word in words & _SPECIAL_TOKENS)
        words = list(words - _SPECIAL_TOKENS)
        cache.update(zip(words, self._batch_merger([word.encode("utf-8") for word in words])))

    def _add_pieces(self, pieces: set[str]) -> None:
        """Cache the ids of new space-free pieces of cleaned text.

        No regex match crosses a space, so a text's ids are its pieces' ids in a row; and each
        regex word is a piece whose only match is itself, so words share the same cache.
        """
        cache = self._cache
        # A piece of letters is one word (str.isalpha is the regex's \p{L}: Unicode categories
        # L*). In non-ASCII pieces, so are letters between ASCII punctuation ("(pavão),"): the
        # regex makes the punctuation before, the letters and the punctuation after three words
        # (no "'", which may start a contraction, and no "<|", which may start a special token).
        # ASCII pieces are split faster by the stdlib's re.
        split = [piece for piece in pieces if not piece.isalpha()]
        ascii_split, other_split, edged = [], [], []
        for piece in split:
            if piece.isascii():
                ascii_split.append(piece)
                continue
            inner = piece.lstrip(_EDGE_PUNCTUATION)
            letters = inner.rstrip(_EDGE_PUNCTUATION)
            if letters.isalpha() and "<|" not in piece:
                edged.append((piece, piece[:len(piece) - len(inner)], letters, inner[len(letters):]))
            else:
                other_split.append(piece)
        # The others are split by one regex call over all of them, joined by newlines that the
        # pattern returns as separators (every piece has a word, and no word a newline).
        found_ascii = _SPLIT_PATTERN_ASCII.findall("\n".join(ascii_split)) if ascii_split else []
        found_other = _SPLIT_PATTERN.findall("\n".join(other_split)) if other_split else []
        new_words = pieces.difference(split)  # the one-word pieces
        new_words.update(found_ascii, found_other)
        for _, before, letters, after in edged:
            new_words.update((before, letters, after))
        new_words.difference_update(("\n", ""))
        self._add_words(new_words.difference(cache))
        get = cache.__getitem__
        cache[""] = b""  # no punctuation on that side
        cache.update((piece, get(before) + get(letters) + get(after)) for piece, before, letters, after in edged)
        # Each split piece's ids: its words' ids joined, all pieces at once, the newlines
        # becoming a separator that no id makes (ids are < 0xC100, so 0xFF is never a high byte)
        cache["\n"] = SEPARATOR
        for some_pieces, found in ((ascii_split, found_ascii), (other_split, found_other)):
            if some_pieces:
                cache.update(zip(some_pieces, b"".join(map(get, found)).split(SEPARATOR)))

    def _text_ids(self, texts: Sequence[str], max_tokens: int | None = None) -> list[bytes]:
        """Each text's ids as 16-bit bytes (:func:`~clipforge.tokenizer._batch_merge.id_bytes`). New pieces
        and words are split and merged once per batch, however often they occur.

        With ``max_tokens``, a text's ids may stop after its first ``max_tokens`` ids (they are
        exact): every piece of text makes at least one id, so the first ``max_tokens`` pieces
        are enough, and the later ones are neither split nor merged unless already cached; a
        text whose first pieces make fewer ids is done again in full.
        """
        # Text that ftfy and html.unescape leave as it is only needs lower() and split(): printable
        # ASCII without '&' (checked inline: a call per text costs as much as the cleaning), what
        # ftfy_is_identity accepts (it excludes '&'), or ASCII whose '&'s start no entity. The
        # rest goes to fixed_pieces, which does not repeat these checks.
        pieces = [text.lower().split() if text.isascii() and text.isprintable() and "&" not in text
                  or ftfy_is_identity(text) or not needs_ftfy(text) else fixed_pieces(text)
                  for text in texts]
        get = self._cache.__getitem__
        try:
            return [b"".join(map(get, text_pieces)) for text_pieces in pieces]
        except KeyError:  # new pieces
            pass
        if max_tokens is not None and max(map(len, pieces)) > max_tokens:
            cut = [i for i, text_pieces in enumerate(pieces) if len(text_pieces) > max_tokens]
            text_ids = self._new_piece_ids([text_pieces[:max_tokens] for text_pieces in pieces])
            short = [i for i in cut if len(text_ids[i]) < 2 * max_tokens]  # a piece made no id
            for i, ids in zip(short, self._new_piece_ids([pieces[i] for i in short])):
                text_ids[i] = ids
            return text_ids
        return self._new_piece_ids(pieces)

    def _new_piece_ids(self, pieces: list[list[str]]) -> list[bytes]:
        """Each text's ids, from its cleaned space-free pieces, some of them not cached yet."""
        cache = self._cache
        get = cache.__getitem__
        new = set(chain.from_iterable(pieces)).difference(cache)
        if len(cache) - len(self._whole_word_pieces) + len(new) > self.cache_size:
            self._reset_cache()  # bounded memory; this batch's pieces are added back below
            new = set(chain.from_iterable(pieces)).difference(cache)
        self._add_pieces(new)
        text_ids = [b"".join(map(get, text_pieces)) for text_pieces in pieces]
        if len(cache) - len(self._whole_word_pieces) > self.cache_size:
            self._reset_cache()  # one batch alone held more than the cache
        return text_ids

    def _reset_cache(self) -> None:
        """Forget every piece but the vocabulary's whole words."""
        self._cache.clear()
        self._cache.update(self._whole_word_pieces)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each text, without start/end tokens."""
        return [memoryview(ids).cast("H").tolist() for ids in self._text_ids(texts)]

    def encode(self, text: str) -> list[int]:
        """Return the BPE ids of ``text`` without start/end tokens."""
        return self.encode_batch([text])[0]

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
        elif not isinstance(texts, (list, tuple)):
            if isinstance(texts, (bytes, bytearray, memoryview, Mapping)) \
                    or not isinstance(texts, Iterable):
                raise TypeError("texts must be a string or a list of strings, got "
                                f"{type(texts).__name__}")
            texts = list(texts)  # a generator, a numpy array of strings, ...
        if isinstance(context_length, bool) or not isinstance(context_length, int) \
                or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for the start and end "
                             f"tokens), got {context_length!r}")
        if len(texts) > 1 and not all(isinstance(text, str) for text in texts) or \
                len(texts) == 1 and not isinstance(texts[0], str):
            index, text = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__} (texts is "
                            "a string or a list of strings)")
        # truncated rows need only their first ids: the pieces after them are never merged
        text_ids = self._text_ids(texts, context_length - 2 if truncate else None)
        room = 2 * (context_length - 2)  # bytes of ids that fit between start and end
        if text_ids and max(map(len, text_ids)) > room:
            index = next(i for i, ids in enumerate(text_ids) if len(ids) > room)
            if not truncate:
                text = texts[index]
                prefix = text if len(text) <= 40 else text[:40] + "..."
                raise ValueError(
                    f"texts[{index}] ({prefix!r}) has {len(text_ids[index]) // 2 + 2} tokens with "
                    f"start and end, more than context_length={context_length}; shorten it or "
                    "pass truncate=True (a model's own length: context_length=model.context_length)")
            text_ids = [ids[:room] for ids in text_ids]  # sot + the first L - 2 ids + eot: OpenAI's cut
        # Each row as 16-bit bytes, all rows one bytes.join, widened to int64 by numpy at once.
        sot, eot, zeros = self._sot_bytes, self._eot_bytes, _zero_bytes(room)
        rows = b"".join([sot + ids + eot + zeros[len(ids):] for ids in text_ids])
        tokens = np.ndarray((len(text_ids), context_length), np.uint16, rows)  # (N, L)
        return torch.from_numpy(tokens.astype(np.int64))


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
