"""``clipforge convert`` and ``clipforge models``: the real ``main([...])`` on tiny checkpoints."""
from __future__ import annotations

import pytest
import torch

from clipforge import checkpoints
from clipforge.cli import main

from _checkpoint_helpers import assert_same_weights, tiny_model


@pytest.mark.parametrize("to, dst", [("clipforge", "out_folder"), ("openai", "out.pt"),
                                     ("openai", "out.safetensors"), ("hf", "out_hf")])
def test_convert_writes_a_checkpoint_with_the_same_weights(tmp_path, capsys, to, dst):
    model = tiny_model("tiny-vit")
    src = checkpoints.save(model, tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / dst), "--to", to]) == 0
    assert f"wrote {tmp_path / dst}" in capsys.readouterr().out
    assert_same_weights(model.state_dict(), checkpoints.load_model(tmp_path / dst).state_dict())


def test_convert_activation_override_is_saved_in_the_config(tmp_path):
    checkpoints.export_openai(tiny_model("tiny-vit"), tmp_path / "w.pt")
    assert main(["convert", str(tmp_path / "w.pt"), str(tmp_path / "out"), "--to", "clipforge",
                 "--activation", "gelu"]) == 0
    assert not checkpoints.load_model(tmp_path / "out").config.quick_gelu


def test_convert_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge convert: error:") and "missing.pt" in err and "\n" not in err
    src = checkpoints.save(tiny_model("tiny-rn"), tmp_path / "rn")
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "ModifiedResNet" in capsys.readouterr().err


def test_models_prints_every_architecture_with_reference_parameter_counts(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    (tmp_path / checkpoints.OPENAI_URLS["RN50"].rsplit("/", 1)[1]).write_bytes(b"")  # RN50's file is in the cache
    assert main(["models"]) == 0
    table, footer = capsys.readouterr().out.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["model", "parameters", "image", "size", "embed", "dim", "weights"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["ViT-B/32"] == ["151,277,313", "224", "512", "not", "cached"]
    assert rows["RN50"] == ["102,007,137", "224", "1024", "cached"]
    assert rows["ViT-L/14@336px"] == ["427,944,193", "336", "768", "not", "cached"]
    assert rows["tiny-vit"][-1] == "-" and {"tiny-vit", "tiny-rn"} <= set(rows)  # no released weights
    assert f"loaded by name from {tmp_path}" in footer
    assert not any(p.is_meta for p in torch.nn.Linear(1, 1).parameters())  # meta device did not leak
