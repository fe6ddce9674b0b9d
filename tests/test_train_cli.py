"""``clipforge train``: the real ``main([...])`` on tiny data, its help, and one-line config errors."""
import io
import json
import tarfile

import pytest

from clipforge.cli import main

from _train_data import draw_shape, make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 16)


def test_cli_trains_on_tiny_data_and_saves_the_resolved_config(shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(shapes), "--steps", "2", "--batch-size", "8",
                 "--run-dir", str(run_dir), "--set", "optim.lr=2e-4", "--set", "run.progress=false"])
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["optim"]["lr"] == 2e-4 and saved["steps"] == 2 and saved["model"]["name"] == "tiny-vit"
    assert (run_dir / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "curves.png").is_file()


def test_help_is_short_and_grouped(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "what to train:" in text and "batch and length:" in text and "run:" in text
    assert len(text.splitlines()) < 50


def test_print_config_applies_preset_flags_then_overrides(capsys):
    assert main(["train", "--preset", "tiny", "--lr", "1e-3", "--set", "optim.lr=3e-4", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["optim"]["lr"] == 3e-4 and config["model"]["name"] == "tiny-vit"


def _captionless_shards(folder):
    folder.mkdir()
    with tarfile.open(folder / "data-0000.tar", "w") as tar:
        for i in range(4):
            buffer = io.BytesIO()
            draw_shape("red", "circle", i).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return str(folder / "data-{0000..0000}.tar")


@pytest.mark.parametrize("case, message", [
    ("missing data", "not found"),
    ("unknown model", "unknown model 'no-such-model'"),
    ("chunk", "chunk_size 3 must divide the per-process batch 8"),
    ("world size", "batch_size 8 is not divisible by the 3 processes"),
    ("fp16 on cpu", "fp16 needs CUDA"),
    ("captionless shards", "no captions"),
    ("bad override", "unknown config key 'optim.momentum'"),
])
def test_config_errors_fail_before_any_work_in_one_line(shapes, tmp_path, capsys, monkeypatch, case, message):
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(shapes), "--batch-size", "8", "--steps", "1", "--run-dir", str(run_dir)]
    if case == "missing data":
        args[2] = str(tmp_path / "missing.csv")
    elif case == "unknown model":
        args += ["--model", "no-such-model"]
    elif case == "chunk":
        args += ["--chunk-size", "3"]
    elif case == "world size":
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", "0")
    elif case == "fp16 on cpu":
        args += ["--precision", "fp16", "--set", "device=cpu"]
    elif case == "captionless shards":
        args[2] = _captionless_shards(tmp_path / "shards")
    elif case == "bad override":
        args += ["--set", "optim.momentum=0.9"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge train: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not run_dir.exists(), "nothing may be written before the config is known to be good"


def test_a_damaged_saved_config_is_one_line_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text("{'not': json}")
    assert main(["train", "--run-dir", str(run_dir), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_config.json: not a training config this clipforge reads" in err
