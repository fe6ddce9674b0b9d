"""FAISS indexes over an embedding folder: ``OUT/image.index`` and ``OUT/text.index`` with info JSON.

    from clipforge.search import build_index
    infos = build_index("photos-emb/", memory="4GiB")   # {"image": {...}, "text": {...}}

Inner product on the L2-normalised rows (cosine similarity); FAISS id ``i`` is row ``i`` of the
parts in order. For each modality present:

1. The factory follows the count and the memory budget (``_factory``), unless ``factory`` says.
2. Training (IVF, OPQ, PQ) uses a uniform sample of rows; then the index is filled part by part in
   batches of :data:`ADD_BATCH` rows read from memory-mapped files, so the vectors never sit in
   memory twice. The stated overhead on top of the index is that sample plus one float32 batch.
3. Search parameters (``nprobe`` or ``efSearch``) are raised until recall@10 against exact search
   reaches ``target_recall`` on held-out queries: sampled rows, each with itself excluded from both
   its exact and its approximate neighbours.
4. ``{modality}.index`` and ``{modality}.index.json`` are written under temporary names and moved
   into place, so a build killed at any point leaves the previous index usable.
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from . import _parts
from ._factory import choose_factory, estimate_bytes, ivf_lists, parse_memory

ADD_BATCH = 65536
QUERIES = 1000
RECALL_K = 10
MODALITIES = ("image", "text")


def require_faiss():
    """The ``faiss`` module (faiss-cpu or faiss-gpu), or an ImportError saying how to get it."""
    try:
        import faiss
    except ImportError:
        raise ImportError("indexing needs FAISS: pip install 'clipforge[search]' (faiss-cpu)") from None
    return faiss


class _Parts:
    """One modality's part files, memory-mapped one at a time: row ``i`` of the whole is FAISS id ``i``."""

    def __init__(self, out: Path, modality: str, manifest: dict):
        self.paths = [_parts.embedding_path(out, modality, entry["part"]) for entry in manifest["parts"]]
        missing = [path for path in self.paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: listed in {out}/manifest.json but missing")
        self.rows = [int(np.load(path, mmap_mode="r").shape[0]) for path in self.paths]
        self.starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)  # (P+1,)
        self.count, self.dim = int(self.starts[-1]), int(manifest["dim"])

    def batches(self, size: int = ADD_BATCH):
        """``(first_id, float32 (b, dim))`` batches in id order."""
        for path, start in zip(self.paths, self.starts):
            part = np.load(path, mmap_mode="r")
            for offset in range(0, part.shape[0], size):
                yield int(start) + offset, np.ascontiguousarray(part[offset:offset + size], dtype=np.float32)
            del part

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (sorted) as float32 ``(len(ids), dim)``."""
        taken = np.empty((len(ids), self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for part in np.unique(which):
            rows = ids[which == part] - self.starts[part]
            taken[which == part] = np.load(self.paths[part], mmap_mode="r")[rows]
        return taken


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def exact_neighbours(parts: _Parts, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``(Q, k)``: every query's exact top-k by inner product, scanning the parts."""
    faiss = require_faiss()
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for first, batch in parts.batches():
        scores, ids = faiss.knn(queries, batch, min(k, len(batch)), metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([best_scores, scores], axis=1)  # (Q, k + k')
        ids = np.concatenate([best_ids, ids + first], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return best_scores, best_ids


def _without_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids other than the query's own (-1 pads)."""
    kept = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, query_ids)):
        others = found[(found != own) & (found >= 0)][:k]
        kept[row, :len(others)] = others
    return kept


class RecallJudge:
    """recall@k of approximate neighbours against exact search on held-out queries, fair to ties.

    Each query is a sampled row with itself excluded from both lists. A found id counts when its
    true score reaches the exact k-th score: with duplicate images several ids are equally right.
    """

    def __init__(self, parts: _Parts, query_ids: np.ndarray, k: int):
        self.parts, self.query_ids, self.k = parts, query_ids, k
        self.queries = parts.take(query_ids)  # (Q, dim)
        scores, ids = exact_neighbours(parts, self.queries, k + 1)
        self.kth_score = np.take_along_axis(scores, np.argsort(ids == query_ids[:, None], axis=1, kind="stable"),
                                            1)[:, k - 1]  # (Q,) k-th best score among other rows

    def recall(self, found_ids: np.ndarray) -> float:
        """Mean share of hits among each query's top-k found ids (``(Q, >= k + 1)``, self included)."""
        found = _without_self(found_ids, self.query_ids, self.k)  # (Q, k)
        valid = found >= 0
        unique = np.unique(found[valid])
        vectors = self.parts.take(unique)
        rows = np.searchsorted(unique, np.where(valid, found, unique[0] if len(unique) else 0))
        true_scores = np.einsum("qd,qkd->qk", self.queries, vectors[rows]) if len(unique) else np.zeros(found.shape)
        hits = valid & (true_scores >= self.kth_score[:, None] - 1e-4)
        return float(hits.sum(axis=1).mean() / self.k)


def _candidate_params(index) -> list[str]:
    """Search-parameter strings from cheapest to most exact for the index's kind ([''] for Flat)."""
    faiss = require_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        steps = [2 ** i for i in range(int(np.log2(ivf.nlist)) + 1)]
        return [f"nprobe={n}" for n in steps + ([ivf.nlist] if steps[-1] != ivf.nlist else [])]
    if "HNSW" in type(index).__name__:
        return [f"efSearch={n}" for n in (16, 32, 64, 128, 256, 512, 1024)]
    return [""]


def tune(index, judge: RecallJudge, target: float) -> tuple[str, float]:
    """The cheapest search parameters reaching ``target`` recall@k, else the best; ``(params, recall)``."""
    faiss = require_faiss()
    space = faiss.ParameterSpace()
    best = ("", -1.0)
    for params in _candidate_params(index):
        if params:
            space.set_index_parameters(index, params)
        _, ids = index.search(judge.queries, judge.k + 1)
        recall = judge.recall(ids)
        if recall > best[1]:
            best = (params, recall)
        if recall >= target:
            return params, recall
    if best[0]:
        space.set_index_parameters(index, best[0])
    return best


def _sample_ids(rng: np.random.Generator, count: int, size: int, exclude: np.ndarray | None = None) -> np.ndarray:
    pool = np.setdiff1d(np.arange(count), exclude) if exclude is not None and count <= 10 * size else None
    if pool is not None:
        return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))
    return np.sort(rng.choice(count, size=min(size, count), replace=False))


def _train_size(factory: str, count: int) -> int:
    """Rows to train an index of ``factory`` on: 64 per IVF list (FAISS warns under 39), at least 10k
    (PQ and OPQ tables want thousands per centroid set)."""
    lists = re.search(r"IVF(\d+)", factory)
    return min(count, max(64 * int(lists.group(1)) if lists else 0, 10_000))


def build_modality_index(out: Path, modality: str, manifest: dict, memory_budget: int, factory: str | None = None,
                         target_recall: float = 0.95, seed: int = 0, progress: bool = True) -> dict:
    """Build, tune and atomically write ``OUT/{modality}.index`` and its info JSON; returns the info."""
    faiss = require_faiss()
    started, baseline = time.time(), _rss_bytes()
    parts = _Parts(out, modality, manifest)
    if parts.count == 0:
        raise ValueError(f"{out}: no {modality} embeddings to index (the collection has 0 rows)")
    rng = np.random.default_rng(seed)
    batch_bytes = min(ADD_BATCH, parts.count) * parts.dim * 4
    reason = "--factory"
    if factory is None:  # budget the largest sample any automatic choice trains on
        sample_bound = _train_size(f"IVF{ivf_lists(parts.count)},PQ", parts.count) * parts.dim * 4
        factory, reason = choose_factory(parts.count, parts.dim, memory_budget, batch_bytes + sample_bound)
    log = (lambda text: print(f"index {modality}: {text}", file=sys.stderr)) if progress else (lambda text: None)
    log(f"{parts.count} x {parts.dim}: {factory} ({reason})")
    index = faiss.index_factory(parts.dim, factory, faiss.METRIC_INNER_PRODUCT)
    train_rows = 0 if index.is_trained else _train_size(factory, parts.count)
    overhead = batch_bytes + train_rows * parts.dim * 4
    query_ids = _sample_ids(rng, parts.count, min(QUERIES, max(1, parts.count // 10)))
    if train_rows:
        train_ids = _sample_ids(rng, parts.count, train_rows, exclude=query_ids)
        log(f"training on {len(train_ids)} sampled rows")
        _cluster_on_gpus(index)
        index.train(parts.take(train_ids))
    for first, batch in parts.batches():
        index.add(batch)
        if parts.count > ADD_BATCH:
            log(f"added {first + len(batch)}/{parts.count}")
    k = min(RECALL_K, parts.count - 1)
    params, recall = tune(index, RecallJudge(parts, query_ids, k), target_recall) if k >= 1 else ("", 1.0)
    if recall < target_recall:
        print(f"warning: {modality} index {factory} reaches recall@{RECALL_K} {recall:.3f} at best, under the "
              f"target {target_recall}; pass a larger --memory or a --factory without PQ", file=sys.stderr)
    info = {"factory": factory, "metric": "inner_product", "count": int(index.ntotal), "dim": parts.dim,
            "search_params": params, f"recall_at_{RECALL_K}": round(recall, 4), "recall_queries": len(query_ids),
            "build_seconds": round(time.time() - started, 2), "memory_budget_bytes": int(memory_budget),
            "index_bytes_estimate": estimate_bytes(factory, parts.count, parts.dim) if reason != "--factory" else None,
            "overhead_bytes": int(overhead), "baseline_memory_bytes": int(baseline),
            "peak_memory_bytes": _peak_rss_bytes(), "model": manifest.get("model"), "reason": reason}
    _write_index(out, modality, index, info)
    log(f"recall@{RECALL_K} {recall:.3f} with {params or 'exact search'}, {info['build_seconds']} s")
    return info


def _cluster_on_gpus(index) -> None:
    """With GPU FAISS and a GPU, run the IVF k-means assignment there (FAISS's own recipe); the index
    itself stays on the CPU. A no-op with faiss-cpu."""
    faiss = require_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))


def _write_index(out: Path, modality: str, index, info: dict) -> None:
    """The index then its info JSON, each through a temporary file beside it and ``os.replace``."""
    faiss = require_faiss()
    target = out / f"{modality}.index"
    for stale in out.glob(f".{modality}.index.*.tmp"):  # left by a killed build
        stale.unlink(missing_ok=True)
    partial = out / f".{modality}.index.{os.getpid()}.tmp"
    faiss.write_index(index, str(partial))
    os.replace(partial, target)
    _parts.write_json(out / f"{modality}.index.json", info)


def build_index(out: str | os.PathLike, memory: "str | int" = "4GiB", factory: str | None = None,
                target_recall: float = 0.95, modalities: tuple[str, ...] | None = None,
                progress: bool = True) -> dict[str, dict]:
    """Index every modality of the embedding folder OUT (module docstring); ``{modality: info}``.

    ``memory`` is the budget (``4GiB``, bytes...), ``factory`` a FAISS factory string that
    replaces the automatic choice. Raises FileNotFoundError without a manifest and ValueError for
    an incomplete collection or a budget too small for any index.
    """
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no such file; run clipforge embed SOURCE {out} first")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != _parts.FORMAT:
        raise ValueError(f"{manifest_path}: not a clipforge embedding manifest (format {manifest.get('format')!r})")
    if not manifest.get("complete"):
        raise ValueError(f"{out}: embedding is incomplete (run clipforge embed again on it to finish)")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    budget = parse_memory(memory)
    wanted = [m for m in (modalities or MODALITIES) if m in manifest["modalities"]]
    return {modality: build_modality_index(out, modality, manifest, budget, factory, target_recall, progress=progress)
            for modality in wanted}
