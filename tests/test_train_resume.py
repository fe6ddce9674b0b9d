"""A run killed with SIGKILL and resumed with ``--resume latest`` ends with the uninterrupted run's weights."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.train.resume import list_checkpoints, load_checkpoint, save_checkpoint

from _kill_after_checkpoint import train_and_kill
from _train_data import make_shapes

pytestmark = pytest.mark.slow  # trains and kills processes: left out of -m 'not slow'

# 24 images in batches of 8: 3 steps per epoch, so the run resumes inside the second epoch.
STEPS, KILL_AFTER = 6, 4


def _train_args(data: Path, run_dir: Path) -> list[str]:
    return [
        "train", "--data", str(data), "--model", "tiny-vit", "--batch-size", "8", "--steps", str(STEPS),
        "--run-dir", str(run_dir), "--set", "data.workers=0", "--set", "run.checkpoint_every=2",
        "--set", "run.keep=0", "--set", "run.progress=false", "--set", "optim.warmup_steps=2",
        "--set", "deterministic=true",
    ]


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    data = make_shapes(tmp_path / "data", 24)
    assert main(_train_args(data, tmp_path / "uninterrupted")) == 0

    killed = tmp_path / "killed"
    output = train_and_kill(_train_args(data, killed), KILL_AFTER)  # SIGKILL right after this checkpoint
    marker = killed / "checkpoints" / f"step_{KILL_AFTER:08d}"
    assert marker.exists(), output
    assert not (killed / "checkpoints" / f"step_{STEPS:08d}").exists()

    assert main(["train", "--run-dir", str(killed), "--resume", "latest"]) == 0

    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    expected = load_file(str(tmp_path / "uninterrupted" / final))
    resumed = load_file(str(killed / final))
    worst = max((expected[k] - resumed[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed run rewrites the metrics after its checkpoint, no duplicates"


def test_checkpoint_write_is_atomic_and_keeps_the_newest(tmp_path):
    import clipforge

    model = clipforge.create_model("tiny-vit")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, {"step": step}, step, keep=2)
    (tmp_path / "checkpoints" / ".tmp_step_00000004_123").mkdir()  # a write killed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1], model)
    assert state == {"step": 3}


def test_resume_latest_without_checkpoints_fails_before_training(tmp_path, capsys):
    data = make_shapes(tmp_path / "data", 8)
    args = _train_args(data, tmp_path / "fresh") + ["--resume", "latest"]
    assert main(args) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_resume_with_a_different_data_order_is_refused(tmp_path, capsys):
    data = make_shapes(tmp_path / "data", 8)
    args = _train_args(data, tmp_path / "run")
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    for changed in (["--batch-size", "4"], ["--set", "seed=1"]):
        assert main(args + ["--resume", "latest"] + changed) == 2
        assert "cannot resume" in capsys.readouterr().err
