"""Small things users notice: ``--version``, ``python -m clipforge``, a sub-command's own usage
for an unknown flag, wide labels aligned in ``classify``'s output, and the README's "Using a
model" snippet running on the demo's model (context length 24)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.cli.classify import display_width, format_predictions

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", *args], capture_output=True, text=True,
                          env=ENV, timeout=120)


@pytest.mark.slow
def test_python_dash_m_clipforge_is_the_command_and_has_a_version_flag():
    done = run_module("--version")  # one process: starting Python with torch costs seconds here
    assert done.returncode == 0 and done.stdout.strip() == f"clipforge {clipforge.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", clipforge.__version__)
    assert 'version = {attr = "clipforge._version.__version__"}' in (ROOT / "pyproject.toml").read_text()


def test_bare_command_and_help_list_the_sub_commands(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: clipforge") and "--version" in out
    for command in ("classify", "eval", "train", "shards"):
        assert command in out


def test_unknown_flag_shows_the_sub_commands_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "--bogus"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: clipforge train ") and "--resume" in err
    assert err.rstrip().endswith("clipforge train: error: unrecognized arguments: --bogus")
    with pytest.raises(SystemExit):
        main(["classify", "a.jpg", "--labels", "cat", "--colour", "red"])
    err = capsys.readouterr().err
    assert err.startswith("usage: clipforge classify ") and "unrecognized arguments: --colour red" in err


def test_wide_labels_line_up_in_classify_output():
    assert display_width("猫") == 2 and display_width("🐦") == 2 and display_width("e\u0301") == 1
    result = {"image": "cat.jpg", "predictions": [
        {"label": "猫", "score": 0.5}, {"label": "🐦 bird", "score": 0.25},
        {"label": "dog", "score": 0.125}, {"label": "e\u0301cole", "score": 0.0625},
        {"label": "全角ＡＢ", "score": 0.0625}]}
    lines = format_predictions(result)
    assert lines[0] == "cat.jpg"
    score_columns = {display_width(line[:line.rindex(" ") + 1]) for line in lines[1:]}
    assert score_columns == {2 + display_width("全角ＡＢ") + 2}  # indent, widest label, gap
    assert lines[1] == "  猫" + " " * 6 + "  0.5000"


def readme_snippet() -> str:
    """The first Python block of the README's "Using a model" section."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Using a model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_using_a_model_snippet_runs_on_a_saved_demo_model(tmp_path, monkeypatch):
    model = clipforge.create_model("demo-vit")
    assert model.context_length == 24
    clipforge.save(model, tmp_path / "demo-vit")
    pixels = np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat.jpg")
    code = readme_snippet()
    assert '"ViT-B-32.pt"' in code and "context_length=model.context_length" in code
    code = code.replace('"ViT-B-32.pt"', repr(str(tmp_path / "demo-vit")))
    code = code.replace('"ViT-B/16"', '"demo-vit"')  # a random ViT-B/16 would be 600 MB on disk
    monkeypatch.chdir(tmp_path)  # cat.jpg, my-model/
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["probs"].shape == (1, 2)
    assert torch.allclose(scope["probs"].sum(dim=-1), torch.ones(1))
    assert (tmp_path / "my-model" / "model.safetensors").is_file()


def test_too_long_tokens_hint_at_the_models_context_length():
    model = clipforge.create_model("demo-vit").eval()
    hint = r"clipforge\.tokenize\(texts, context_length=model\.context_length\)"
    with pytest.raises(ValueError, match=r"L <= 24, got \(1, 77\); tokenize for this model with " + hint):
        model.encode_text(clipforge.tokenize(["a photo of a cat"]))  # the default 77
    with pytest.raises(ValueError, match=r"context_length=24.*context_length=model\.context_length"):
        clipforge.tokenize(["word " * 30], context_length=24)
