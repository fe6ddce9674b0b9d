"""Byte-level BPE on many words at once, in numpy: the same ids as the one-word merge loop.

The words of a batch lie end to end in one flat array of ids, with the rank of each adjacent
pair beside it (pairs across a word's end are no merge). Each round merges, in every word at
once, the leftmost occurrence of that word's best-ranked pair: a few numpy calls over the array,
whatever the number of words. Words with nothing left to merge leave the array; when only a
few remain, the one-word loop (:func:`merge_ids`) finishes them, as rounds on a handful of
words cost more than the loop. Words longer than ``LONG_WORD_BYTES`` never enter the array:
they go to :mod:`clipforge.tokenizer._long_merge`, whose merge is O(n log n) where the loop
and the rounds here are quadratic in the length of a word.
"""
from __future__ import annotations

from array import array

import numpy as np

from ._long_merge import LONG_WORD_BYTES, ROUNDS_WORD_BYTES, merge_ids_heap, merge_ids_rounds

# A round costs ~0.1 ms whatever the number of words, so batches of fewer new words than
# MIN_BATCH_WORDS use the one-word loop, and so do the last TAIL_WORDS words left in a batch
# (measured crossovers on real captions).
MIN_BATCH_WORDS = 200
TAIL_WORDS = 48
POSITION_BITS = 32  # a pair's position in its word, below its rank in one int64
HASH_SLOTS = 1 << 18  # power of two, ~5x the number of merges
EMPTY = -1  # no key: keys are >= 0
# 0xFFFF as a 16-bit id: no id (all < 0xC100) holds the byte 0xFF in its high half, so the two
# bytes never occur in a run of ids and mark where one word's ids end
SEPARATOR_ID = 0xFFFF
SEPARATOR = b"\xff\xff"  # SEPARATOR_ID as id_bytes gives it


def id_bytes(ids: list[int]) -> bytes:
    """Ids as native-order unsigned 16-bit integers (ids are < 49,408): the tokenizer cache's
    values, so that a text's ids are one ``bytes.join`` and numpy reads them as they are."""
    return array("H", ids).tobytes()


def merge_ids(ids: list[int], merges: dict[int, int], no_merge: int) -> list[int]:
    """Finish BPE on one word's ids in place, and return them.

    OpenAI's rule: find the best-ranked adjacent pair, merge all its occurrences left to right,
    repeat until no adjacent pair is a merge. Merging the leftmost occurrence at a time is the
    same: a merged id is larger than its parts, so the pairs a merge creates rank after it and
    the same pair stays best until its last occurrence is merged. ``merges`` maps
    ``left << 16 | right`` to the merged id, which is also the merge's rank.
    """
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


def _with_separators(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Words' ids end to end (``lengths`` each) with ``SEPARATOR_ID`` after each, as uint16."""
    out = np.full(len(ids) + len(lengths), SEPARATOR_ID, dtype=np.uint16)
    word = np.repeat(np.arange(len(lengths)), lengths)  # (E,) the word of each id
    out[np.arange(len(ids)) + word] = ids  # each id moves right by one per earlier word
    return out


def _hash(keys: np.ndarray) -> np.ndarray:
    """Fibonacci hashing of keys < 2**32 to slots in [0, HASH_SLOTS)."""
    return ((keys * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - HASH_SLOTS.bit_length() + 1)


class BatchMerger:
    """Merges many words with one table of merges.

    Args:
        merges: ``left_id << 16 | right_id`` -> merged id; the smaller the merged id, the
            higher the merge's rank.
        byte_ids: the id of each byte value (256 bytes, each < 256).
        no_merge: an id larger than every merged id.
    """

    def __init__(self, merges: dict[int, int], byte_ids: bytes, no_merge: int):
        self.merges, self.no_merge, self.byte_table = merges, no_merge, byte_ids
        self.byte_ids = np.frombuffer(byte_ids, dtype=np.uint8).astype(np.int64)
        keys = np.fromiter(merges.keys(), dtype=np.int64, count=len(merges))
        values = np.fromiter(merges.values(), dtype=np.int64, count=len(merges))
        # Words start as byte ids (< 512 with </w>): their first pairs are read from a dense
        # 512 x 512 table, left << 9 | right, in one gather.
        left, right = keys >> 16, keys & 0xFFFF
        of_bytes = (left < 512) & (right < 512)
        self.byte_pairs = np.full(512 * 512, no_merge, dtype=np.int64)
        self.byte_pairs[left[of_bytes] << 9 | right[of_bytes]] = values[of_bytes]
        # Open-addressing hash table (linear probing, load ~0.2): one or two probes per lookup,
        # where a binary search of the 48,894 keys costs sixteen scattered reads. Each slot
        # holds key << 16 | merged id, so one read gives both.
        self.table = np.full(HASH_SLOTS, EMPTY, dtype=np.int64)
        entries = keys << 16 | values
        slots = _hash(keys)
        while len(keys):
            free = self.table[slots] == EMPTY
            # of the keys that want the same free slot, the first takes it; the rest probe on
            _, first = np.unique(np.where(free, slots, -1), return_index=True)
            first = first[free[first]]
            self.table[slots[first]] = entries[first]
            rest = np.ones(len(keys), dtype=bool)
            rest[first] = False
            keys, entries, slots = keys[rest], entries[rest], (slots[rest] + 1) & (HASH_SLOTS - 1)

    def _merged(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Merged id of each pair ``(left[i], right[i])``, or ``no_merge`` where none."""
        key = left << 16 | right
        slots = _hash(key)
        stored = self.table[slots]
        found = stored >> 16 == key
        merged = np.where(found, stored & 0xFFFF, self.no_merge)
        probing = np.flatnonzero(~found & (stored != EMPTY))  # neither found nor absent
        slots, key = slots[probing], key[probing]
        while len(probing):  # linear probing, on the few keys that need it
            slots = (slots + 1) & (HASH_SLOTS - 1)
            stored = self.table[slots]
            found = stored >> 16 == key
            merged[probing[found]] = stored[found] & 0xFFFF
            more = ~found & (stored != EMPTY)
            probing, slots, key = probing[more], slots[more], key[more]
        return merged

    def __call__(self, words: list[bytes]) -> list[bytes]:
        """BPE ids of each word's UTF-8 bytes (non-empty; the last byte ends the word: ``</w>``,
        id + 256), as native 16-bit unsigned integers (``memoryview(b).cast("H")`` reads them)."""
        if len(words) < MIN_BATCH_WORDS:
            return [id_bytes(self.merge_word(word)) for word in words]
        if max(map(len, words)) > LONG_WORD_BYTES:  # long words are merged one by one
            short = iter(self([word for word in words if len(word) <= LONG_WORD_BYTES]))
            return [id_bytes(self.merge_word(word)) if len(word) > LONG_WORD_BYTES else next(short)
                    for word in words]
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))  # (W,)
        ids = self.byte_ids[np.frombuffer(b"".join(words), dtype=np.uint8)]  # (E,) all words
        ends = np.cumsum(lengths)  # (W,) one past each word's last id
        ids[ends - 1] += 256  # the last byte ends the word
        # ranks[p]: the rank of pair (p, p + 1) in the high bits, shifted once so that one OR
        # with each position makes the key of a word's leftmost best pair
        ranks = np.full(len(ids), self.no_merge << POSITION_BITS, dtype=np.int64)  # (E,)
        ranks[:-1] = self.byte_pairs[ids[:-1] << 9 | ids[1:]] << POSITION_BITS
        ranks[ends - 1] = self.no_merge << POSITION_BITS  # no pair across a word's end
        rows = np.arange(len(words))  # which word each segment holds
        finished_rows, finished_ids = [], []  # per round: the words done, their ids + separators
        while True:
            starts = ends - lengths  # (W,)
            # each word's best rank and the leftmost position holding it, in one reduction
            least = np.minimum.reduceat(ranks | np.arange(len(ids)), starts)  # (W,)
            best = least >> POSITION_BITS
            at = (least & (1 << POSITION_BITS) - 1) - starts  # position within the word
            done = best == self.no_merge
            if done.any():  # finished words leave the arrays
                kept = np.repeat(~done, lengths)  # (E,)
                finished_rows.append(rows[done])
                finished_ids.append(_with_separators(ids[~kept], lengths[done]))
                ids, ranks = ids[kept], ranks[kept]
                rows, lengths, best, at = rows[~done], lengths[~done], best[~done], at[~done]
                ends = np.cumsum(lengths)
                starts = ends - lengths
            if len(rows) < TAIL_WORDS:  # a few words left: the loop is faster
                return self._collect(len(words), finished_rows, finished_ids, rows, ids, starts, ends)
            at += starts  # global index of each word's merged pair
            ids[at] = best
            # drop the merged pair's right id: everything after moves left by one per earlier
            # word, so the merged id of word w ends up at at[w] - w
            kept = np.ones(len(ids), dtype=bool)
            kept[at + 1] = False
            ids, ranks = ids[kept], ranks[kept]
            lengths = lengths - 1
            ends = np.cumsum(lengths)
            at = at - np.arange(len(rows))
            # the two pairs around the merged id are new: (ids[at - 1], best), (best, ids[at + 1])
            has_left = at > ends - lengths  # not the word's first id
            has_right = at < ends - 1  # not the word's last id
            left = np.where(has_left, at - 1, at)
            right = np.where(has_right, at + 1, at)
            new = self._merged(np.concatenate([ids[left], best]),
                               np.concatenate([best, ids[right]])) << POSITION_BITS
            count = len(rows)
            ranks[left] = np.where(has_left, new[:count], ranks[left])
            ranks[at] = np.where(has_right, new[count:], self.no_merge << POSITION_BITS)

    def _collect(self, count: int, finished_rows: list, finished_ids: list, rows: np.ndarray,
                 ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
        """Every word's ids in input order: the finished ones cut from one buffer by one
        ``bytes.split``, the few left (``rows``) finished by the one-word loop."""
        order = np.concatenate(finished_rows) if finished_rows else np.zeros(0, np.int64)
        parts = b"".join(part.tobytes() for part in finished_ids).split(SEPARATOR)[:-1]
        for start, end in zip(starts.tolist(), ends.tolist()):
            parts.append(id_bytes(merge_ids(ids[start:end].tolist(), self.merges, self.no_merge)))
        order = np.concatenate([order, rows])  # (W,) the word of each part
        position = np.empty(count, dtype=np.int64)
        position[order] = np.arange(count)  # where each word's part is
        return list(map(parts.__getitem__, position.tolist()))

    def merge_word(self, word: bytes) -> list[int]:
        """BPE ids of one word's UTF-8 bytes (non-empty): by the one-word loop, or for a word
        longer than ``LONG_WORD_BYTES`` by the heap, after numpy rounds if it is very long."""
        ids = list(word.translate(self.byte_table))  # byte ids are 0..255
        ids[-1] += 256  # the same byte with </w>
        if len(ids) <= LONG_WORD_BYTES:
            return merge_ids(ids, self.merges, self.no_merge)
        if len(ids) >= ROUNDS_WORD_BYTES:
            ids = merge_ids_rounds(np.array(ids, dtype=np.int64), self._merged, self.no_merge).tolist()
        return merge_ids_heap(ids, self.merges)
