"""Audit of ``eval suite`` / ``eval zeroshot --dataset``: CLIP_benchmark's result files, few-shot
probes without leakage, ImageNet-O's own metric, and the edge cases of the inputs."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipforge.cli import main
from clipforge.cli._common import load_model_arg
from clipforge.evaluate import load_classification_data
from clipforge.evaluate.linear_probe import linear_probe
from clipforge.evaluate.protocols import evaluate_protocol, load_protocol_data
from clipforge.evaluate.protocols.ood import imagenet_o_aupr, imagenet_o_classes, in_distribution
from clipforge.evaluate.suite import parse_pairs

from _cli_errors import one_error_line
from _eval_helpers import make_color_folder
from _protocol_layouts import make_class_folders, make_wds, wnid_table

SCHEMA = ("dataset", "model", "pretrained", "task", "metrics", "language")  # clip_benchmark/cli.py's dump
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    make_color_folder(root / "colors_train", {color: [color] * 6 for color in ("red", "green", "blue")})
    make_color_folder(root / "colors_test", {color: [color] * 3 for color in ("red", "green", "blue")})
    make_wds(root / "emoji_wds", ["grinning face", "red heart", "rocket", "pizza", "cat, black"],
             templates=["an emoji of a {c}."])
    return root


def _suite(out: Path, root: Path, *args: str) -> int:
    return main(["eval", "suite", "--model", "tiny-vit", "--out", str(out), "--workers", "0",
                 "--cache-dir", str(root / "cache"), *args])


def _clip_benchmark_build(folder: Path) -> list[dict]:
    """What ``clip_benchmark build FOLDER`` does with each ``*.json`` there: metrics flattened into
    the row, the record's other keys over them, ``model_fullname`` added, one CSV (DictWriter)."""
    rows = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".json"):
            record = json.loads(path.read_text())
            row = {**record["metrics"], **record}
            del row["metrics"]
            row["model_fullname"] = row["model"] + " " + row["pretrained"]
            rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({key for row in rows for key in row}))
    writer.writeheader()
    writer.writerows(rows)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


def test_result_files_follow_clip_benchmark_schema_names_and_metrics(data, tmp_path):
    out = tmp_path / "suite"
    assert _suite(out, data, "--datasets", f"colors={data / 'colors_test'},wds/emoji={data / 'emoji_wds'}",
                  "--probe-train", f"colors={data / 'colors_train'}", "--shots", "1,2") == 0
    records = {path.name: json.loads(path.read_text()) for path in out.glob("*.json")}
    # CLIP_benchmark names a wds/ set's file without the wds/ (its dataset_slug); the record keeps it.
    assert sorted(records) == ["colors_random_tiny-vit_en_linear_probe_1shot.json",
                               "colors_random_tiny-vit_en_linear_probe_2shot.json",
                               "colors_random_tiny-vit_en_zeroshot_classification.json",
                               "emoji_random_tiny-vit_en_zeroshot_classification.json"]
    for name, record in records.items():
        assert all(key in record for key in SCHEMA) and record["language"] == "en", name
        assert name.startswith(f"{record['dataset'].removeprefix('wds/')}_{record['pretrained']}_{record['model']}_"
                               f"{record['language']}_{record['task']}")
        assert all(value is None or isinstance(value, (int, float)) for value in record["metrics"].values())
    emoji = records["emoji_random_tiny-vit_en_zeroshot_classification.json"]
    assert emoji["dataset"] == "wds/emoji" and set(emoji["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    probe = records["colors_random_tiny-vit_en_linear_probe_2shot.json"]
    # clip_benchmark/metrics/linear_probe.py's names; acc5 is null under 5 classes, as zero-shot's is.
    assert probe["task"] == "linear_probe" and probe["metrics"]["fewshot_k"] == 2 and probe["metrics"]["seed"] == 0
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= set(probe["metrics"])
    assert probe["metrics"]["lp_acc5"] is None and 0 <= probe["metrics"]["lp_mean_per_class_recall"] <= 1
    rows = _clip_benchmark_build(out)
    assert len(rows) == 4 and {row["model_fullname"] for row in rows} == {"tiny-vit random"}
    assert {row["task"] for row in rows} == {"zeroshot_classification", "linear_probe"}
    assert sum(1 for row in rows if row["fewshot_k"] == "2" and row["lp_acc1"]) == 1
    # Our own CSV keeps one probe row per shot (lp_acc1), as results.md shows it.
    ours = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["fewshot_k"], r["metric"]) for r in ours if r["task"] == "linear_probe"] == [("1", "lp_acc1"),
                                                                                          ("2", "lp_acc1")]


def test_a_probe_trained_on_test_images_is_refused(data, tmp_path, capsys):
    out = tmp_path / "suite"
    test = str(data / "colors_test")
    assert _suite(out, data, "--datasets", f"colors={test}", "--probe-train", f"colors={test}/../colors_test",
                  "--shots", "1") == 1
    assert (out / "colors_random_tiny-vit_en_zeroshot_classification.json").is_file()  # the zero-shot row stays
    assert not list(out.glob("*linear_probe*"))
    table = (out / "results.md").read_text()
    assert re.search(r"- colors \(linear probe\): .*colors_test: 9 of its 9 training images are also test images .*; "
                     r"give probe_train a split apart from the test set", table)
    capsys.readouterr()
    # Asked for by hand (a sanity check of the features), it runs and says so.
    assert main(["eval", "linear-probe", "--model", "tiny-vit", "--train", test, "--test", test, "--workers", "0",
                 "--cache-dir", str(data / "cache")]) == 0
    assert "note: " + test + ": 9 of its 9 training images are also test images" in capsys.readouterr().err


def test_probe_reports_top5_and_mean_per_class_recall_computed_by_hand():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 3
    train_y = np.repeat(np.arange(6), 10)
    test_y = np.r_[np.repeat(np.arange(6), 4), [0] * 8]  # class 0 over-represented: recall != accuracy
    train_x = centres[train_y] + rng.normal(size=(len(train_y), 8)) * 2.5
    test_x = centres[test_y] + rng.normal(size=(len(test_y), 8)) * 2.5
    report = linear_probe(train_x, train_y, test_x, test_y, few_shot=4, seed=3)
    from clipforge.evaluate.linear_probe import few_shot_split, fit_logistic

    fit_idx, val_idx = few_shot_split(train_y, 4, seed=3)
    assert len(fit_idx) == 24 and not set(fit_idx) & set(val_idx)  # exactly k per class, disjoint validation
    assert all((train_y[fit_idx] == label).sum() == 4 for label in range(6))
    model = fit_logistic(train_x[fit_idx].astype(np.float32), train_y[fit_idx], report["C"])
    probabilities = model.predict_proba(test_x.astype(np.float32))
    predicted = model.classes_[probabilities.argmax(1)]
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert report["accuracy"] == pytest.approx((predicted == test_y).mean())
    assert report["top5"] == pytest.approx(np.mean([y in model.classes_[row] for y, row in zip(test_y, top5)]))
    recall = np.mean([(predicted[test_y == label] == label).mean() for label in range(6)])
    assert report["mean_per_class_recall"] == pytest.approx(recall)
    assert linear_probe(train_x, train_y, test_x, test_y, few_shot=4, seed=3) == report  # seeded


def test_a_webdataset_missing_a_listed_shard_is_refused_not_scored_in_part(data, tmp_path, capsys):
    partial = shutil.copytree(data / "emoji_wds", tmp_path / "partial")
    (partial / "test" / "1.tar").unlink()  # nshards.txt says 2: an interrupted download
    with pytest.raises(ValueError, match=r"nshards.txt lists 2 shards \(0.tar to 1.tar\) but 1 of them is missing "
                                         r"\(1.tar\); is the download complete\?$"):
        load_protocol_data(partial, "wds")


def test_a_blank_line_inside_classnames_is_refused_and_trailing_ones_are_not(data, tmp_path):
    folder = shutil.copytree(data / "emoji_wds", tmp_path / "blank")
    (folder / "classnames.txt").write_text("grinning face\n\nred heart\nrocket\npizza\n")
    with pytest.raises(ValueError, match=r"classnames.txt: line 2 is blank; line i names class i-1"):
        load_protocol_data(folder, "wds")  # before: every later label shifted onto the next name
    (folder / "classnames.txt").write_text("grinning face\nred heart\nrocket\npizza\ncat, black\n\n\n")
    assert load_protocol_data(folder, "wds").classes[-1] == "cat, black"


def test_datasets_pairs_take_equals_and_existing_commas_in_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sets,v2").mkdir()
    assert parse_pairs("a=x=1,b=sets,v2,c=/q", "--datasets") == [("a", "x=1"), ("b", "sets,v2"), ("c", "/q")]
    with pytest.raises(ValueError, match=r"^--datasets: expected NAME=PATH\[,NAME=PATH...\], got 'v3' \(a comma is "
                                         r"read as part of a path only when that path exists; or list the sets in a "
                                         r"--config suite file\)$"):
        parse_pairs("b=sets,v3", "--datasets")
    with pytest.raises(ValueError, match=r"'a' is given twice"):
        parse_pairs("a=/x,a=/y", "--datasets")


def test_names_with_commas_and_pipes_survive_the_csv_and_the_markdown(data, tmp_path):
    (tmp_path / "tpl.txt").write_text("# one template per line\n\n{} in colour\n\n")
    (tmp_path / "suite.toml").write_text(f'[zeroshot."colors, tinted | v2"]\ndata = "{data / "colors_test"}"\n'
                                         'templates = "tpl.txt"\n')
    out = tmp_path / "suite"
    assert _suite(out, data, "--config", str(tmp_path / "suite.toml")) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {row["dataset"] for row in rows} == {"colors, tinted | v2"}
    assert "| colors, tinted \\| v2 | folder | 9 | 3 |" in (out / "results.md").read_text()
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["settings"]["templates"]["file"] == str(tmp_path / "tpl.txt")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_class_folders(root / "val", wnid_table("imagenet"))
    make_class_folders(root / "imagenet-o", wnid_table("imagenet_o"), offset=2000)
    return root


def test_in_distribution_keeps_the_images_of_imagenet_o_classes(imagenet):
    val = load_protocol_data(imagenet / "val", "imagenet")
    kept = in_distribution(val)
    assert len(kept.paths) == 200 and sorted(set(kept.labels)) == sorted(imagenet_o_classes())
    assert all(Path(path).parent.name == wnid_table("imagenet")[label] for path, label in zip(kept.paths, kept.labels))


def test_eval_zeroshot_imagenet_o_gives_the_authors_aupr_with_imagenet_val(imagenet, tmp_path, capsys):
    common = ["--model", "tiny-vit", "--dataset", "imagenet-o", "--data", str(imagenet / "imagenet-o"), "--templates",
              TEMPLATE, "--workers", "0", "--cache-dir", str(imagenet / "cache")]
    assert main(["eval", "zeroshot", *common, "--out", str(tmp_path / "plain")]) == 0
    assert "pass --imagenet-val DIR for it" in capsys.readouterr().err  # accuracy alone is not its metric
    assert main(["eval", "zeroshot", *common, "--imagenet-val", str(imagenet / "val"), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    model, preprocess = load_model_arg("tiny-vit", "cpu", 0)  # the weights the command used
    kwargs = dict(templates=TEMPLATE, preprocess=preprocess, num_workers=0, progress=False)
    normal = evaluate_protocol(model, in_distribution(load_protocol_data(imagenet / "val", "imagenet")), **kwargs)
    odd = evaluate_protocol(model, load_classification_data(imagenet / "imagenet-o", dataset="imagenet-o"), **kwargs)
    assert report["metrics"]["aupr"] == pytest.approx(imagenet_o_aupr(normal, odd), abs=1e-6)
    assert report["in_distribution"]["num_images"] == 200
    capsys.readouterr()
    assert main(["eval", "zeroshot", *common[:3], "imagenet-r", *common[4:], "--imagenet-val", "x"]) == 2
    assert "--imagenet-val goes with --dataset imagenet-o" in one_error_line(capsys, "eval")
    assert main(["eval", "zeroshot", *common, "--imagenet-val", str(imagenet / "imagenet-o")]) == 2
    assert one_error_line(capsys, "eval").startswith(f"clipforge eval: error: --imagenet-val: {imagenet / 'imagenet-o'}: "
                                                     "imagenet expects 1000 class folders")


@pytest.mark.slow  # scores 1,000 ImageNet images twice
def test_suite_imagenet_o_aupr_under_1000way_and_a_note_without_imagenet(imagenet, tmp_path):
    sets = f"imagenet={imagenet / 'val'},imagenet-o={imagenet / 'imagenet-o'}"
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert _suite(both, imagenet, "--datasets", sets, "--protocol", "1000way") == 0
    record = json.loads((both / "imagenet-o_random_tiny-vit_en_zeroshot_classification.json").read_text())
    assert record["scoring"] == "1000way" and 0 < record["metrics"]["aupr"] < 1  # before: silently absent
    assert _suite(alone, imagenet, "--datasets", sets.split(",")[1]) == 0
    record = json.loads((alone / "imagenet-o_random_tiny-vit_en_zeroshot_classification.json").read_text())
    assert "aupr" not in record["metrics"] and any("add the imagenet set" in note for note in record["notes"])
    assert "| imagenet-o | not computed: needs the imagenet set in the suite |" in (alone / "results.md").read_text()


def test_a_misspelt_protocol_over_a_release_folder_is_refused_not_scored_100(data, tmp_path, capsys):
    release = tmp_path / "objectnet"
    make_color_folder(release / "objectnet-1.0", {"images": ["red", "green"]})  # one folder: the release's top one
    out = tmp_path / "suite"
    assert _suite(out, data, "--datasets", f"objectnt={release}") == 1  # before: 100% top-1, exit 0
    assert not list(out.glob("*.json"))
    assert "is 'objectnt' a misspelt 'objectnet'?" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", "tiny-vit", "--data", str(release), "--workers", "0",
                 "--cache-dir", str(data / "cache")]) == 2
    assert one_error_line(capsys, "eval").endswith("one class ('objectnet-1.0'); zero-shot classification needs at "
                                                   "least two (is it the folder above the class folders?)")


def test_a_webdataset_shard_cut_between_two_samples_is_refused_not_read_shorter(data, tmp_path):
    import tarfile

    folder = shutil.copytree(data / "emoji_wds", tmp_path / "cut")
    shard = folder / "test" / "0.tar"
    whole = load_protocol_data(folder, "wds")
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    stems = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in members))
    cut = next(m.offset for m in members if m.name.rsplit(".", 1)[0] == stems[1])  # the second sample's header
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"0.tar: damaged: no end-of-archive block after its last member"):
        load_protocol_data(folder, "wds")  # before: read with its later samples silently gone
    assert len(whole.paths) > 2
