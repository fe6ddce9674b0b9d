"""Defects the package reorganisation removed: each would come back if the shared decision split again."""
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoints import CheckpointError
from clipforge.cli import main
from clipforge.runtime import cache_root, resolve_device

from _train_data import make_shapes

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_saved_and_exported_models_get_the_usual_permissions(tmp_path, umask_022):
    model = clipforge.create_model("tiny-vit")
    folder = clipforge.save(model, tmp_path / "model")
    hf = clipforge.export_hf(model, tmp_path / "hf")
    files = [folder / "model.safetensors", folder / "config.json", hf / "model.safetensors",
             clipforge.export_openai(model, tmp_path / "w.safetensors"), clipforge.export_openai(model, tmp_path / "w.pt")]
    assert {path.name: _mode(path) for path in files} == {path.name: 0o644 for path in files}
    assert not [p for p in tmp_path.rglob(".*tmp*")], "temporary files left behind"


def test_training_checkpoints_are_readable_by_the_team(tmp_path, umask_022):
    data = make_shapes(tmp_path / "data", 8)
    assert main(["train", "--data", str(data), "--model", "tiny-vit", "--batch-size", "8", "--steps", "1",
                 "--run-dir", str(tmp_path / "run"), "--set", "data.workers=0", "--set", "run.progress=false"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert _mode(step) == 0o755
    assert {p.name: _mode(p) for p in step.iterdir()} == {p.name: 0o644 for p in step.iterdir()}


def _finetune_args(data, init, run_dir, steps):
    return ["train", "--data", str(data), "--init", str(init), "--batch-size", "8", "--steps", str(steps),
            "--run-dir", str(run_dir), "--set", "data.workers=0", "--set", "run.checkpoint_every=2",
            "--set", "run.keep=0", "--set", "run.progress=false", "--set", "deterministic=true"]


def test_resuming_a_finetune_reads_weights_from_the_checkpoint_only(tmp_path):
    data = make_shapes(tmp_path / "data", 16)
    torch.manual_seed(3)
    init = clipforge.save(clipforge.create_model("tiny-vit"), tmp_path / "init")
    assert main(_finetune_args(data, init, tmp_path / "whole", 4)) == 0
    assert main(_finetune_args(data, init, tmp_path / "split", 2)) == 0
    # The initial weights are gone (moved, or a shared folder cleaned up): resuming must not need them.
    (init / "model.safetensors").write_bytes(b"not weights any more")
    assert main(["train", "--run-dir", str(tmp_path / "split"), "--resume", "latest", "--steps", "4"]) == 0
    final = "checkpoints/step_00000004/model.safetensors"
    expected, resumed = load_file(str(tmp_path / "whole" / final)), load_file(str(tmp_path / "split" / final))
    assert max((expected[k] - resumed[k]).abs().max().item() for k in expected) <= 1e-6


def test_a_truncated_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    data = make_shapes(tmp_path / "data", 8)
    args = ["train", "--data", str(data), "--model", "tiny-vit", "--batch-size", "8", "--steps", "1",
            "--run-dir", str(tmp_path / "run"), "--set", "data.workers=0", "--set", "run.progress=false"]
    assert main(args) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    from clipforge.train.resume import read_training_state
    with pytest.raises(CheckpointError, match="model.safetensors"):
        clipforge.load_model(step)
    state = step / "state.pt"
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"state.pt: unreadable training state") as error:
        read_training_state(step)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)


def test_one_variable_names_the_cache(tmp_path, monkeypatch):
    from clipforge.demo.sources import default_cache_dir

    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLIPFORGE_CACHE_DIR", str(tmp_path / "ignored"))
    assert cache_root() == tmp_path / "cache"
    assert default_cache_dir() == tmp_path / "cache" / "demo"
    assert clipforge.checkpoints.cache_dir() == tmp_path / "cache"


def test_one_device_rule_for_the_library_and_the_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"):
        resolve_device("foo")
    assert resolve_device("auto") == torch.device("cpu")
    make_shapes(tmp_path, 1)
    image = next((tmp_path / "images").iterdir())
    assert main(["classify", str(image), "--labels", "a,b", "--model", "tiny-vit", "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "CUDA is not available" in error


def test_one_set_of_image_extensions():
    from clipforge.data import captions, webdataset
    from clipforge.evaluate import datasets

    assert webdataset.IMAGE_MEMBERS == tuple(e.lstrip(".") for e in captions.IMAGE_EXTENSIONS)
    assert all(datasets.is_image_file(f"x{e}") for e in captions.IMAGE_EXTENSIONS)
    assert not datasets.is_image_file("x.txt")
