"""``clipforge index`` at scale: build time, peak memory against the budget, recall@10, kNN latency.

    PYTHONPATH=src python benchmarks/bench_index.py --count 1000000 --dim 512 --memory 4GiB
    PYTHONPATH=src python benchmarks/bench_index.py --count 200000 --factory IVF2048,Flat

Synthetic unit vectors around ``--clusters`` random centres (real CLIP embeddings cluster; uniform
random vectors in 512-d have no near neighbours to find) are written as an embedding folder in
parts of 100k rows. The build runs as ``clipforge index`` in its own process, so its peak memory is
the build's. Then, in this process: recall@10 of the written index with its tuned parameters on
fresh queries against brute force, and single-query latency p50/p99 and queries/s from 1 and 16
concurrent threads (FAISS with one OpenMP thread per query, as a server calls it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PART_ROWS = 100_000


def write_synthetic(work: Path, count: int, dim: int, clusters: int, seed: int, spread: float) -> np.ndarray:
    """The embedding folder at ``work``; returns the cluster centres (for fresh queries)."""
    from clipforge.search import _parts

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    if (work / "manifest.json").is_file() and json.loads((work / "manifest.json").read_text())["count"] == count:
        return centres  # already written by an earlier run with the same arguments
    for number, start in enumerate(range(0, count, PART_ROWS)):
        rows = min(PART_ROWS, count - start)
        vectors = centres[rng.integers(clusters, size=rows)] + spread / np.sqrt(dim) * rng.standard_normal(
            (rows, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        meta = [{"image_path": f"/synthetic/{start + i}.jpg", "captions": []} for i in range(rows)]
        _parts.write_part(work, number, {"image": vectors.astype(np.float16)}, meta, [], multi_caption=False)
    run = {"model": {"spec": "synthetic", "fingerprint": "-"}, "source": "synthetic", "precision": "fp16"}
    _parts.write_manifest(work, run, -(-count // PART_ROWS), dim, ["image"])
    return centres


def fresh_queries(centres: np.ndarray, count: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    dim = centres.shape[1]
    queries = centres[rng.integers(len(centres), size=count)] + spread / np.sqrt(dim) * rng.standard_normal(
        (count, dim)).astype(np.float32)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def brute_force(work: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    import faiss

    manifest = json.loads((work / "manifest.json").read_text())
    scores, ids, first = None, None, 0
    for part in manifest["parts"]:
        vectors = np.load(work / "img_emb" / f"img_emb_{part['part']}.npy").astype(np.float32)
        part_scores, part_ids = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        part_ids += first
        first += len(vectors)
        if scores is None:
            scores, ids = part_scores, part_ids
            continue
        scores, ids = np.concatenate([scores, part_scores], 1), np.concatenate([ids, part_ids], 1)
        order = np.argsort(-scores, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return ids


def latency(index, queries: np.ndarray, threads: int) -> dict:
    """Single-query searches from ``threads`` client threads: p50/p99 ms and queries/s."""
    def one(query):
        started = time.perf_counter()
        index.search(query[None], 10)
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        times = np.array(list(pool.map(one, queries)))
    wall = time.perf_counter() - started
    return {"p50_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.percentile(times, 99)),
            "qps": len(queries) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=20_000)
    parser.add_argument("--spread", type=float, default=0.35,
                        help="noise norm around a centre (0.35: cosine ~0.94 to it; 1.0: ~0.7, harder)")
    parser.add_argument("--query-spread", type=float, default=0.5, help="the same for the fresh queries")
    parser.add_argument("--memory", default="4GiB")
    parser.add_argument("--factory", default=None)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/clipforge-bench-index")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss

    work = Path(args.work)
    started = time.time()
    centres = write_synthetic(work, args.count, args.dim, args.clusters, args.seed, args.spread)
    print(f"collection ready ({time.time() - started:.0f} s)", file=sys.stderr)
    command = [sys.executable, "-m", "clipforge.cli", "index", str(work), "--memory", args.memory]
    command += ["--factory", args.factory] if args.factory else []
    started = time.time()
    subprocess.run(command, check=True, env={**os.environ})
    build_wall = time.time() - started
    info = json.loads((work / "image.index.json").read_text())
    index = faiss.read_index(str(work / "image.index"))
    if info["search_params"]:
        faiss.ParameterSpace().set_index_parameters(index, info["search_params"])
    queries = fresh_queries(centres, args.queries, args.seed, args.query_spread)
    exact = brute_force(work, queries)
    _, found = index.search(queries, 10)
    fresh_recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))
    faiss.omp_set_num_threads(1)
    one, sixteen = latency(index, queries, 1), latency(index, queries, 16)
    row = {"count": args.count, "dim": args.dim, "factory": info["factory"], "params": info["search_params"],
           "build_s": round(build_wall, 1), "peak_mib": round(info["peak_memory_bytes"] / 2**20),
           "budget_mib": round(info["memory_budget_bytes"] / 2**20),
           "baseline_mib": round(info["baseline_memory_bytes"] / 2**20),
           "recall_at_10_build": info["recall_at_10"], "recall_at_10_fresh": round(fresh_recall, 4),
           "p50_ms_1": round(one["p50_ms"], 3), "p99_ms_1": round(one["p99_ms"], 3), "qps_1": round(one["qps"]),
           "p50_ms_16": round(sixteen["p50_ms"], 3), "p99_ms_16": round(sixteen["p99_ms"], 3),
           "qps_16": round(sixteen["qps"]), "cpus": os.cpu_count()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
