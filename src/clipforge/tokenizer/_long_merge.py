"""BPE of one long word in O(n log n): the same ids as the one-word loop, for any length.

The one-word loop (:func:`~clipforge.tokenizer._batch_merge.merge_ids`) looks for the best pair
with ``min`` over the whole word at every merge, which is quadratic: 32,000 ``x`` took 5 s and a
1 MB run without spaces hours. Here the word is a linked list of symbols and the candidate pairs
sit in a heap keyed by ``(rank, position)``, where a position is the index of the pair's left
symbol in the original word. Popping the heap gives the best-ranked pair, and among pairs of
that rank the leftmost one (the list keeps the original order), which is exactly what the loop
merges next. A merge changes only the two pairs around it: they are pushed anew, and the stale
entries they replace are skipped when popped (lazy invalidation: an entry is stale when its left
symbol is gone or its pair no longer has that rank).

Very long words (hostile input: 1 MB without a space) first go through rounds in numpy, each
merging every occurrence of the word's best-ranked pair at once, leftmost first where they
overlap ("aaa" merges as "aa", "a"): that is one step of OpenAI's own loop, so the word after
each round is the word that loop holds at that point, and the heap carries on from it. Rounds
stop once SPARSE_ROUNDS of them have merged less than 1/ROUND_MIN_FRACTION of the word each, so
they cost at most a fixed multiple of the word's length (the dense ones shrink it by a fixed
fraction), and the heap does the long tail of rare pairs.
"""
from __future__ import annotations

from collections.abc import Callable
from heapq import heapify, heappop, heappush

import numpy as np

# Words up to this many bytes keep the one-word loop: below it the loop's C-level ``min`` beats
# the heap's Python bookkeeping (measured on runs of letters and emoji).
LONG_WORD_BYTES = 128
# Words from this many bytes start with numpy rounds
ROUNDS_WORD_BYTES = 4096
ROUND_MIN_FRACTION = 64
SPARSE_ROUNDS = 16  # rounds that merge less than that, before the heap takes over


def merge_ids_heap(ids: list[int], merges: dict[int, int]) -> list[int]:
    """BPE of one word's ids (bytes, the last one with ``</w>``); returns the merged ids.

    ``merges`` maps ``left << 16 | right`` to the merged id, which is also the merge's rank
    (smaller is better). Heap entries are ``rank << 32 | position``: one int compares faster
    than a tuple, and orders the same.
    """
    count = len(ids)
    symbols = list(ids)  # symbols[i]: the symbol starting at original position i; -1 once merged away
    following = list(range(1, count + 1))  # the next live position; count means none
    preceding = list(range(-1, count - 1))  # the previous live position; -1 means none
    get = merges.get
    heap = [rank << 32 | i for i, rank in enumerate(map(get, (a << 16 | b for a, b in zip(ids, ids[1:]))))
            if rank is not None]
    heapify(heap)
    low = (1 << 32) - 1
    while heap:
        entry = heappop(heap)
        rank, i = entry >> 32, entry & low
        left, j = symbols[i], following[i]
        if left < 0 or j == count or get(left << 16 | symbols[j]) != rank:
            continue  # stale: the pair at i was merged or changed since this entry was pushed
        symbols[i] = rank
        symbols[j] = -1
        after = following[j]
        following[i] = after
        if after < count:
            preceding[after] = i
            merged = get(rank << 16 | symbols[after])
            if merged is not None:
                heappush(heap, merged << 32 | i)
        before = preceding[i]
        if before >= 0:
            merged = get(symbols[before] << 16 | rank)
            if merged is not None:
                heappush(heap, merged << 32 | before)
    return [symbol for symbol in symbols if symbol >= 0]


def merge_ids_rounds(ids: np.ndarray, merged_ids: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     no_merge: int) -> np.ndarray:
    """Run OpenAI's merge rounds on one word's int64 ``ids`` until SPARSE_ROUNDS rounds have
    merged less than 1/ROUND_MIN_FRACTION of the word; return the ids reached (BPE may not be
    finished: the heap carries on from them).

    ``merged_ids(left, right)`` gives each pair's merged id (its rank), or ``no_merge``.
    """
    sparse_rounds = 0
    while len(ids) > 1:
        ranks = merged_ids(ids[:-1], ids[1:])  # (n - 1,) rank of pair (i, i + 1)
        best = ranks.min()
        if best == no_merge:
            break
        at = np.flatnonzero(ranks == best)  # every occurrence, left to right
        # Overlapping occurrences ("aaa": positions 0 and 1) come in chains of consecutive
        # positions; OpenAI's scan merges the first of a chain, skips one, merges the next...
        chain_start = np.ones(len(at), dtype=bool)
        chain_start[1:] = at[1:] != at[:-1] + 1
        first_of_chain = np.maximum.accumulate(np.where(chain_start, np.arange(len(at)), 0))
        at = at[(np.arange(len(at)) - first_of_chain) % 2 == 0]
        if len(at) * ROUND_MIN_FRACTION < len(ids):
            sparse_rounds += 1
            if sparse_rounds > SPARSE_ROUNDS:
                break  # few merges a round: the heap is cheaper from here
        ids[at] = best
        kept = np.ones(len(ids), dtype=bool)
        kept[at + 1] = False
        ids = ids[kept]
    return ids
