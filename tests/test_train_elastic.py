"""Elastic training over a caption file: 1 and 2 processes see the same global batches, with
random-resized-crop augmentation on, and a run checkpointed on one world size resumes exactly on
the other (2 -> 1 and 1 -> 2). torchrun with gloo on CPU."""
import json
import shutil

import pytest
from safetensors.torch import load_file

from clipforge.train import TrainConfig, apply_overrides, train

from _torchrun import failure, torchrun
from _train_data import make_shapes

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, HALF = 8, 4  # 48 images in global batches of 8: 6 batches an epoch, so the run crosses an epoch


def _settings(run_dir, data, *extra) -> list[str]:
    # crop_scale (0.4, 1): real random crops, so equal losses need the crop of a sample to depend
    # on the sample alone, not on the rank or worker that loads it. Small lr: see test_train_distributed.
    return ["model.name=tiny-vit", "device=cpu", "batch_size=8", f"steps={STEPS}", "data.workers=1",
            "data.crop_scale=0.4,1", "optim.warmup_steps=1", "optim.lr=1e-4", "run.progress=false",
            "run.log_every=1", f"run.checkpoint_every={HALF}", "run.keep=0", f"run.run_dir={run_dir}",
            f"data.train={data}", *extra]


def _train_pair(settings: list[str], scratch) -> None:
    args = ["train"] + [arg for item in settings for arg in ("--set", item)]
    done = torchrun(["-m", "clipforge.cli", *args], scratch)
    assert done.returncode == 0, failure(done)


def _losses(run_dir) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def _weights(run_dir, step=STEPS):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _worst(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _halfway_copy(run_dir, target):
    """``run_dir`` as it was after step HALF: the later checkpoint and metrics removed."""
    shutil.copytree(run_dir, target)
    shutil.rmtree(target / "checkpoints" / f"step_{STEPS:08d}")
    lines = (target / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= HALF))
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    data = make_shapes(root / "data", 48)
    train(apply_overrides(TrainConfig(), _settings(root / "single", data)))
    _train_pair(_settings(root / "pair", data), root / "scratch")
    return root, data


def test_two_processes_see_the_global_batches_of_one_with_augmentation(runs):
    root, _ = runs
    single, pair = _losses(root / "single"), _losses(root / "pair")
    assert [s for s, _, _ in single] == [s for s, _, _ in pair] == list(range(1, STEPS + 1))
    for (_, loss_1, norm_1), (_, loss_2, norm_2) in zip(single, pair):
        assert loss_2 == pytest.approx(loss_1, abs=1e-5, rel=1e-5)
        assert norm_2 == pytest.approx(norm_1, abs=1e-5, rel=1e-5)
    assert len({round(loss, 4) for _, loss, _ in single}) > 1, "batches must differ from step to step"
    assert _worst(_weights(root / "single"), _weights(root / "pair")) <= 1e-5
    assert _worst(_weights(root / "single"), _weights(root / "single", HALF)) > 1e-4, "the runs must train"


def test_checkpoint_on_two_processes_resumes_exactly_on_one(runs):
    root, data = runs
    resumed = _halfway_copy(root / "pair", root / "pair_then_single")
    train(apply_overrides(TrainConfig(), _settings(resumed, data, "run.resume=latest")))
    assert _worst(_weights(root / "single"), _weights(resumed)) <= 1e-5
    assert [loss for _, loss, _ in _losses(resumed)] == pytest.approx(
        [loss for _, loss, _ in _losses(root / "single")], abs=1e-5, rel=1e-5)


def test_checkpoint_on_one_process_resumes_exactly_on_two(runs):
    root, data = runs
    resumed = _halfway_copy(root / "single", root / "single_then_pair")
    _train_pair(_settings(resumed, data, "run.resume=latest"), resumed.parent / "scratch")
    assert _worst(_weights(root / "single"), _weights(resumed)) <= 1e-5
    assert [loss for _, loss, _ in _losses(resumed)] == pytest.approx(
        [loss for _, loss, _ in _losses(root / "single")], abs=1e-5, rel=1e-5)
