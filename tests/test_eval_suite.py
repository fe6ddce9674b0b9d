"""``clipforge eval suite``: many layouts in one run, CLIP_benchmark JSONs, table, plots, resume."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.evaluate import load_classification_data
from clipforge.evaluate.protocols import evaluate_protocol
from clipforge.evaluate._suite_report import plot_effective_robustness
from clipforge.evaluate._suite_tasks import imagenet_o_aupr

from _eval_helpers import make_color_folder
from _protocol_layouts import demo_images, make_class_folders, make_objectnet, make_wds, wnid_table

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

TEMPLATE = "a photo of a {}."
SCHEMA = {"dataset", "model", "pretrained", "task", "metrics", "language"}


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    make_class_folders(root / "imagenet", wnid_table("imagenet"))
    make_class_folders(root / "imagenet-r", wnid_table("imagenet_r"), offset=1000)
    make_class_folders(root / "imagenet-o", wnid_table("imagenet_o"), offset=2000)
    make_objectnet(root / "objectnet")
    make_wds(root / "emoji_wds", ["grinning face", "red heart", "rocket", "pizza"], templates=["an emoji of a {c}."])
    # Real photos tinted red, green or blue: a probe on any image features separates them.
    make_color_folder(root / "colors_train", {color: [color] * 12 for color in ("red", "green", "blue")})
    make_color_folder(root / "colors_test", {color: [color] * 6 for color in ("red", "green", "blue")})
    demo = demo_images()[0].parents[2]
    (root / "heldout.jsonl").write_text("".join(
        line for line in (demo / "heldout.jsonl").read_text().splitlines(keepends=True)[:60]))
    shutil.copytree(demo / "images" / "noto", root / "images" / "noto")
    shutil.copytree(demo / "images" / "twemoji", root / "images" / "twemoji")
    shutil.copytree(demo / "images" / "tuxpaint", root / "images" / "tuxpaint")
    shutil.copytree(demo / "images" / "openclipart", root / "images" / "openclipart")
    (root / "suite.toml").write_text(f"""
shots = [1, 2, 4]
[zeroshot.imagenet]
data = "imagenet"
templates = "{TEMPLATE}"
[zeroshot.imagenet-sketch]
data = "imagenet"
templates = "{TEMPLATE}"
[zeroshot.imagenet-r]
data = "imagenet-r"
templates = "{TEMPLATE}"
[zeroshot.imagenet-o]
data = "imagenet-o"
templates = "{TEMPLATE}"
[zeroshot.objectnet]
data = "objectnet"
templates = "{TEMPLATE}"
[zeroshot.emoji_wds]
data = "emoji_wds"
[zeroshot.colors]
data = "colors_test"
templates = "none"
probe_train = "colors_train"
[retrieval.heldout]
data = "heldout.jsonl"
""")
    return root


def _run(root: Path, out: Path, *extra: str) -> int:
    return main(["eval", "suite", "--model", "tiny-vit", "--config", str(root / "suite.toml"), "--out", str(out),
                 "--workers", "0", "--cache-dir", str(root / "cache"), *extra])


@pytest.fixture(scope="module")
def suite_run(suite_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "suite"
    assert _run(suite_data, out) == 0
    return suite_data, out


def _records(out: Path) -> dict[tuple[str, str], dict]:
    records = {}
    for path in out.glob("*.json"):
        record = json.loads(path.read_text())
        records[(record["dataset"], record["task"] + str(record.get("fewshot_k", "")))] = record
    return records


def test_suite_writes_one_clip_benchmark_json_per_dataset_and_task(suite_run):
    _, out = suite_run
    records = _records(out)
    expected = {("imagenet", "zeroshot_classification"), ("imagenet-sketch", "zeroshot_classification"),
                ("imagenet-r", "zeroshot_classification"), ("imagenet-o", "zeroshot_classification"),
                ("objectnet", "zeroshot_classification"), ("emoji_wds", "zeroshot_classification"),
                ("colors", "zeroshot_classification"), ("colors", "linear_probe1"), ("colors", "linear_probe2"),
                ("colors", "linear_probe4"), ("heldout", "zeroshot_retrieval")}
    assert set(records) == expected
    for record in records.values():
        assert SCHEMA <= set(record) and record["language"] == "en"
        assert record["model"] == "tiny-vit" and record["pretrained"] == "random"
    assert set(records["imagenet-r", "zeroshot_classification"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert (out / "imagenet-r_random_tiny-vit_en_zeroshot_classification.json").is_file()
    assert set(records["heldout", "zeroshot_retrieval"]["metrics"]) == {
        f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in (1, 5, 10)}


def test_suite_numbers_equal_the_single_dataset_evaluation(suite_run):
    root, out = suite_run
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    data = load_classification_data(root / "imagenet-r", dataset="imagenet-r")
    cached = dict(templates=[TEMPLATE], progress=False, cache_dir=root / "cache")  # the suite's features
    direct = evaluate_protocol(model, data, **cached)
    record = _records(out)["imagenet-r", "zeroshot_classification"]
    assert record["metrics"]["acc1"] == direct.metrics["top1"] and record["num_classes"] == 200
    # ImageNet-O's detection AUPR from the same two sets, recomputed here.
    imagenet = evaluate_protocol(model, load_classification_data(root / "imagenet", dataset="imagenet"), **cached)
    o_data = load_classification_data(root / "imagenet-o", dataset="imagenet-o")
    o_result = evaluate_protocol(model, o_data, **cached)
    aupr = imagenet_o_aupr(imagenet, o_result, [hits[0] for hits in o_data.label_hits])
    assert _records(out)["imagenet-o", "zeroshot_classification"]["metrics"]["aupr"] == pytest.approx(aupr)
    assert 0 < aupr < 1


def test_suite_table_csv_and_plots(suite_run):
    _, out = suite_run
    table = (out / "results.md").read_text()
    assert "| imagenet-r | imagenet-r (subset) | 200 | 200 |" in table
    assert "| colors | folder | 18 | 3 |" in table and "4-shot probe" in table and "## Retrieval recall" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    probe = [r for r in rows if r["task"] == "linear_probe" and r["fewshot_k"] == "4"]
    assert len(probe) == 1 and float(probe[0]["value"]) >= 0.9  # tints: far above the 1/3 of chance
    for name in ("effective_robustness.png", "zeroshot_vs_fewshot.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_effective_robustness_needs_imagenet_and_a_shifted_set(tmp_path):
    record = lambda name, protocol, acc: {"dataset": name, "protocol": protocol, "task": "zeroshot_classification",
                                          "metrics": {"acc1": acc}}
    assert plot_effective_robustness([record("imagenet-r", "imagenet-r", 0.3)], tmp_path / "a.png") is None
    path = plot_effective_robustness([record("val", "imagenet", 0.6), record("r", "imagenet-r", 0.3)], tmp_path / "b.png")
    assert path.is_file()


def test_skip_existing_reuses_finished_results_and_redoes_missing_ones(suite_run, tmp_path):
    root, first = suite_run
    out = tmp_path / "resumed"
    shutil.copytree(first, out)
    kept = out / "imagenet-r_random_tiny-vit_en_zeroshot_classification.json"
    record = json.loads(kept.read_text())
    record["metrics"]["acc1"] = 0.123456  # marks the file: a rerun would overwrite it
    kept.write_text(json.dumps(record))
    (out / "colors_random_tiny-vit_en_linear_probe_2shot.json").unlink()  # as if interrupted there
    assert _run(root, out, "--skip-existing") == 0
    assert json.loads(kept.read_text())["metrics"]["acc1"] == 0.123456
    assert "| imagenet-r | imagenet-r (subset) | 200 | 200 | 12.35 |" in (out / "results.md").read_text()
    redone = json.loads((out / "colors_random_tiny-vit_en_linear_probe_2shot.json").read_text())
    assert redone == json.loads((first / "colors_random_tiny-vit_en_linear_probe_2shot.json").read_text())


def test_a_broken_dataset_is_reported_and_the_others_still_run(suite_data, tmp_path, capsys):
    out = tmp_path / "partial"
    code = main(["eval", "suite", "--model", "tiny-vit", "--out", str(out), "--workers", "0", "--no-cache",
                 "--datasets", f"imagenet-a={suite_data / 'imagenet-r'},colors={suite_data / 'colors_test'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: imagenet-a:" in err and "imagenet-a expects 200 class folders named by wnid" in err
    assert (out / "colors_random_tiny-vit_en_zeroshot_classification.json").is_file()
    assert "## Not evaluated" in (out / "results.md").read_text()


def test_suite_arguments_are_checked_before_any_model_runs(tmp_path, capsys):
    assert main(["eval", "suite", "--model", "tiny-vit", "--out", str(tmp_path)]) == 2
    assert "pass either --config" in capsys.readouterr().err
    assert main(["eval", "suite", "--model", "tiny-vit", "--out", str(tmp_path), "--datasets", "imagenet"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[zeroshot.x]\npath = 'y'\n")
    assert main(["eval", "suite", "--model", "tiny-vit", "--out", str(tmp_path), "--config", str(tmp_path / "bad.toml")]) == 2
    assert "[zeroshot.x] needs data = PATH" in capsys.readouterr().err


def _json(out: Path, dataset: str, task: str = "zeroshot_classification") -> dict:
    return json.loads((out / f"{dataset}_random_tiny-vit_en_{task}.json").read_text())


def _datasets(out: Path, datasets: str, *extra: str) -> int:
    return main(["eval", "suite", "--model", "tiny-vit", "--out", str(out), "--workers", "0", "--no-cache",
                 "--datasets", datasets, *extra])


def test_skip_existing_recomputes_results_of_other_settings(suite_data, tmp_path, capsys):
    out = tmp_path / "settings"
    assert _datasets(out, f"imagenet-r={suite_data / 'imagenet-r'}") == 0
    assert _json(out, "imagenet-r")["scoring"] == "subset"
    assert _datasets(out, f"imagenet-r={suite_data / 'imagenet-r'}", "--protocol", "1000way", "--skip-existing") == 0
    assert "computed with other settings" in capsys.readouterr().err
    assert _json(out, "imagenet-r")["scoring"] == "1000way"
    assert "imagenet-r (1000way)" in (out / "results.md").read_text()
    # Another data path is another result: refused as missing, never answered from the old file.
    assert _datasets(out, f"imagenet-r={tmp_path / 'nowhere'}", "--protocol", "1000way", "--skip-existing") == 1
    assert "## Not evaluated" in (out / "results.md").read_text()
    (out / "imagenet-r_random_tiny-vit_en_zeroshot_classification.json").write_text("{}")  # not a result
    assert _datasets(out, f"imagenet-r={suite_data / 'imagenet-r'}", "--skip-existing") == 0
    assert _json(out, "imagenet-r")["scoring"] == "subset"


def test_a_resumed_suite_keeps_the_imagenet_o_aupr(suite_run, tmp_path):
    root, first = suite_run
    out = tmp_path / "resumed-o"
    shutil.copytree(first, out)
    (out / "imagenet-o_random_tiny-vit_en_zeroshot_classification.json").unlink()  # stopped after ImageNet
    assert _run(root, out, "--skip-existing") == 0
    aupr = _json(first, "imagenet-o")["metrics"]["aupr"]
    assert _json(out, "imagenet-o")["metrics"]["aupr"] == pytest.approx(aupr)
    assert f"| imagenet-o | {100 * aupr:.2f} |" in (out / "results.md").read_text()


def test_an_unexpected_failure_of_one_set_leaves_the_others(suite_data, tmp_path, monkeypatch, capsys):
    from clipforge.evaluate import _suite_tasks

    real_load = _suite_tasks._load

    def load(entry, *args, **kwargs):
        if entry.name == "broken":
            raise RuntimeError("the reader broke")
        return real_load(entry, *args, **kwargs)

    monkeypatch.setattr(_suite_tasks, "_load", load)
    out = tmp_path / "unexpected"
    code = _datasets(out, f"broken={suite_data / 'colors_test'},colors={suite_data / 'colors_test'}")
    assert code == 1
    assert "error: broken: RuntimeError: the reader broke" in capsys.readouterr().err
    assert _json(out, "colors")["metrics"]["acc1"] is not None
    assert "- broken: RuntimeError: the reader broke" in (out / "results.md").read_text()


def test_a_failing_probe_shot_keeps_the_other_shots_and_the_zero_shot_row(suite_data, tmp_path, capsys):
    out = tmp_path / "probes"
    code = _datasets(out, f"colors={suite_data / 'colors_test'}", "--probe-train",
                     f"colors={suite_data / 'colors_train'}", "--shots", "1,20")
    assert code == 1
    assert "error: colors: class 'blue' has 12 training images, fewer than the 20 per class" in capsys.readouterr().err
    assert _json(out, "colors", "linear_probe_1shot")["fewshot_k"] == 1
    table = (out / "results.md").read_text()
    assert "1-shot probe" in table and "- colors (20-shot probe): class" in table
    assert table.count("| colors |") == 1  # the zero-shot row, with its 1-shot probe


def test_plots_of_an_earlier_run_do_not_outlive_it(suite_data, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "effective_robustness.png").write_bytes(b"an earlier run's plot")
    assert _datasets(out, f"colors={suite_data / 'colors_test'}") == 0
    assert not (out / "effective_robustness.png").exists()


def test_a_folder_of_wnids_under_a_plain_name_is_refused(suite_data, tmp_path, capsys):
    assert _datasets(tmp_path / "typo", f"imagenetr={suite_data / 'imagenet-r'}") == 1
    assert "class folders are ImageNet wnids (n01443537, ...) but 'imagenetr' names no protocol" in \
        capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("data = 5", "data must be a non-empty string, got 5"),
    ("data = 'x'\ntemplates = 5", "templates must be a string or a list of strings, got 5"),
    ("data = 'x'\nprobe_train = 5", "probe_train must be a non-empty string, got 5"),
])
def test_suite_file_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, line, message):
    assert "suite.toml: zeroshot.x: " + message in _suite_file_error(tmp_path, capsys, f"[zeroshot.x]\n{line}\n")


def _suite_file_error(tmp_path, capsys, text: str) -> str:
    """The one error line of ``eval suite`` on a suite file holding ``text`` (exit status 2)."""
    (tmp_path / "suite.toml").write_text(text)
    assert main(["eval", "suite", "--model", "tiny-vit", "--out", str(tmp_path / "o"), "--config",
                 str(tmp_path / "suite.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_shots_are_whole_numbers_and_out_and_names_are_checked_first(tmp_path, capsys):
    from clipforge.evaluate.suite import parse_shots

    assert parse_shots(4) == [4] and parse_shots("1,2") == [1, 2]
    for bad in ([1.5], [True], "x", 2.0):
        with pytest.raises(ValueError, match="shots must be"):
            parse_shots(bad)
    (tmp_path / "afile").write_text("")
    assert _datasets(tmp_path / "afile", "a=x") == 2
    assert "--out " + str(tmp_path / "afile") + ": is a file" in capsys.readouterr().err
    assert _datasets(tmp_path / "o", "a=x,a=y") == 2
    assert "'a' is given twice" in capsys.readouterr().err


def test_reference_models_of_the_suite_file_are_the_points_of_the_robustness_plot(suite_data, tmp_path, monkeypatch):
    from clipforge.evaluate import _suite_report

    plotted = []
    real = _suite_report.reference_points
    monkeypatch.setattr(_suite_report, "reference_points",
                        lambda references, protocol: plotted.append(real(references, protocol)) or plotted[-1])
    sets = "".join(f'[zeroshot.{name}]\ndata = "{suite_data / name}"\ntemplates = "{TEMPLATE}"\n'
                   for name in ("imagenet", "imagenet-r"))
    (tmp_path / "suite.toml").write_text(sets + """
[references."ResNet-50 (torchvision)"]
imagenet = 76.1
imagenet-r = 36.2
[references."my model"]
imagenet = 80
imagenet-sketch = 30
""")
    out = tmp_path / "out"
    assert main(["eval", "suite", "--model", "tiny-vit", "--config", str(tmp_path / "suite.toml"), "--out", str(out),
                 "--workers", "0"]) == 0
    assert plotted == [[("ResNet-50 (torchvision)", 76.1, 36.2)]]  # "my model" reports no ImageNet-R
    with Image.open(out / "effective_robustness.png") as image:
        assert image.format == "PNG"
    # Without [references]: the paper's supervised ResNet-101 (Figure 13).
    assert real(_suite_report.SUPERVISED_REFERENCE, "imagenet-r") == [
        ("supervised ResNet-101 (CLIP paper, Fig. 13)", 76.2, 37.7)]


@pytest.mark.parametrize("table, message", [
    ('[references.a]\nimagenet-r = 30', 'references.a must give imagenet and at least one of'),
    ('[references.a]\nimagenet = 70\nimagenet-c = 30', "references.a: unknown set(s) ['imagenet-c']"),
    ('[references.a]\nimagenet = 70\nimagenet-r = 130', 'references.a.imagenet-r must be a top-1 in % (0 to 100), got 130'),
    ('[references.a]\nimagenet = true\nimagenet-r = 30', 'references.a.imagenet must be a top-1 in %'),
    ('references = 5', 'references must hold [references."NAME"] tables of top-1 %, got 5'),
])
def test_bad_reference_models_are_one_line_errors(tmp_path, capsys, table, message):
    assert message in _suite_file_error(tmp_path, capsys, f"{table}\n[zeroshot.x]\ndata = 'x'\n")
