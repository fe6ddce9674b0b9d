"""A run folder is never lost or mixed: one training at a time, no silent restart, clean after a
failed write or a full disk (issue 16, items 1, 2, 4 and 5)."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.train.log import read_metrics

from _train_data import make_shapes
from _cli_errors import one_error_line

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 16)


def _train(shapes, run_dir, *extra, steps=2, every=2):
    return main(["train", "--preset", "tiny", "--data", str(shapes), "--steps", str(steps), "--batch-size", "8",
                 "--run-dir", str(run_dir), "--set", f"run.checkpoint_every={every}", "--set", "run.progress=false",
                 "--set", "run.log_every=1", *extra])


def _steps(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def test_new_run_into_a_used_folder_is_refused_and_overwrite_starts_over(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir, steps=4) == 0
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _train(shapes, run_dir, steps=2) == 2
    line = one_error_line(capsys)
    assert f"{run_dir} holds a run at step 4: pass --resume latest to continue, or --overwrite" in line
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing truncated
    assert _steps(run_dir) == ["step_00000002", "step_00000004"]

    assert _train(shapes, run_dir, "--overwrite", steps=2) == 0
    assert "checkpoint " + str(run_dir / "checkpoints" / "step_00000002") in capsys.readouterr().out
    assert _steps(run_dir) == ["step_00000002"]  # the old run's step 4 is not mixed in
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    aside = [p for p in run_dir.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    assert (aside[0] / "metrics.jsonl").read_text() == metrics_before


def test_overwrite_and_resume_together_are_refused(shapes, tmp_path, capsys):
    assert _train(shapes, tmp_path / "run", "--overwrite", "--resume", "latest") == 2
    assert "pass one of them" in one_error_line(capsys)


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock, as a live training does."""
    code = textwrap.dedent(f"""
        import sys, time
        from clipforge.train.run_folder import RunFolderLock
        RunFolderLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_training_into_a_locked_folder_refuses_naming_the_other_and_a_dead_ones_lock_is_stale(
        shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        assert _train(shapes, run_dir) == 2
        line = one_error_line(capsys)
        assert f"{run_dir} is in use by another training (pid {holder.pid} on " in line
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: nothing is released by hand
        holder.wait()
    assert _train(shapes, run_dir) == 0  # the dead process holds nothing
    assert _steps(run_dir) == ["step_00000002"]


def test_the_lock_is_released_when_training_ends_even_on_an_error(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir) == 0
    assert _train(shapes, run_dir, "--resume", "latest", steps=1) == 2  # fails with the lock held
    assert _train(shapes, run_dir, "--resume", "latest", steps=3) == 0  # both locks are gone


def test_released_lock_is_free_even_while_a_forked_worker_still_holds_the_file(tmp_path):
    """Data-loader workers forked during training inherit the lock's open file; a second training
    in the same process right after the first must not find the folder busy."""
    from clipforge.train.run_folder import RunFolderLock

    lock = RunFolderLock(tmp_path).acquire()
    child = os.fork()
    if child == 0:  # a worker that outlives the training for a while
        signal.pause()
        os._exit(0)
    try:
        lock.release()
        RunFolderLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_stale_temporary_checkpoints_of_dead_processes_are_removed_on_resume(shapes, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir) == 0
    leftovers = [run_dir / "checkpoints" / ".tmp_step_00000004_999999", run_dir / "checkpoints" / ".stale_step_00000002_99"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    assert _train(shapes, run_dir, "--resume", "latest", steps=4) == 0
    assert not any(folder.exists() for folder in leftovers)
    assert _steps(run_dir) == ["step_00000002", "step_00000004"]


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
        shapes, tmp_path, capsys, monkeypatch):
    import clipforge.checkpoints.write as write

    real_save_file, calls = write.save_file, []

    def save_file_then_disk_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real_save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 4096)  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(write, "save_file", save_file_then_disk_full)
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir, steps=4) == 2
    line = one_error_line(capsys)
    assert "no space left on the device writing checkpoint" in line and "step_00000004" in line
    assert f"the previous checkpoint {run_dir / 'checkpoints' / 'step_00000002'} is intact" in line
    assert _steps(run_dir) == ["step_00000002"]  # no .tmp_step_* left, no partial step_4
    clipforge.load(run_dir / "checkpoints" / "step_00000002")  # whole and loadable
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_disk_full_writing_curves_leaves_no_empty_png_and_no_traceback(shapes, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def savefig_disk_full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"")  # matplotlib opens the file before it fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_disk_full)
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir) == 0  # the run and its checkpoint are what matter
    err = capsys.readouterr().err
    assert "Traceback" not in err and "warning: curves not drawn: no space left" in err
    assert not (run_dir / "curves.png").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".curves")] == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MB tmpfs: room for one tiny-vit checkpoint (about 41 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # busy: detach it now, freed when closed


def test_a_real_full_disk_stops_training_in_one_line_with_the_previous_checkpoint_whole(
        shapes, small_disk, capsys):
    run_dir = small_disk / "run"
    assert _train(shapes, run_dir, steps=4) == 2
    line = one_error_line(capsys)
    assert "no space left on the device" in line and "step_00000002 is intact" in line
    assert _steps(run_dir) == ["step_00000002"]
    model = clipforge.load_model(run_dir / "checkpoints" / "step_00000002")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [p for p in run_dir.rglob("*") if ".tmp" in p.name] == []
    curves = run_dir / "curves.png"
    assert not curves.exists() or curves.read_bytes().startswith(b"\x89PNG")


def test_resume_with_steps_below_the_current_step_is_an_error(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir, steps=4) == 0
    capsys.readouterr()
    assert _train(shapes, run_dir, "--resume", "latest", steps=2) == 2
    line = one_error_line(capsys)
    assert "the run is at step 4" in line and "pass --steps above 4" in line and "None" not in line


def test_saved_config_records_the_architecture_trained_from_init(shapes, tmp_path):
    init = tmp_path / "init"
    clipforge.save(clipforge.create_model("tiny-rn"), init)
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir, "--init", str(init)) == 0
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["model"]["name"] == "tiny-rn" and saved["model"]["init_checkpoint"] == str(init)
    assert clipforge.load_model(run_dir / "checkpoints" / "step_00000002").config.vision.is_resnet


def test_a_truncated_checkpoint_on_resume_is_one_line_without_unsafe_advice(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(shapes, run_dir) == 0
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    for name, expected in (("state.pt", "unreadable training state"),
                           ("model.safetensors", "truncated or damaged safetensors file")):
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(original[: len(original) // 2])
        capsys.readouterr()
        assert _train(shapes, run_dir, "--resume", "latest", steps=4) == 2
        line = one_error_line(capsys)
        assert f"{checkpoint / name}" in line and expected in line and "weights_only" not in line
        (checkpoint / name).write_bytes(original)
    (checkpoint / "model.safetensors").unlink()
    assert _train(shapes, run_dir, "--resume", "latest", steps=4) == 2
    line = one_error_line(capsys)
    assert "model.safetensors: missing" in line and "truncated or damaged" not in line
