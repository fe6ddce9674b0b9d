"""``clipforge serve`` under load: latency p50/p99 and queries/s with 1 and 32 concurrent clients.

Builds a collection in clip-retrieval's layout: the demo's held-out images and captions (real
files, embedded with ``--model``) plus ``--synthetic`` random unit rows, so the kNN step searches a
realistic count; a Flat (exact) image index and an HNSW text index. Then starts the real
``clipforge serve`` in its own process and, from this process, runs each query kind for
``--seconds`` with 1 and with ``--clients`` concurrent clients (one thread and one keep-alive
HTTP connection each):

- ``text``: ``GET /search?q=`` (tokenize + batched text encoder + kNN + metadata)
- ``image``: ``POST /search`` with a PNG upload (decode + preprocess + batched image encoder + kNN)
- ``knn``: ``POST /knn-service`` with ``embedding_input`` (kNN + metadata only, no encoder)

The mean encoder batch size comes from the server's own ``/metrics``. Client threads share this
process's GIL, so at high concurrency the numbers include client overhead.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_serve_load.py --out benchmarks/results_serve.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "demo" / "data-64px"


def build_collection(out: Path, model_spec: str, synthetic: int, seed: int) -> tuple[Path, list[str], list[str]]:
    """Write the collection; return (model folder, query captions, query image paths)."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import clipforge
    from clipforge.evaluate import model_fingerprint

    torch.manual_seed(seed)
    model = clipforge.create_model(model_spec).eval()
    model_dir = clipforge.save(model, out / "model")
    rows = [json.loads(line) for line in (DEMO / "heldout.jsonl").read_text().splitlines() if line.strip()]
    paths = [str((DEMO / row["image"]).resolve()) for row in rows]
    captions = [row["caption"] for row in rows]
    preprocess = clipforge.image_transform(model.config.vision.image_size)
    context = model.config.text.context_length
    image_parts, text_parts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            pixels = torch.stack([preprocess(clipforge.load_image(path).convert("RGB"))
                                  for path in paths[start:start + 256]])  # (B, 3, H, W)
            image_parts.append(model.encode_image(pixels))
            text_parts.append(model.encode_text(clipforge.tokenize(captions[start:start + 256], context, truncate=True)))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)  # noqa: E731
    rng = np.random.default_rng(seed)
    dim = model.config.embed_dim
    noise = lambda: rng.standard_normal((synthetic, dim), dtype=np.float32)  # noqa: E731
    image = np.concatenate([unit(torch.cat(image_parts).numpy()), unit(noise())])
    text = np.concatenate([unit(torch.cat(text_parts).numpy()), unit(noise())])
    collection = out / "demo-heldout"
    for folder, array in (("img_emb", image), ("text_emb", text)):
        (collection / folder).mkdir(parents=True)
        np.save(collection / folder / f"{folder}_0.npy", array)
    (collection / "metadata").mkdir()
    pq.write_table(pa.table({"image_path": pa.array(paths + [None] * synthetic, pa.string()),
                             "caption": captions + [f"synthetic row {i}" for i in range(synthetic)]}),
                   collection / "metadata" / "metadata_0.parquet")
    for modality, array, factory, params in (("image", image, "Flat", ""), ("text", text, "HNSW32", "efSearch=64")):
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        index.add(array.astype(np.float32))
        faiss.write_index(index, str(collection / f"{modality}.index"))
        (collection / f"{modality}.index.json").write_text(json.dumps(
            {"factory": factory, "count": len(array), "dim": dim, "search_params": params}))
    (collection / "manifest.json").write_text(json.dumps({
        "format": "clipforge-embeddings", "version": 1,
        "model": {"spec": model_spec, "fingerprint": model_fingerprint(model)}, "modalities": ["image", "text"],
        "dim": dim, "count": len(image), "parts": [0], "skipped": [], "complete": True}))
    return model_dir, captions, sorted(set(paths))


def start_server(collection: Path, model_dir: Path, device: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(collection), "--model",
                                str(model_dir), "--port", str(port), "--device", device], env=env)
    import httpx
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit("clipforge serve exited")
        try:
            httpx.get(url + "/health", timeout=5)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit("clipforge serve did not come up")
            time.sleep(0.3)


def batch_counts(url: str) -> dict[str, tuple[float, float]]:
    """"encoder:text", "knn:image", ... -> (queries, batched calls), from the server's /metrics."""
    import httpx
    text = httpx.get(url + "/metrics").text
    found = {}
    for stage in ("encoder", "knn"):
        for kind in ("text", "image"):
            total = re.search(rf'clipforge_{stage}_batch_size_sum{{kind="{kind}"}} (\S+)', text)
            calls = re.search(rf'clipforge_{stage}_batch_size_count{{kind="{kind}"}} (\S+)', text)
            found[f"{stage}:{kind}"] = (float(total.group(1)), float(calls.group(1))) if total else (0.0, 0.0)
    return found


def run_load(url: str, kind: str, clients: int, seconds: float, queries: dict) -> dict:
    """Each client sends ``kind`` queries back to back for ``seconds``; latencies and errors."""
    import httpx
    latencies, errors = [], 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(number: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120) as http:
            barrier.wait()
            sent, stop = 0, time.monotonic() + seconds
            while time.monotonic() < stop:
                began = time.perf_counter()
                pick = (number * 7919 + sent) % len(queries[kind])
                if kind == "text":
                    answer = http.get("/search", params={"q": queries["text"][pick], "k": 10})
                elif kind == "image":
                    answer = http.post("/search", files={"image": ("q.png", queries["image"][pick], "image/png")},
                                       data={"k": "10"})
                else:
                    answer = http.post("/knn-service", json={"embedding_input": queries["knn"][pick],
                                                             "modality": "image", "num_images": 10})
                elapsed = time.perf_counter() - began
                with lock:
                    latencies.append(elapsed)
                    errors += answer.status_code != 200
                sent += 1

    before = batch_counts(url)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = batch_counts(url)
    done = {key: (after[key][0] - before[key][0], after[key][1] - before[key][1]) for key in after}
    mean = lambda key: done[key][0] / done[key][1] if done[key][1] else None  # noqa: E731
    # every kind searches the image index; text and image queries are encoded first
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {"kind": kind, "clients": clients, "requests": len(latencies), "errors": errors,
            "qps": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99,
            "encoder_batch": mean(f"encoder:{kind}") if kind != "knn" else None, "knn_batch": mean("knn:image")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-vit", help="preset embedded with seeded random weights")
    parser.add_argument("--synthetic", type=int, default=100_000, help="random unit rows added to the demo's")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if not (DEMO / "heldout.jsonl").is_file():
        raise SystemExit(f"{DEMO}/heldout.jsonl missing: run `clipforge demo` once to prepare the demo images")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, captions, image_paths = build_collection(Path(tmp), args.model, args.synthetic, seed=0)
        process, url = start_server(Path(tmp) / "demo-heldout", model_dir, args.device)
        try:
            stored = np.load(Path(tmp) / "demo-heldout" / "img_emb" / "img_emb_0.npy")
            queries = {"text": captions, "image": [Path(path).read_bytes() for path in image_paths[:64]],
                       "knn": [row.astype(float).tolist() for row in stored[:: max(1, len(stored) // 256)]]}
            run_load(url, "text", 4, 1.0, queries)  # warm-up
            load_before = os.getloadavg()[0]
            results = [run_load(url, kind, clients, args.seconds, queries)
                       for kind in ("text", "image", "knn") for clients in (1, args.clients)]
            load_after = os.getloadavg()[0]
        finally:
            process.terminate()
            process.wait(timeout=60)
    count = len(captions) + args.synthetic
    lines = [f"Collection: {len(captions)} demo held-out rows (real 64 px images + captions) + {args.synthetic} "
             f"synthetic rows = {count} rows, d={stored.shape[1]}; image index Flat (exact), text index HNSW32 "
             f"efSearch=64. Model: {args.model} (seeded random weights), device {args.device}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.seconds:.0f} s per row; "
             f"{os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} before and {load_after:.1f} after "
             "(other jobs share the machine).", "",
             "| query | clients | requests | errors | queries/s | p50 ms | p99 ms | mean encoder batch "
             "| mean kNN batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shown = lambda value: f"{value:.1f}" if value else "-"  # noqa: E731
    for row in results:
        lines.append(f"| {row['kind']} | {row['clients']} | {row['requests']} | {row['errors']} | {row['qps']:.0f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {shown(row['encoder_batch'])} "
                     f"| {shown(row['knn_batch'])} |")
    print("\n".join(lines))
    if args.out:
        command = "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_serve_load.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text("# clipforge serve: load test\n\n" + f"Command: `{command}`\n\n"
                                  + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
