"""Byte-level BPE on many words at once, in numpy: the same ids as the one-word merge loop.

A batch of words is a padded matrix of ids, one row a word; each round merges, in every row at
once, the leftmost occurrence of that row's best-ranked pair. Rows whose pairs are no merge are
finished and leave the matrix. Per round the work is a few numpy calls over the matrix, so a
batch of thousands of new words costs about as much as a few dozen words merged one by one.
Words are grouped by length so that short words don't pay for the width of long ones.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import numpy as np

PAD = 0xFFFF  # not an id (ids are < 49,408), so no pair with it is a merge
LENGTH_GROUPS = (6, 12, 24, 48)  # upper bounds, in bytes, of the groups
# A round costs ~0.2 ms whatever the group's size; groups smaller than this (measured crossover)
# are merged one word at a time instead.
MIN_GROUP_WORDS = 256
HASH_SLOTS = 1 << 18  # power of two, ~5x the number of merges
EMPTY = -1  # no key: keys are >= 0


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
        merge_one: the one-word merge loop (bytes -> ids), for groups too small for numpy.
    """

    def __init__(self, merges: dict[int, int], byte_ids: bytes, no_merge: int,
                 merge_one: Callable[[bytes], list[int]]):
        keys = np.fromiter(merges.keys(), dtype=np.int64, count=len(merges))
        values = np.fromiter(merges.values(), dtype=np.int64, count=len(merges))
        # Open-addressing hash table (linear probing, load ~0.2): one or two probes per lookup,
        # where a binary search of the 48,894 keys costs sixteen scattered reads.
        self.table_keys = np.full(HASH_SLOTS, EMPTY, dtype=np.int64)
        self.table_values = np.full(HASH_SLOTS, no_merge, dtype=np.int64)
        slots = _hash(keys)
        while len(keys):
            free = self.table_keys[slots] == EMPTY
            # of the keys that want the same free slot, the first takes it; the rest probe on
            _, first = np.unique(np.where(free, slots, -1), return_index=True)
            first = first[free[first]]
            self.table_keys[slots[first]] = keys[first]
            self.table_values[slots[first]] = values[first]
            rest = np.ones(len(keys), dtype=bool)
            rest[first] = False
            keys, values, slots = keys[rest], values[rest], (slots[rest] + 1) & (HASH_SLOTS - 1)
        self.byte_ids = np.frombuffer(byte_ids, dtype=np.uint8).astype(np.int64)
        self.no_merge = no_merge
        self.merge_one = merge_one

    def _merged(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Merged id of each pair ``(left[i], right[i])``, or ``no_merge`` where none."""
        key = (left << 16 | right).ravel()
        slots = _hash(key)
        stored = self.table_keys[slots]
        merged = np.where(stored == key, self.table_values[slots], self.no_merge)
        probing = np.flatnonzero((stored != key) & (stored != EMPTY))  # neither found nor absent
        slots, key = slots[probing], key[probing]
        while len(probing):  # linear probing, on the few keys that need it
            slots = (slots + 1) & (HASH_SLOTS - 1)
            stored = self.table_keys[slots]
            found = stored == key
            merged[probing[found]] = self.table_values[slots[found]]
            more = ~found & (stored != EMPTY)
            probing, slots, key = probing[more], slots[more], key[more]
        return merged.reshape(left.shape)

    def __call__(self, words: list[bytes]) -> list[list[int]]:
        """BPE ids of each word's UTF-8 bytes; the last byte of each word ends it (``</w>``)."""
        out: list[list[int]] = [[] for _ in words]
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        order = np.argsort(lengths, kind="stable")
        low = 0
        for high in (*LENGTH_GROUPS, int(lengths.max(initial=0))):
            group = order[(lengths[order] > low) & (lengths[order] <= high)]
            low = max(low, high)
            group_words = [words[i] for i in group.tolist()]
            merged = self._merge(group_words) if len(group) >= MIN_GROUP_WORDS else \
                map(self.merge_one, group_words)
            for index, ids in zip(group.tolist(), merged):
                out[index] = ids
        return out

    def _merge(self, words: list[bytes]) -> list[list[int]]:
        """BPE of words of similar length (all non-empty)."""
        count, width = len(words), max(map(len, words))
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=count)
        columns = np.arange(width)
        inside = columns < lengths[:, None]  # (count, width)
        ids = np.full((count, width), PAD, dtype=np.int64)
        ids[inside] = self.byte_ids[np.frombuffer(b"".join(words), dtype=np.uint8)]
        ids[np.arange(count), lengths - 1] += 256  # the last byte ends the word: id + 256
        finished = np.empty_like(ids)  # rows in the caller's order once done
        rows = np.arange(count)  # which word each row of ids holds
        ranks = self._merged(ids[:, :-1], ids[:, 1:])  # (count, width - 1): pair j is j, j+1
        while len(rows):
            if ranks.shape[1] == 0:  # one id left in every row
                finished[rows, :1] = ids
                break
            at = ranks.argmin(axis=1)  # leftmost best pair of each row
            here = np.arange(len(rows))
            best = ranks[here, at]
            done = best == self.no_merge
            if done.any():
                finished[rows[done], :ids.shape[1]] = ids[done]
                if done.all():
                    break
                keep = ~done
                rows, at, best = rows[keep], at[keep], best[keep]
                width = int(lengths[rows].max())  # drop columns that are padding in every row
                ids, ranks = ids[keep, :width], ranks[keep, :width - 1]
                here = np.arange(len(rows))
            lengths[rows] -= 1
            # merge pair `at`: ids[at] becomes best, ids after at + 1 move one left
            ids[here, at] = best
            width = ids.shape[1]
            shift = columns[:width - 1] + (columns[:width - 1] > at[:, None])  # (rows, width - 1)
            ids = ids[here[:, None], shift]  # the last column (now padding) is dropped
            # pairs after `at` move one left; pairs at - 1 and at are new
            ranks = ranks[here[:, None], np.minimum(shift[:, :-1], width - 2)]  # (rows, width - 2)
            if ranks.shape[1] == 0:
                continue
            # one lookup for both new pairs: (ids[at - 1], best) and (best, ids[at + 1])
            left = np.maximum(at - 1, 0)
            right = np.minimum(at + 1, width - 2)
            new = self._merged(np.concatenate([ids[here, left], best]),
                               np.concatenate([best, ids[here, right]]))
            count = len(here)
            has_left, has_right = at > 0, at < width - 2  # the pair exists in the new row
            ranks[here[has_left], at[has_left] - 1] = new[:count][has_left]
            ranks[here[has_right], at[has_right]] = new[count:][has_right]
        kept = finished[np.arange(finished.shape[1]) < lengths[:, None]].tolist()  # row-major
        each = iter(kept)
        return [list(islice(each, n)) for n in lengths.tolist()]
