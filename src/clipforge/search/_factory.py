"""Which FAISS index a collection gets, from its size and a memory budget, as FAISS's guidelines advise.

https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index, in order:

1. ``Flat`` (exact) for small collections: up to :data:`FLAT_MAX_COUNT` vectors a scan takes a few
   milliseconds and needs no training.
2. ``HNSW32`` while it fits the budget (vectors plus a 32-neighbour graph) and the collection is at
   most :data:`HNSW_MAX_COUNT`: the fastest queries, no training, but slow to build beyond that.
3. ``IVF{K},Flat`` with K the power of two in 4-8 sqrt(N) (the low end of the guidelines' 4-16
   sqrt(N), which keeps training and filling quick on CPUs), while the raw vectors fit.
4. ``OPQ{m}_{d},IVF{K},PQ{m}`` when they do not: m bytes per vector, the largest m in 64, 32, 16, 8
   whose codes fit, rotated to d = 4m dimensions (at least 2 per sub-quantizer). PQ codes lose precision, so recall@10 may stay under the target; the build
   reports what it reached.

Sizes are estimates of the index in memory; the builder adds its stated working overhead (the
training sample and one batch of float32 vectors) to check the budget.
"""
from __future__ import annotations

import math
import re

FLAT_MAX_COUNT = 20_000
HNSW_MAX_COUNT = 500_000
HNSW_NEIGHBOURS = 32
PQ_BYTES = (64, 32, 16, 8)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(value: "str | int | float") -> int:
    """Bytes from ``4GiB``, ``512MiB``, ``8GB``, ``2e9`` or a number of bytes; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"memory must be a size such as 4GiB, 512MiB or 8GB, got {value!r}")
        amount, unit = float(match.group(1)), match.group(2)
    size = int(amount * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory must be positive, got {value!r}")
    return size


def ivf_lists(count: int) -> int:
    """IVF list count: the smallest power of two >= 4 sqrt(N) (so 4-8 sqrt(N)), lowered to a power of
    two that leaves FAISS's minimum of 39 training points per list."""
    lists = 2 ** math.ceil(math.log2(max(4 * math.sqrt(count), 1)))
    most = 2 ** int(math.log2(max(count // 39, 1)))
    return int(min(lists, most))


def estimate_bytes(factory: str, count: int, dim: int) -> int:
    """Approximate memory of a filled index built from ``factory`` (the kinds chosen here)."""
    ids = 8 * count  # IVF lists store int64 ids
    match = re.match(r"(?:OPQ(\d+)_(\d+),)?IVF(\d+),(Flat|PQ(\d+))$", factory)
    if factory == "Flat":
        return 4 * dim * count
    if factory.startswith("HNSW"):
        neighbours = int(factory[4:] or HNSW_NEIGHBOURS)
        return count * (4 * dim + 2 * neighbours * 4 * 9 // 8 + 16)  # level 0 has 2M links; upper levels ~1/8 more
    if match:
        lists = int(match.group(3))
        rotated = int(match.group(2) or dim)
        codes = 4 * dim if match.group(4) == "Flat" else int(match.group(5))
        pq_tables = 0 if match.group(4) == "Flat" else 256 * rotated * 4
        # Inverted lists grow like std::vector (capacity doubles), so filled lists hold ~1.5x their
        # bytes: measured 3.07 GiB above the process baseline for 1M x 512 IVF1024,Flat (2 GiB of vectors).
        return (count * codes + ids) * 3 // 2 + lists * rotated * 4 + pq_tables + 4 * dim * rotated
    raise ValueError(f"cannot estimate the memory of factory {factory!r}")


def choose_factory(count: int, dim: int, memory_budget: int, overhead: int = 0) -> tuple[str, str]:
    """``(factory string, why)`` for ``count`` vectors of ``dim`` under ``memory_budget`` bytes.

    ``overhead`` is the builder's working memory on top of the index (sample, batch). Raises
    ValueError when not even the smallest PQ index fits.
    """
    room = memory_budget - overhead
    if count <= FLAT_MAX_COUNT and estimate_bytes("Flat", count, dim) <= room:
        return "Flat", f"{count} vectors <= {FLAT_MAX_COUNT}: exact search"
    hnsw = f"HNSW{HNSW_NEIGHBOURS}"
    if count <= HNSW_MAX_COUNT and estimate_bytes(hnsw, count, dim) <= room:
        return hnsw, f"{count} vectors <= {HNSW_MAX_COUNT} and the graph fits the budget"
    lists = ivf_lists(count)
    ivf = f"IVF{lists},Flat"
    if estimate_bytes(ivf, count, dim) <= room:
        return ivf, f"{count} vectors: inverted lists near 4 sqrt(N), raw vectors fit the budget"
    for code_bytes in PQ_BYTES:
        rotated = min(dim, 4 * code_bytes)  # FAISS's advice: 4 dimensions per sub-quantizer
        rotated -= rotated % code_bytes
        factory = f"OPQ{code_bytes}_{rotated},IVF{lists},PQ{code_bytes}"
        if rotated >= 2 * code_bytes and estimate_bytes(factory, count, dim) <= room:
            return factory, f"raw vectors exceed the budget: {code_bytes}-byte OPQ+PQ codes"
    need = estimate_bytes(f"OPQ8_32,IVF{lists},PQ8", count, dim) + overhead
    raise ValueError(f"memory budget {memory_budget} bytes is too small for {count} vectors of dim {dim}: "
                     f"even 8-byte PQ codes need about {need} bytes; raise --memory")
