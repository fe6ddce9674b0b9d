"""Gradients all-reduced in buckets during backward equal the all-reduce after backward (torchrun, gloo)."""
import json
from pathlib import Path

import pytest

from _torchrun import failure, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_overlapped_buckets_give_the_mean_gradient_and_start_during_backward(tmp_path):
    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("_overlap_worker.py")
    done = torchrun([str(worker), str(out)], tmp_path / "scratch", timeout=300)
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    assert result["worst"] == 0.0  # the same sums, element by element
    assert result["mean_error"] <= 1e-6  # and they are the means over the two ranks
    assert result["buckets"] > 2 and 0 < result["started_in_backward"] < result["buckets"]  # the unused one waits
    assert result["inactive_untouched"]
