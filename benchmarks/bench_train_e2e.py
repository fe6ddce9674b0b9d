"""End to end: ``clipforge train`` against ``open_clip_train`` on the same WebDataset shards.

Both train the same model (ViT-B/32 with QuickGELU, random init), batch, data-loader workers and
precision, for ``--steps`` steps over the same shards (pack them with ``clipforge shards``; samples
need a ``.txt`` caption, which open_clip reads). Each run is a fresh process; runs alternate
(clipforge, open_clip, clipforge, ...) ``--pairs`` times. The driver stamps every step as it is
logged (clipforge: a ``metrics.jsonl`` line, ``run.log_every=1``; open_clip: its ``Train Epoch``
line, ``--log-every-n-steps 1``), so it reports the time from launch to the first step (imports,
model, data start-up and the first step) and samples/s over the remaining steps, data loading
included. Medians over pairs, and the median of per-pair ratios.

    PYTHONPATH=$PWD/src /work/peers/bin/python benchmarks/bench_train_e2e.py \\
        --shards '/tmp/shards/data-{000000..000004}.tar' --steps 8 --pairs 2

The venv needs open_clip_torch's ``training`` extra too: ``pip install pandas 'webdataset==0.2.86'``
(the extra caps webdataset at 0.2.86; 0.2.111 and 1.0.2 end each shard with an empty sample that
``open_clip_train``'s ``group_by_keys_nothrow`` fails on with ``KeyError: 'fname'``). Shards for
a short run, from the demo dataset: ``clipforge shards DATA_DIR DATA_DIR/heldout.jsonl /tmp/shards
--max-count 300``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _clipforge(args, folder: Path) -> tuple[list[str], Path]:
    run_dir = folder / "clipforge"
    command = [sys.executable, "-m", "clipforge.cli", "train", "--data", args.shards, "--model", "ViT-B/32",
               "--batch-size", str(args.batch), "--steps", str(args.steps), "--run-dir", str(run_dir),
               "--set", f"data.workers={args.workers}", "--set", "run.log_every=1", "--set", "run.progress=false",
               "--set", f"run.checkpoint_every={args.steps + 1}", "--set", "precision=fp32", "--set", "device=cpu",
               "--set", "optim.warmup_steps=1"]
    return command, run_dir / "metrics.jsonl"


def _open_clip(args, folder: Path) -> list[str]:
    return [sys.executable, "-m", "open_clip_train.main", "--train-data", args.shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.batch * args.steps), "--batch-size", str(args.batch),
            "--workers", str(args.workers), "--model", "ViT-B-32-quickgelu", "--precision", "fp32", "--epochs", "1",
            "--device", "cpu", "--log-every-n-steps", "1", "--logs", str(folder / "open_clip"), "--name", "run",
            "--save-frequency", "0", "--warmup", "1", "--report-to", "", "--seed", "0"]


def _run(command: list[str], step_lines) -> list[float]:
    """Seconds from launch at which each training step was logged."""
    start = time.perf_counter()
    stamps: list[float] = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            count = step_lines(None)
            while len(stamps) < count:
                stamps.append(time.perf_counter() - start)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True) if getattr(step_lines, "poll_file", False) else None
    if watcher:
        watcher.start()
    for line in process.stdout:
        output.append(line)
        if step_lines(line):
            stamps.append(time.perf_counter() - start)
    process.wait()
    done.set()
    if watcher:
        watcher.join()
        while len(stamps) < step_lines(None):  # lines written after the last poll
            stamps.append(time.perf_counter() - start)
    if process.returncode:
        raise RuntimeError(f"{command[2]} failed:\n{''.join(output[-30:])}")
    return stamps


class _MetricsFile:
    """Counts metrics.jsonl lines (polled); lines of the process output are not steps."""

    def __init__(self, path: Path):
        self.path = path
        self.poll_file = True

    def __call__(self, line):
        if line is not None:
            return False
        try:
            return sum(1 for text in self.path.read_text().splitlines() if '"loss"' in text)
        except FileNotFoundError:
            return 0


def _open_clip_step(line):
    return line is not None and "Train Epoch:" in line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    results = {"clipforge": [], "open_clip": []}
    for _ in range(args.pairs):
        with tempfile.TemporaryDirectory() as folder:
            command, metrics = _clipforge(args, Path(folder))
            results["clipforge"].append(_run(command, _MetricsFile(metrics)))
            results["open_clip"].append(_run(_open_clip(args, Path(folder)), _open_clip_step))
    print(f"ViT-B/32, batch {args.batch}, {args.workers} workers, fp32, cpu, {args.steps} steps, {args.pairs} pairs; "
          f"load average {open('/proc/loadavg').read().split()[0]}\n")
    print("| implementation | time to first step (s) | samples/s after it, loading included |")
    print("|---|---|---|")
    rates = {}
    for name, runs in results.items():
        firsts = [stamps[0] for stamps in runs]
        rates[name] = [(len(s) - 1) * args.batch / (s[-1] - s[0]) for s in runs]
        print(f"| {name} | {statistics.median(firsts):.1f} | {statistics.median(rates[name]):.2f} |")
    ratio = statistics.median(c / o for c, o in zip(rates["clipforge"], rates["open_clip"]))
    print(f"\nclipforge / open_clip samples/s (median of pairs): {ratio:.2f}x; steps seen per run: "
          f"{[len(s) for s in results['clipforge']]} / {[len(s) for s in results['open_clip']]}")


if __name__ == "__main__":
    main()
