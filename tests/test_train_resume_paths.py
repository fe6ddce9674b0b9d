"""Exact resume after SIGKILL on the paths the basic test does not take: data-loader workers,
chunked (gradient-cached) steps, WebDataset shards and FLIP patch dropout (whose masks draw from
the random state a checkpoint must restore), each crossing an epoch boundary."""
import pytest
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.data import write_shards

from _kill_after_checkpoint import train_and_kill
from _train_data import make_shapes

pytestmark = pytest.mark.slow  # six short trainings and two killed children

# 24 images in batches of 8: 3 steps an epoch, so resuming at step 2 crosses into the second epoch.
STEPS, KILL_AFTER = 4, 2


def _args(data, run_dir, extra) -> list[str]:
    return ["train", "--data", str(data), "--model", "tiny-vit", "--batch-size", "8", "--steps", str(STEPS),
            "--run-dir", str(run_dir), "--set", "run.checkpoint_every=2", "--set", "run.keep=0",
            "--set", "run.progress=false", "--set", "optim.warmup_steps=1", "--set", "deterministic=true",
            "--set", "device=cpu", *extra]


def _worst_difference(first, second) -> float:
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a, b = load_file(str(first / final)), load_file(str(second / final))
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("case", ["workers", "chunked", "shards", "patch_dropout"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, case):
    captions = make_shapes(tmp_path / "data", 24)
    data, extra = captions, ["--set", "data.workers=0"]
    if case == "workers":
        extra = ["--set", "data.workers=2"]  # augmentation drawn in worker processes
    elif case == "chunked":
        extra = ["--set", "data.workers=0", "--chunk-size", "4"]
    elif case == "patch_dropout":
        extra = ["--set", "data.workers=0", "--set", "model.patch_dropout=0.5", "--chunk-size", "4"]
    elif case == "shards":
        data = write_shards(captions, tmp_path / "shards", max_count=6).pattern
        extra = ["--set", "data.workers=2"]
    assert main(_args(data, tmp_path / "whole", extra)) == 0
    output = train_and_kill(_args(data, tmp_path / "killed", extra), KILL_AFTER)
    assert (tmp_path / "killed" / "checkpoints" / f"step_{KILL_AFTER:08d}").is_dir(), output
    assert not (tmp_path / "killed" / "checkpoints" / f"step_{STEPS:08d}").exists()
    assert main(["train", "--run-dir", str(tmp_path / "killed"), "--resume", "latest"]) == 0
    assert _worst_difference(tmp_path / "whole", tmp_path / "killed") <= 1e-6
