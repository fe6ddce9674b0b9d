"""Settings that used to give silently wrong results (issue 16, items 6 to 9): flags beat the
preset, counts are checked, a diverged run never saves or reports bad weights, every field of a
model config.json is checked."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoints import CheckpointError
from clipforge.cli import main

from _train_data import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 16)


def _error(capsys, command="train") -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"clipforge {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_epochs_on_the_command_line_beat_the_presets_steps(capsys):
    assert main(["train", "--preset", "tiny", "--epochs", "2", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["epochs"] == 2 and config["steps"] is None
    assert main(["train", "--preset", "tiny", "--epochs", "2", "--steps", "7", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7  # both given: steps, as --help says


@pytest.mark.parametrize("flag", ["--epochs", "--steps", "--batch-size", "--chunk-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_zero_or_negative_counts_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--preset", "tiny", flag, value, "--print-config"])
    assert stop.value.code == 2
    assert f"argument {flag}: must be at least 1, got {value}" in capsys.readouterr().err


def test_epochs_zero_through_set_is_refused_even_with_steps(shapes, tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--data", str(shapes), "--set", "epochs=0",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "epochs must be >= 1, got 0" in _error(capsys)


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decay=nan", "optim.weight_decay must be a finite number >= 0, got nan"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.eps=0", "optim.eps must be a finite number > 0, got 0"),
    ("batch_size=1", "batch_size 1 gives the contrastive loss no negatives"),
])
def test_bad_optimizer_values_and_a_batch_of_one_are_refused(shapes, tmp_path, capsys, override, message):
    assert main(["train", "--preset", "tiny", "--data", str(shapes), "--set", override,
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "r").exists()


def _diverge(shapes, run_dir, lr):
    return main(["train", "--preset", "tiny", "--data", str(shapes), "--steps", "20", "--batch-size", "8",
                 "--run-dir", str(run_dir), "--lr", lr, "--set", "optim.warmup_steps=0",
                 "--set", "run.checkpoint_every=1", "--set", "run.max_nonfinite_in_row=3",
                 "--set", "run.progress=false"])


def _finite(checkpoint: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(checkpoint / "model.safetensors").values()
               if t.is_floating_point())


@pytest.mark.slow
def test_divergence_saves_nothing_while_skipping_and_names_no_checkpoint_as_good(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _diverge(shapes, run_dir, "1e30") == 2
    line = _error(capsys)
    # Step 1's update blew the weights up (1e30, still finite); steps 2-4 were non-finite.
    assert "stopped at step 4: 3 steps in a row had a non-finite loss" in line
    assert (f"Last checkpoint from before the divergence: {run_dir / 'checkpoints' / 'step_00000001'} (its weights "
            "gave the first non-finite loss, at step 2; if a resume from it diverges again, there is no earlier "
            "checkpoint)") in line
    assert "Last good checkpoint" not in line
    written = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert written == ["step_00000001"]  # none while steps were being skipped
    assert _finite(run_dir / "checkpoints" / "step_00000001")

    # Inference with those weights gives NaN scores: a message and exit 2, not "nan" and exit 0.
    image = next((shapes.parent / "images").iterdir())
    assert main(["classify", str(image), "--labels", "red,blue", "--templates", "none",
                 "--model", str(run_dir / "checkpoints" / "step_00000001")]) == 2
    assert "the model gave non-finite scores" in _error(capsys, "classify")


def test_weights_that_became_infinite_are_never_saved(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _diverge(shapes, run_dir, "1e39") == 2  # the update overflows float32 to inf at step 1
    line = _error(capsys)
    assert "stopped at step 1: the weights are no longer finite after the update, so they were not saved" in line
    assert "No checkpoint from before the divergence" in line
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save(clipforge.create_model("tiny-vit"), folder)
    return folder


@pytest.mark.parametrize("section, key, value, message", [
    (None, "quick_gelu", "no", "field quick_gelu must be true or false, got 'no'"),
    ("vision", "layers", 4.5, "field vision.layers must be a positive integer"),
    ("vision", "width", -128, "field vision.width must be a positive integer, got -128"),
    ("text", "width", "128", "field text.width must be a positive integer, got '128'"),
    ("vision", "patch_size", 0, "field vision.patch_size must be a positive integer, got 0"),
    ("text", "heads", 3, "field text.heads: 3 heads do not divide text.width 64"),
    ("vision", "image_size", 65, "field vision.image_size 65 is not a multiple of vision.patch_size 16"),
    (None, "init_logit_scale", float("nan"), "field init_logit_scale must be a finite number"),
    ("vision", "layers", [1, 2, 3], "list of 4 (ResNet)"),
])
def test_every_model_config_field_is_type_and_range_checked(model_folder, tmp_path, section, key, value, message):
    folder = tmp_path / "bad"
    shutil.copytree(model_folder, folder)
    meta = json.loads((folder / "config.json").read_text())
    (meta["config"] if section is None else meta["config"][section])[key] = value
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        clipforge.load(folder)
    assert str(err.value).startswith(f"{folder / 'config.json'}: bad clipforge config (")
    assert message in str(err.value)


def test_a_config_json_that_is_not_an_object_is_one_line(model_folder, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(model_folder, folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list, expected an object"):
        clipforge.load(folder)
