"""Resume keeps one history and stays exact (audit of training resume): a resume from an earlier
checkpoint sets the abandoned steps aside, evaluation while training leaves the random streams as
the checkpoint saved them, a resume on another world size gives every rank its own stream, a
crashed run's orphaned loader worker holds no lock, and a run killed before its first checkpoint
is told how to start over. Real trainings of the tiny preset on the demo's real images."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main
from clipforge.runtime import cache_root
from clipforge.train.log import read_metrics
from clipforge.train.resume import list_checkpoints, save_checkpoint
from clipforge.train.run_folder import RunFolderLock

from _cli_errors import one_error_line
from _kill_after_checkpoint import _CHILD as KILL_AFTER_CHECKPOINT, train_and_kill
from _torchrun import failure, torchrun

pytestmark = pytest.mark.slow  # trains, kills processes and launches torchrun

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _listing(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` rows of a demo listing, with absolute image paths."""
    with open(target, "w", encoding="utf-8") as out:
        for line in source.read_text(encoding="utf-8").splitlines()[:count]:
            row = json.loads(line)
            row["image"] = str(source.parent / row["image"])
            out.write(json.dumps(row) + "\n")
    return target


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """64 training pairs and 16 held-out pairs of the demo's real 64 px images (4 steps an epoch)."""
    root = cache_root() / "demo" / "data-64px"
    if not (root / "train.jsonl").is_file() or not (root / "heldout.jsonl").is_file():
        pytest.skip(f"demo images not prepared under {root}; run: clipforge demo --prepare-only")
    folder = tmp_path_factory.mktemp("demo_listing")
    return _listing(root / "train.jsonl", folder / "train.jsonl", 64), _listing(root / "heldout.jsonl",
                                                                                folder / "held.jsonl", 16)


def _args(data, run_dir, steps, *extra, every=2) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--steps", str(steps), "--run-dir", str(run_dir),
            "--set", "run.log_every=1", "--set", f"run.checkpoint_every={every}", "--set", "run.progress=false",
            "--set", "device=cpu", *extra]


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def test_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside_and_latest_continues_it(demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(demo[0], run_dir, 6)) == 0  # step_2, step_4, step_6 (run.keep=3)
    old_metrics = (run_dir / "metrics.jsonl").read_text()

    assert main(_args(demo[0], run_dir, 3, "--resume", "step_00000002")) == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: resuming at step 2")]
    assert len(notice) == 1 and "step_00000004, step_00000006" in notice[0]
    assert _names(run_dir / "checkpoints") == ["step_00000002", "step_00000003"]  # keep=3 deleted nothing new
    aside = [path for path in run_dir.iterdir() if path.name.startswith("replaced-")]
    assert len(aside) == 1 and str(aside[0]) in notice[0]
    assert _names(aside[0] / "checkpoints") == ["step_00000004", "step_00000006"]
    assert (aside[0] / "checkpoints" / "step_00000006" / "model.safetensors").is_file()
    assert (aside[0] / "metrics.jsonl").read_text() == old_metrics  # the abandoned history is kept whole

    assert main(_args(demo[0], run_dir, 5, "--resume", "latest")) == 0  # continues step_3, not the old step_6
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    assert _names(run_dir / "checkpoints") == ["step_00000003", "step_00000004", "step_00000005"]


def test_rotation_never_deletes_this_run_for_checkpoints_past_its_step(tmp_path):
    model = clipforge.create_model("tiny-vit")
    for step in (1, 2, 6):  # step 6 belongs to another history
        save_checkpoint(tmp_path, model, {"step": step}, step, keep=0)
    save_checkpoint(tmp_path, model, {"step": 3}, 3, keep=1)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]


def test_kill_and_resume_with_evaluation_and_patch_dropout_is_exact(demo, tmp_path):
    data, held = demo
    extra = ["--set", "model.patch_dropout=0.5", "--set", "eval.every_steps=2", "--set", "eval.batch_size=16",
             "--set", "eval.retrieval=" + json.dumps([{"name": "val", "data": str(held)}]),
             "--set", "deterministic=true"]
    assert main(_args(data, tmp_path / "whole", 8, *extra, every=4)) == 0
    output = train_and_kill(_args(data, tmp_path / "killed", 8, *extra, every=4), 4)  # before step 4's evaluation
    assert _names(tmp_path / "killed" / "checkpoints") == ["step_00000004"], output
    assert main(_args(data, tmp_path / "killed", 8, *extra, "--resume", "latest", every=4)) == 0

    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert sorted(whole) == sorted(resumed) == list(range(1, 9))
    assert [resumed[step] for step in whole] == list(whole.values())  # every step, bit for bit
    final = "checkpoints/step_00000008/model.safetensors"
    a, b = load_file(str(tmp_path / "whole" / final)), load_file(str(tmp_path / "killed" / final))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any("eval/val/loss" in r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl"))


_RNG_LOGGER = """
import hashlib, os, sys, torch
import clipforge.train.loop as loop
original = loop._optimizer_step
def logged(run, images, tokens):  # the torch stream each rank's patch-dropout masks draw from
    state = hashlib.md5(torch.get_rng_state().numpy().tobytes()).hexdigest()
    with open(f"{os.environ['RNG_LOG']}.rank{run.context.rank}", "a") as file:
        file.write(f"{run.step + 1} {state}\\n")
    return original(run, images, tokens)
loop._optimizer_step = logged
from clipforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _streams(prefix: Path, rank: int) -> dict[int, str]:
    lines = Path(f"{prefix}.rank{rank}").read_text().split("\n")
    return {int(step): state for step, state in (line.split() for line in lines if line)}


def _pair(script: Path, args: list[str], log: Path, scratch: Path) -> None:
    done = torchrun([str(script), *args], scratch, env={**os.environ, "RNG_LOG": str(log), "PYTHONPATH": SRC})
    assert done.returncode == 0, failure(done)


def test_resume_on_another_world_size_gives_each_rank_its_own_stream(demo, tmp_path):
    script = tmp_path / "rng_logger.py"
    script.write_text(_RNG_LOGGER)
    extra = ["--set", "model.patch_dropout=0.5", "--set", "run.keep=0", "--set", "data.workers=0"]

    # same world size (2 -> 2): each rank goes on with exactly its own saved stream, as before
    _pair(script, _args(demo[0], tmp_path / "pair", 8, *extra, every=4), tmp_path / "pair_log", tmp_path / "s1")
    halfway = tmp_path / "pair_halfway"
    shutil.copytree(tmp_path / "pair", halfway)
    shutil.rmtree(halfway / "checkpoints" / "step_00000008")
    _pair(script, _args(demo[0], halfway, 8, *extra, "--resume", "latest", every=4), tmp_path / "halfway_log",
          tmp_path / "s2")
    for rank in (0, 1):
        whole, resumed = _streams(tmp_path / "pair_log", rank), _streams(tmp_path / "halfway_log", rank)
        assert sorted(resumed) == [5, 6, 7, 8] and all(resumed[step] == whole[step] for step in resumed)
    assert all(_streams(tmp_path / "pair_log", 0)[s] != _streams(tmp_path / "pair_log", 1)[s] for s in range(1, 9))

    # another world size (1 -> 2): the two ranks draw different streams from the resumed step on
    assert main(_args(demo[0], tmp_path / "single", 4, *extra, every=4)) == 0
    _pair(script, _args(demo[0], tmp_path / "single", 8, *extra, "--resume", "latest", every=4),
          tmp_path / "grown_log", tmp_path / "s3")
    rank0, rank1 = _streams(tmp_path / "grown_log", 0), _streams(tmp_path / "grown_log", 1)
    assert sorted(rank0) == sorted(rank1) == [5, 6, 7, 8]
    assert all(rank0[step] != rank1[step] for step in rank0), "ranks share one patch-dropout stream"


_LOCK_THEN_FORK_THEN_DIE = """
import os, signal, sys, time
from clipforge.train.run_folder import RunFolderLock
RunFolderLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a data-loader worker that outlives its training for a while
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the training crashes; nothing is released by hand
"""


def test_a_forked_child_that_outlives_a_crashed_training_holds_no_lock(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _LOCK_THEN_FORK_THEN_DIE, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": SRC})
    child = int(parent.stdout.readline())
    try:
        assert parent.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # still alive, with the lock file open
        RunFolderLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)
        parent.stdout.close()


def test_a_training_killed_with_a_loader_worker_does_not_block_its_resume(demo, tmp_path):
    args = _args(demo[0], tmp_path / "run", 6, "--set", "data.workers=1")
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: waiting ends when the trainer dies
        killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(torch.get_num_threads()), "2", *args],
                                stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    # its loader worker, orphaned, lives on for up to 5 s with the lock file open
    assert main(args + ["--resume", "latest"]) == 0
    assert _names(tmp_path / "run" / "checkpoints") == ["step_00000002", "step_00000004", "step_00000006"]


_KILL_AT_STEP_3 = """
import os, signal, sys
import clipforge.train.loop as loop
original = loop._optimizer_step
def step_or_die(run, images, tokens):
    if run.step == 2:  # steps 1 and 2 logged, no checkpoint yet
        os.kill(os.getpid(), signal.SIGKILL)
    return original(run, images, tokens)
loop._optimizer_step = step_or_die
from clipforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_before_its_first_checkpoint_is_told_to_start_over(demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = _args(demo[0], run_dir, 6, every=10)
    done = subprocess.run([sys.executable, "-c", _KILL_AT_STEP_3, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC}, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]

    assert main(args) == 2
    line = one_error_line(capsys)
    assert "stopped before its first checkpoint" in line and "--overwrite" in line and "--resume" not in line
    assert main(args + ["--resume", "latest"]) == 2
    line = one_error_line(capsys)
    assert "no checkpoint in" in line and "start it again with --overwrite" in line
    assert main(args + ["--overwrite"]) == 0
    aside = [path for path in run_dir.iterdir() if path.name.startswith("replaced-")]
    assert len(aside) == 1 and [r["step"] for r in read_metrics(aside[0] / "metrics.jsonl")] == [1, 2]
