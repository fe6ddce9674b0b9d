"""Gradients all-reduced in buckets during backward equal the all-reduce after backward (torchrun, gloo)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_overlapped_buckets_give_the_mean_gradient_and_start_during_backward(tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("_overlap_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["worst"] == 0.0  # the same sums, element by element
    assert result["mean_error"] <= 1e-6  # and they are the means over the two ranks
    assert result["buckets"] > 2 and 0 < result["started_in_backward"] < result["buckets"]  # the unused one waits
    assert result["inactive_untouched"]
