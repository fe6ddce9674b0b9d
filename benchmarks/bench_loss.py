"""Contrastive loss forward+backward at d=512: clipforge's tiled loss vs the naive N x N loss vs
open_clip's ClipLoss, peak memory and time, same inputs, one run.

Every (method, N) case runs in a fresh subprocess: it builds the embeddings (two (N, 512) fp32
tensors and a log-space logit scale), resets the peak-RSS counter (``/proc/self/clear_refs``), runs
forward+backward (the median of 5 runs for N <= 4,096, one run above), and reports the peak RSS
above the embeddings (gradients and every temporary included), wall time and process CPU time.
CPU time is the fairer clock on a shared machine. open_clip runs in the peers venv (``--peers-python``); a method whose measured memory
growth (a x N^2 at the largest N it ran) predicts more than ``--max-gib`` is not run, and the
table says what it would need. Every method sees the same numbers, so the loss columns agree.

    .venv/bin/python benchmarks/bench_loss.py --threads 1                 # the full table
    .venv/bin/python benchmarks/bench_loss.py --sizes 1024 8192 --methods clipforge naive
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
METHODS = ["clipforge", "naive", "open_clip"]
QUADRATIC = {"naive", "open_clip"}  # methods whose memory grows as N^2
REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(method: str, tile_size: "int | None"):
    if method == "open_clip":
        import torch.nn.functional as F
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()  # takes normalised features and the already-exponentiated scale
        return lambda image, text, scale: clip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp())
    sys.path.insert(0, str(REPO / "src"))
    from clipforge.loss import contrastive_loss, naive_contrastive_loss

    if method == "naive":
        return naive_contrastive_loss
    options = {} if tile_size is None else {"tile_size": tile_size}  # None: the library's default
    return lambda image, text, scale: contrastive_loss(image, text, scale, **options)


def _inputs(n: int, dim: int):
    generator = torch.Generator().manual_seed(n)
    image = torch.randn(n, dim, generator=generator)
    text = image + torch.randn(n, dim, generator=generator)  # matching pairs correlate
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(2.6593, requires_grad=True)


def run_case(method: str, n: int, dim: int, threads: int, tile_size: "int | None") -> dict:
    """Forward+backward in this (fresh) process: peak memory, median time of the runs."""
    repeats = 5 if n <= 4096 else 1
    torch.set_num_threads(threads)
    loss_fn = _loss_fn(method, tile_size)
    loss_fn(*_inputs(256, dim)[:2], torch.tensor(1.0)).item()  # warm-up: kernels, allocator
    image, text, scale = _inputs(n, dim)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    rss_before = _status_kib("VmRSS")
    walls, cpus, peak_kib, loss_value = [], [], 0, None
    for _ in range(repeats):  # the median of a few runs at small N, where one run is noisy
        image.grad = text.grad = scale.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(image, text, scale)
        loss.backward()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        peak_kib = peak_kib or _status_kib("VmHWM") - rss_before  # the first run's peak
        loss_value, loss = loss.item(), None
    return {
        "method": method, "n": n, "loss": loss_value, "wall_s": sorted(walls)[repeats // 2],
        "cpu_s": sorted(cpus)[repeats // 2], "runs": repeats, "peak_mib": peak_kib / 1024,
        "torch": torch.__version__,
    }


def _spawn(python: str, method: str, n: int, args) -> dict:
    command = [python, __file__, "--worker", method, str(n), "--dim", str(args.dim), "--threads", str(args.threads)]
    if args.tile_size is not None:
        command += ["--tile-size", str(args.tile_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "n": n, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=None, help="default: clipforge.loss.DEFAULT_TILE_SIZE")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip cases predicted to need more")
    parser.add_argument("--peers-python", default="/work/peers/bin/python", help="a python with open_clip")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(args.worker[0], int(args.worker[1]), args.dim, args.threads, args.tile_size)))
        return

    print(f"# d={args.dim}, threads={args.threads}, tile={args.tile_size or 'default'}, torch {torch.__version__}", flush=True)
    print("| N | method | peak above embeddings | wall | CPU | loss |\n|---|---|---|---|---|---|", flush=True)
    growth: dict[str, float] = {}  # bytes per N^2, from the largest run so far
    for n in sorted(args.sizes):
        for method in args.methods:
            predicted_gib = growth.get(method, 0.0) * n * n / 2**30
            if method in QUADRATIC and predicted_gib > args.max_gib:
                print(f"| {n:,} | {method} | would need ~{predicted_gib:.1f} GiB (not run) | | | |", flush=True)
                continue
            python = args.peers_python if method == "open_clip" else sys.executable
            result = _spawn(python, method, n, args)
            if "error" in result:
                print(f"| {n:,} | {method} | failed: {result['error']} | | | |", flush=True)
                continue
            growth[method] = result["peak_mib"] * 2**20 / (n * n)
            print(f"| {n:,} | {method} | {result['peak_mib']:,.0f} MiB | {result['wall_s']:.2f} s "
                  f"| {result['cpu_s']:.2f} s | {result['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
