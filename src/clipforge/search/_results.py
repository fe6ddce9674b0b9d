"""Turn FAISS hits into responses: near-duplicate folding and JSON-safe metadata values."""
from __future__ import annotations

import math

import numpy as np

# clip-retrieval's rule: results whose embeddings have cosine >= 0.94 are one image shown once.
DUPLICATE_COSINE = 0.94


def duplicate_groups(embeddings: np.ndarray, threshold: float = DUPLICATE_COSINE) -> list[list[int]]:
    """Positions of ``embeddings`` ``(k, dim)`` grouped into connected components of cosine >= threshold.

    Each group lists its positions in increasing order, so its first member is the best-ranked
    result; groups are ordered by that first member.
    """
    count = len(embeddings)
    if count == 0:
        return []
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms == 0, 1, norms)
    close = (unit @ unit.T) >= threshold  # (k, k)
    parent = list(range(count))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for i, j in zip(*np.nonzero(np.triu(close, 1))):
        root_i, root_j = find(int(i)), find(int(j))
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)  # the better-ranked one stays the root
    groups: dict[int, list[int]] = {}
    for position in range(count):
        groups.setdefault(find(position), []).append(position)
    return [groups[root] for root in sorted(groups)]


def jsonable(value):
    """``value`` with bytes decoded, numpy scalars unwrapped and NaN/inf turned into None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # timestamps, decimals: their text form
