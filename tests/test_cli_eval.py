"""``clipforge classify`` and ``clipforge eval`` end to end: real images, the tiny preset, the real main()."""
import csv
import json

import pytest
from _eval_helpers import make_color_folder, write_tinted_image

from clipforge.cli import main

FIVE_CLASSES = {"apple": ["red"] * 2, "leaf": ["green"] * 2, "sea": ["blue"] * 2, "brick": ["red"], "moss": ["green"]}
MODEL = ["--model", "tiny-vit", "--workers", "0"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep the default feature cache (and any model lookup) inside the test's folder."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``clipforge argv``."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def errors(stderr: str) -> list[str]:
    """The stderr lines that are not the random-weights warning."""
    return [line for line in stderr.splitlines() if line and "RANDOM weights" not in line]


@pytest.fixture
def pictures(tmp_path):
    return [write_tinted_image(tmp_path / "one.jpg", "red"), write_tinted_image(tmp_path / "two.png", "blue", 1)]


def test_classify_prints_top_k_labels_with_probabilities_per_image(capsys, pictures):
    status, out, err = run(capsys, "classify", *pictures, "--labels", "dog, cat,bird", "--templates", "none",
                           "--top-k", "2", "--model", "tiny-vit")
    assert status == 0 and "RANDOM weights" in err
    lines = out.splitlines()
    assert lines[0] == str(pictures[0]) and lines[3] == str(pictures[1]) and len(lines) == 6
    scores = [float(line.split()[-1]) for line in lines[1:3]]
    assert lines[1].split()[0] in {"dog", "cat", "bird"} and scores[0] >= scores[1] and sum(scores) <= 1


def test_classify_json_gives_every_label_a_probability(capsys, pictures):
    status, out, _ = run(capsys, "classify", pictures[0], "--labels", "dog,cat,bird", "--json",
                         "--model", "tiny-vit", "--templates", "a photo of a {}.")
    result = json.loads(out)
    assert status == 0 and result[0]["image"] == str(pictures[0])
    assert sorted(p["label"] for p in result[0]["predictions"]) == ["bird", "cat", "dog"]
    assert sum(p["score"] for p in result[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_classify_skips_an_unreadable_image_names_it_and_exits_1(capsys, pictures, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\x89PNG but not really")
    status, out, err = run(capsys, "classify", pictures[0], tmp_path / "bad.jpg", "--labels", "a,b",
                           "--templates", "none", "--model", "tiny-vit")
    assert status == 1 and str(pictures[0]) in out
    assert errors(err) == [f"clipforge classify: skipped {tmp_path / 'bad.jpg'}: not a readable image "
                           "(UnidentifiedImageError: cannot identify image file "
                           f"<_io.BufferedReader name='{tmp_path / 'bad.jpg'}'>)"]


@pytest.mark.parametrize("argv, message", [
    (["--labels", "dog,cat,dog"], "label 'dog' is given twice"),
    (["--labels", " , "], "no labels given"),
    (["--labels", "a,b", "--templates", "nonsense"], "is not a file, a known dataset"),
    (["--labels", "a,b", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_classify_bad_arguments_give_one_line_and_status_2(capsys, pictures, argv, message):
    status, _, err = run(capsys, "classify", pictures[0], *argv, "--model", "tiny-vit")
    assert status == 2 and len(errors(err)) == 1 and message in err


def test_classify_missing_image_or_model(capsys, pictures, tmp_path, monkeypatch):
    status, _, err = run(capsys, "classify", tmp_path / "nope.jpg", "--labels", "a,b", "--model", "tiny-vit")
    assert status == 2 and errors(err) == [f"clipforge classify: error: {tmp_path / 'nope.jpg'}: no such file or folder"]
    monkeypatch.delenv("CLIPFORGE_MODEL", raising=False)
    status, _, err = run(capsys, "classify", pictures[0], "--labels", "a,b")
    assert status == 2 and "no model: pass --model" in err
    status, _, err = run(capsys, "classify", pictures[0], "--labels", "a,b", "--model", tmp_path / "none.pt")
    assert status == 2 and len(errors(err)) == 1 and "none.pt" in err


def test_eval_zeroshot_writes_report_and_plots_then_reuses_cached_features(capsys, tmp_path, monkeypatch):
    data = make_color_folder(tmp_path / "data", FIVE_CLASSES)
    argv = ["eval", "zeroshot", "--data", data, *MODEL, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "8 images, 5 classes, 80 templates" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    assert report["metrics"]["top5"] == 1.0  # 5 classes: the true one is always in the top 5
    assert [entry["class"] for entry in report["per_class"]] == sorted(FIVE_CLASSES)
    assert (tmp_path / "out" / "per_class_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "out" / "confusion_matrix.png").stat().st_size > 1000
    # Second run: any image decoding would fail now, so the same numbers prove the cache was used.
    monkeypatch.setattr("clipforge.evaluate.features.DataLoader", None)
    status, again, _ = run(capsys, *argv[:-2], "--json")
    assert status == 0 and json.loads(again)["metrics"] == report["metrics"]


def test_eval_zeroshot_from_a_csv_with_classnames_file(capsys, tmp_path):
    data = make_color_folder(tmp_path / "data", {"0": ["red"], "1": ["green"]})
    with open(tmp_path / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([["path", "label"], ["data/0/0.png", "0"], ["data/1/0.png", "1"]])
    (tmp_path / "names.txt").write_text("strawberry\nlime\n")
    status, out, _ = run(capsys, "eval", "zeroshot", "--data", tmp_path / "labels.csv", "--classnames",
                         tmp_path / "names.txt", "--templates", "none", *MODEL, "--no-cache", "--json")
    report = json.loads(out)
    assert status == 0 and [e["name"] for e in report["per_class"]] == ["strawberry", "lime"]
    assert data.exists()


def test_eval_zeroshot_bad_data_each_give_one_clear_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    status, _, err = run(capsys, "eval", "zeroshot", "--data", tmp_path / "empty", *MODEL)
    assert status == 2 and errors(err) == [f"clipforge eval: error: {tmp_path / 'empty'}: no class sub-folders; "
                                           "expected one sub-folder of images per class"]
    data = make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    (data / "hollow").mkdir()
    (data / "hollow" / "readme.txt").write_text("no pictures here")
    status, _, err = run(capsys, "eval", "zeroshot", "--data", data, *MODEL)
    assert status == 2 and errors(err) == [f"clipforge eval: error: {data}: 1 class folder(s) hold no images: 'hollow'"]
    (tmp_path / "list.csv").write_text("path,label\ndata/red/0.png,red\ndata/red/lost.png,red\n")
    status, _, err = run(capsys, "eval", "zeroshot", "--data", tmp_path / "list.csv", *MODEL)
    assert status == 2 and len(errors(err)) == 1 and "1 of 2 listed images are missing" in err


def test_eval_zeroshot_counts_unreadable_images_and_exits_1(capsys, tmp_path):
    data = make_color_folder(tmp_path / "data", {"red": ["red", "red"], "blue": ["blue"]})
    (data / "blue" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    status, out, err = run(capsys, "eval", "zeroshot", "--data", data, "--templates", "none", *MODEL, "--no-cache")
    assert status == 1 and "3 images, 2 classes" in out
    assert len(errors(err)) == 1
    assert errors(err)[0].startswith(f"warning: skipped 1 unreadable image(s): {data / 'blue' / 'cut.jpg'} "
                                     "(not a readable image")


def test_eval_retrieval_prints_recall_both_ways_and_handles_missing_images(capsys, tmp_path):
    rows = [["image", "caption"]]
    for i, color in enumerate(["red", "green", "blue"]):
        write_tinted_image(tmp_path / "img" / f"{i}.jpg", color, i)
        rows += [[f"img/{i}.jpg", f"a {color} photo"], [f"img/{i}.jpg", f"{color} things"]]
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    status, out, _ = run(capsys, "eval", "retrieval", "--data", tmp_path / "captions.csv", *MODEL, "--no-cache",
                         "--out", tmp_path / "out")
    assert status == 0 and "3 images, 6 captions" in out
    assert out.splitlines()[1].startswith("image->text  R@1 ") and out.splitlines()[2].startswith("text->image  R@1 ")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["image_to_text_recall@10"] == 1.0  # only 6 captions: always within 10

    with open(tmp_path / "captions.csv", "a", newline="") as file:
        csv.writer(file).writerow(["img/lost.jpg", "a photo that is not there"])
    status, _, err = run(capsys, "eval", "retrieval", "--data", tmp_path / "captions.csv", *MODEL)
    assert status == 2 and len(errors(err)) == 1 and "1 of 4 listed images are missing" in err and "lost.jpg" in err
    status, out, err = run(capsys, "eval", "retrieval", "--data", tmp_path / "captions.csv", *MODEL, "--no-cache",
                           "--skip-missing")
    assert status == 0 and "3 images, 6 captions" in out and "note: dropped 1 missing images" in err


def test_eval_linear_probe_prints_accuracy_and_chosen_c(capsys, tmp_path):
    layout = {"red": ["red"] * 3, "green": ["green"] * 3, "blue": ["blue"] * 3}
    train = make_color_folder(tmp_path / "train", layout)
    test = make_color_folder(tmp_path / "test", {k: v[:1] for k, v in layout.items()})
    status, out, _ = run(capsys, "eval", "linear-probe", "--train", train, "--test", test, *MODEL, "--no-cache")
    assert status == 0 and out.splitlines()[0] == \
        "linear probe, 9 training images (3 first held out to choose C), 3 test images"
    assert out.splitlines()[1].startswith("accuracy  ") and out.splitlines()[2].startswith("C         ")
    status, out, _ = run(capsys, "eval", "linear-probe", "--train", train, "--test", test, *MODEL, "--no-cache",
                         "--few-shot", "1", "--json")
    report = json.loads(out)
    assert status == 0 and report["few_shot"] == 1 and report["num_train"] == 3 and 0 <= report["accuracy"] <= 1
    status, _, err = run(capsys, "eval", "linear-probe", "--train", train, "--test", test, *MODEL, "--few-shot", "0")
    assert status == 2 and "--few-shot must be at least 1" in err


def test_model_checkpoint_is_loaded_through_clipforge_load(capsys, pictures, tmp_path):
    import torch

    import clipforge
    from clipforge.checkpoints import save
    from clipforge.evaluate import classify

    torch.manual_seed(3)
    model = clipforge.create_model("tiny-vit").eval()
    save(model, tmp_path / "ckpt")
    status, out, err = run(capsys, "classify", pictures[0], "--labels", "dog,cat", "--templates", "none",
                           "--model", tmp_path / "ckpt", "--json")
    assert status == 0 and "RANDOM" not in err
    expected = classify(model, [str(pictures[0])], ["dog", "cat"], templates=None)
    got = json.loads(out)[0]["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in expected[0]["predictions"]]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected[0]["predictions"]], abs=1e-5)
