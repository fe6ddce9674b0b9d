"""Audit of ``clipforge eval``'s outputs and messages end to end: real images, the tiny preset, the real main()."""
import csv
import json

import pytest
from _eval_helpers import RecordingBar, make_color_folder, write_tinted_image

from clipforge.cli import main

from _cli_errors import error_lines as errors, run_cli as run

MODEL = ["--model", "tiny-vit", "--workers", "0", "--no-cache"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep the default feature cache (and any model lookup) inside the test's folder."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))


def captions_csv(tmp_path):
    rows = [["image", "caption"]]
    for i, color in enumerate(["red", "green", "blue"]):
        write_tinted_image(tmp_path / "img" / f"{i}.jpg", color, i)
        rows += [[f"img/{i}.jpg", f"a {color} photo"]]
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return tmp_path / "captions.csv"


def test_a_report_without_plots_replaces_a_zeroshot_report_and_its_plots_and_says_so(capsys, tmp_path):
    data = make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    out = tmp_path / "out"
    status, stdout, _ = run(capsys, "eval", "zeroshot", "--data", data, "--templates", "none", *MODEL, "--out", out)
    assert status == 0 and (out / "per_class_accuracy.png").is_file() and (out / "confusion_matrix.png").is_file()
    assert "replacing" not in stdout
    status, stdout, _ = run(capsys, "eval", "retrieval", "--data", captions_csv(tmp_path), *MODEL, "--out", out)
    # The zero-shot plots would otherwise sit beside a retrieval report.json they do not belong to.
    assert status == 0 and sorted(path.name for path in out.iterdir()) == ["report.json"]
    assert json.loads((out / "report.json").read_text())["task"] == "retrieval"
    assert stdout.splitlines()[-1] == f"wrote {out / 'report.json'} (replacing a zeroshot report written there before)"
    status, stdout, err = run(capsys, "eval", "linear-probe", "--train", data, "--test", data, *MODEL, "--out", out,
                              "--json")
    assert status == 0 and json.loads(stdout)["task"] == "linear-probe"
    assert f"note: {out / 'report.json'} replaced a retrieval report written there before" in errors(err)


@pytest.mark.parametrize("task", ["retrieval", "linear-probe"])
def test_out_help_promises_plots_only_where_they_are_drawn(capsys, task):
    with pytest.raises(SystemExit):
        main(["eval", task, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR write report.json here, replacing an earlier run's" in text and "plots" not in text


def test_zeroshot_out_help_names_its_plots(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR write report.json and plots (per-class accuracy, confusion matrix) here" in text


def test_a_classnames_file_with_a_number_for_a_name_is_one_line_naming_it(capsys, tmp_path):
    data = make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    (tmp_path / "names.json").write_text('{"red": "strawberry", "blue": 7}')
    status, _, err = run(capsys, "eval", "zeroshot", "--data", data, "--classnames", tmp_path / "names.json", *MODEL)
    assert status == 2 and errors(err) == [f"clipforge eval: error: {tmp_path / 'names.json'}: class name 7 must be "
                                           "a non-empty string or list of strings"]


def test_a_missing_image_of_a_zeroshot_csv_suggests_only_options_zeroshot_has(capsys, tmp_path):
    make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    (tmp_path / "list.csv").write_text("path,label\ndata/red/0.png,red\ndata/blue/lost.png,blue\n")
    status, _, err = run(capsys, "eval", "zeroshot", "--data", tmp_path / "list.csv", *MODEL)
    assert status == 2 and len(errors(err)) == 1
    assert errors(err)[0].endswith("e.g. '" + str(tmp_path / "data/blue/lost.png") + "'; pass the image folder "
                                   "(--images) or remove their rows")


def test_classify_shows_progress_unless_printing_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tqdm.auto.tqdm", RecordingBar)
    pictures = [write_tinted_image(tmp_path / f"{i}.jpg", color, i) for i, color in enumerate(["red", "blue"])]
    for extra, disabled in (([], None), (["--json"], True)):
        RecordingBar.made = []
        status, out, _ = run(capsys, "classify", *pictures, "--labels", "red,blue", "--templates", "none",
                             "--model", "tiny-vit", *extra)
        assert status == 0 and str(pictures[1]) in out
        bars = {bar.desc: bar for bar in RecordingBar.made}
        assert bars["images"].disable is disabled and bars["images"].count == 2
        assert bars["prompts"].disable is disabled


@pytest.mark.parametrize("task, promise", [
    ("linear-probe", "--few-shot K train on K images per class, C chosen on up to K others per class"),
    ("linear-probe", "--val-fraction F share of each class's training images held out to choose C, then trained on "
                     "too (default 0.2; not used with --few-shot)"),
    ("retrieval", "--split SPLIT with a Karpathy split JSON, the split to score (default: test); the other formats "
                  "have no splits, so every pair is scored"),
])
def test_help_says_when_an_option_applies(capsys, task, promise):
    with pytest.raises(SystemExit):
        main(["eval", task, "--help"])
    assert promise in " ".join(capsys.readouterr().out.split())
