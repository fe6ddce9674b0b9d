"""Peak memory and time of ``clipforge.load`` and one inference batch, in a fresh process per run.

Each run is a child process that loads the checkpoint, encodes 16 images and 64 captions, and
reports its peak RSS (``resource.getrusage``) after the load and after the batch. Point
``PYTHONPATH`` at another checkout's ``src`` to compare two versions side by side.

    PYTHONPATH=$PWD/src /work/venv-dev/bin/python benchmarks/bench_load_memory.py CHECKPOINT --runs 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch, clipforge
torch.set_num_threads(1)
started = time.perf_counter()
model, _ = clipforge.load(sys.argv[1])
load_s = time.perf_counter() - started
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
size = model.config.vision.image_size
with torch.no_grad():
    model.encode_image(torch.randn(16, 3, size, size))
    model.encode_text(clipforge.tokenize(["a photo of a cat"] * 64, context_length=model.context_length))
print(json.dumps({"load_s": load_s, "peak_after_load_mib": after_load,
                  "peak_after_batch_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="any path clipforge.load reads")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    print("| run | load s | peak RSS after load MiB | peak RSS after one batch MiB |")
    print("|---|---|---|---|")
    for run in range(1, args.runs + 1):
        out = subprocess.run([sys.executable, "-c", _CHILD, args.checkpoint], check=True, capture_output=True,
                             text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {run} | {row['load_s']:.2f} | {row['peak_after_load_mib']:.0f} | {row['peak_after_batch_mib']:.0f} |")


if __name__ == "__main__":
    main()
