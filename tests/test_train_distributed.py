"""Two processes with 4 pairs each train exactly like one process with 8 (torchrun, gloo, CPU)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.train import TrainConfig, apply_overrides, train

from _torchrun import failure, torchrun
from _train_data import make_shapes

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3


def _settings(run_dir, data) -> list[str]:
    # 8 square images and a global batch of 8: each step (one epoch) holds all of them on any
    # number of processes. crop_scale (1, 1) on square images makes the augmentation the identity,
    # so both runs see the same pixels whatever random numbers each process draws. The learning
    # rate is small because Adam turns float noise in exactly-zero gradients (attention key
    # biases) into steps of up to lr * noise / eps.
    # device=cpu: gloo on any machine (a one-GPU machine cannot give two ranks a GPU each).
    return ["model.name=tiny-vit", "device=cpu", "batch_size=8", f"steps={STEPS}", "data.workers=0",
            "data.crop_scale=1,1", "optim.warmup_steps=1", "optim.lr=1e-4", "run.progress=false",
            "run.log_every=1", f"run.run_dir={run_dir}", f"data.train={data}"]


def _metrics(run_dir) -> list[float]:
    """Loss and gradient norm of every step, flattened."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for r in records for value in (r["loss"], r["grad_norm"])]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    data = make_shapes(tmp_path / "data", 8)
    train(apply_overrides(TrainConfig(), _settings(tmp_path / "single", data)))

    args = ["train"] + [arg for item in _settings(tmp_path / "pair", data) for arg in ("--set", item)]
    done = torchrun(["-m", "clipforge.cli", *args], tmp_path / "scratch")
    assert done.returncode == 0, failure(done)

    # Same loss and gradient norm at every step: Adam would hide a wrong gradient scale in the weights.
    single, pair = _metrics(tmp_path / "single"), _metrics(tmp_path / "pair")
    assert len(single) == len(pair) == 2 * STEPS
    assert pair == pytest.approx(single, rel=1e-5)

    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    expected = load_file(str(tmp_path / "single" / final))
    distributed = load_file(str(tmp_path / "pair" / final))
    assert max((expected[k] - distributed[k]).abs().max().item() for k in expected) <= 1e-5
    torch.manual_seed(0)  # the runs' seed: the same initial weights
    initial = clipforge.create_model("tiny-vit").state_dict()
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-4, "the runs must train"
