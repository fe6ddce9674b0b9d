"""Audit of the evaluation library: exact metric values, honest notes, and listings that stop with
one message naming the file. Real tinted images and ``ColorCLIP`` (known answers) throughout."""
import csv
import json

import numpy as np
import pytest
import torch
from _eval_helpers import ColorCLIP, RecordingBar, make_color_folder, write_tinted_image

from clipforge.evaluate import (evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot, linear_probe,
                                load_classification_data, load_retrieval_data, metadata, recall_at_k,
                                resolve_classnames, resolve_templates, topk_accuracy)


def test_accuracy_and_recall_are_exact_fractions_not_float32_means(tmp_path):
    scores = torch.zeros(200, 3)
    scores[3:, 1] = 1.0  # only the first 3 of 200 rows rank their target (class 0) first
    assert topk_accuracy(scores, torch.zeros(200, dtype=torch.long), ks=(1,))[1] == 3 / 200  # not 0.01499999966
    assert recall_at_k(torch.tensor([0, 5, 5]), ks=(1, 10)) == {1: 1 / 3, 10: 1.0}
    # End to end on real images: the green-tinted image filed under "red" is the one miss of three.
    data = load_classification_data(make_color_folder(tmp_path / "data", {"red": ["red", "green"], "blue": ["blue"]}))
    result = evaluate_zeroshot(ColorCLIP(), data, templates=None, progress=False)
    assert result.metrics["top1"] == 2 / 3
    assert json.dumps(result.metrics["top1"]) == json.dumps(2 / 3)


def _captioned_images(tmp_path, captions_per_image: int, colors=("red", "blue")) -> str:
    rows = [["image", "caption"]]
    for i, color in enumerate(colors):
        write_tinted_image(tmp_path / "images" / f"{i}.jpg", color, i)
        rows += [[f"images/{i}.jpg", f"{color} number {n}"] for n in range(captions_per_image)]
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return str(tmp_path / "captions.csv")


def _brute_force_image_to_text_recall(report_data, k: int) -> float:
    """Recall@k of image-to-text, from ColorCLIP's embeddings by numpy (no clipforge metric code)."""
    model = ColorCLIP()
    from clipforge.evaluate import encode_images, encode_texts
    from clipforge.transforms import image_transform

    images = encode_images(model, report_data.image_paths, image_transform(32), progress=False).features.numpy()
    texts = encode_texts(model, report_data.texts).numpy()
    scores = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ \
        (texts / np.linalg.norm(texts, axis=1, keepdims=True)).T  # (I, T)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (I, k)
    owner = np.array(report_data.text_to_image)
    return float((owner[top] == np.arange(len(images))[:, None]).any(axis=1).mean())


def test_trivial_recall_note_counts_the_captions_each_image_has(tmp_path):
    # 2 images x 3 captions: an image's best caption ranks 4th at worst among 6, so image-to-text
    # R@5 is 100% whatever the model; only "@10" (k >= 6 captions) used to be noted.
    data = load_retrieval_data(_captioned_images(tmp_path, 3))
    report = evaluate_retrieval(ColorCLIP(), data, progress=False)
    assert report["metrics"]["image_to_text_recall@5"] == 1.0 == _brute_force_image_to_text_recall(data, 5)
    assert report["metrics"]["image_to_text_recall@1"] == _brute_force_image_to_text_recall(data, 1)
    assert report["notes"] == [
        "text-to-image recall@5, @10 is 100% by construction: only 2 images to rank",
        "image-to-text recall@5, @10 is 100% by construction: 6 captions to rank and every image has at least 3 "
        "of them, so its best caption ranks 4 or better"]


def test_coco_like_five_captions_per_image_note_only_what_cannot_miss(tmp_path):
    # 3 images x 5 captions: the best caption can rank 11th of 15, so no image-to-text recall is trivial.
    data = load_retrieval_data(_captioned_images(tmp_path, 5, ("red", "green", "blue")))
    report = evaluate_retrieval(ColorCLIP(), data, progress=False)
    assert report["num_images"] == 3 and report["num_texts"] == 15
    assert report["notes"] == ["text-to-image recall@5, @10 is 100% by construction: only 3 images to rank"]
    assert report["metrics"]["image_to_text_recall@1"] == _brute_force_image_to_text_recall(data, 1) == 1.0


def test_missing_images_of_a_classification_csv_name_no_retrieval_only_flag(tmp_path):
    make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    (tmp_path / "list.csv").write_text("path,label\ndata/red/0.png,red\ndata/blue/9.png,blue\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 listed images are missing") as caught:
        load_classification_data(tmp_path / "list.csv")
    assert "--skip-missing" not in str(caught.value)  # eval zeroshot / linear-probe have no such option
    assert str(caught.value).endswith("pass the image folder (--images) or remove their rows")


@pytest.mark.parametrize("name, content, message", [
    ("names.txt", b"\xff\xfered\nblue\n", r"names\.txt: not UTF-8 text \(byte 0"),
    ("names.json", b'{"red": 5, "blue": "sea"}', r"names\.json: class name 5 must be a non-empty string"),
    ("names.json", b'["red", ["blue", null]]', r"names\.json: class name \['blue', None\] must be"),
    ("names.json", b'"rb"', r'names\.json: expected a JSON list or object, got str "rb"'),
    ("names.json", b'["sea", "sea"]', r"names\.json: label 'sea' is given twice"),
])
def test_bad_classnames_files_stop_with_a_message_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        resolve_classnames(str(tmp_path / name), ["blue", "red"])


def test_bad_templates_files_and_folders_name_themselves(tmp_path):
    (tmp_path / "templates.txt").write_bytes(b"a \xff photo of {}\n")
    with pytest.raises(ValueError, match=r"templates\.txt: not UTF-8 text \(byte 2: invalid start byte\)"):
        resolve_templates(str(tmp_path / "templates.txt"))
    (tmp_path / "prompts").mkdir()
    with pytest.raises(ValueError, match=r"templates '.*prompts' is a folder; expected a templates file"):
        resolve_templates(str(tmp_path / "prompts"))


def test_integer_class_folders_take_a_names_list_in_numeric_order(tmp_path):
    # Folders 1, 2, 10 sort as text to 1, 10, 2; a names list for them is written 1, 2, 10.
    data = load_classification_data(make_color_folder(tmp_path / "data", {"1": ["red"], "2": ["green"],
                                                                          "10": ["blue"]}))
    assert data.classes == ["1", "10", "2"]
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    result = evaluate_zeroshot(ColorCLIP(), data, str(tmp_path / "names.txt"), templates=None, progress=False)
    assert result.classnames == ["red", "blue", "green"] and result.metrics["top1"] == 1.0
    # Oxford Flowers released as folders 1..102 with the built-in (label-order) names.
    flowers = resolve_classnames("flowers", sorted(str(i) for i in range(1, 103)))
    assert flowers[sorted(str(i) for i in range(1, 103)).index("10")] == metadata.classnames("flowers")[9]
    # 0..N-1 keeps its index alignment, and names that match the folders still align by name.
    assert resolve_classnames(["zero", "one", "two"], ["0", "1", "2"]) == ["zero", "one", "two"]
    assert resolve_classnames(["b", "a"], ["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("listing, message", [
    ({"images": [{"filename": "r.jpg", "split": "test", "sentences": [{"tokens": ["red"]}]}]},
     r"image 'r\.jpg': each sentence needs a 'raw' caption"),
    ({"images": [{"file": "r.jpg", "split": "test", "sentences": [{"raw": "red"}]}]},
     r"images entry 1 needs 'filename' and a 'sentences' list \(Karpathy split\), got \['file', 'sentences'"),
    ({"images": ["r.jpg"]}, r"images entry 1 needs 'filename' and a 'sentences' list \(Karpathy split\), got str"),
    ({"images": [{"filename": "r.jpg", "split": "test", "sentences": ["red"]}]},
     r"image 'r\.jpg': each sentence needs a 'raw' caption, got \"red\""),
    ([{"image": "r.jpg", "caption": 5}], r"record 1: a caption must be a string, got 5"),
    ([{"image": "r.jpg", "captions": ["red", None]}], r"record 1: a caption must be a string, got null"),
    ([{"image": ["r.jpg"], "caption": "red"}], r"record 1: 'image' \(an image path\) must be a string"),
    ({"images": [{"id": 1, "file_name": "r.jpg"}], "annotations": [{"image_id": 1, "caption": 3}]},
     r"annotations entry 1: 'caption' must be a string, got 3"),
])
def test_malformed_caption_json_stops_with_one_message_naming_the_file(tmp_path, listing, message):
    write_tinted_image(tmp_path / "r.jpg", "red")
    (tmp_path / "captions.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"captions\.json: " + message):
        load_retrieval_data(tmp_path / "captions.json")


def test_a_caption_string_in_captions_is_one_caption_not_its_letters(tmp_path):
    write_tinted_image(tmp_path / "r.jpg", "red")
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "r.jpg", "captions": "red"}]))
    assert load_retrieval_data(tmp_path / "captions.json").texts == ["red"]


def test_a_jsonl_row_with_a_null_caption_is_noted_not_dropped_unseen(tmp_path):
    write_tinted_image(tmp_path / "r.jpg", "red")
    write_tinted_image(tmp_path / "b.jpg", "blue")
    (tmp_path / "captions.jsonl").write_text('{"image": "r.jpg", "caption": null}\n'
                                             '{"image": "b.jpg", "caption": "blue"}\n')
    data = load_retrieval_data(tmp_path / "captions.jsonl")
    assert data.texts == ["blue"] and data.notes == ["dropped 1 blank captions"]


def test_an_unreadable_image_in_both_probe_sets_is_skipped_once(tmp_path):
    layout = {"red": ["red"] * 3, "blue": ["blue"] * 3}
    data_dir = make_color_folder(tmp_path / "data", layout)
    (data_dir / "red" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = load_classification_data(data_dir)
    report = evaluate_linear_probe(ColorCLIP(), data, data, progress=False)
    assert [entry["path"] for entry in report["skipped"]] == [str(data_dir / "red" / "cut.jpg")]
    assert report["num_test"] == 6 and report["accuracy"] == 1.0


def test_an_image_listed_under_two_labels_is_refused_naming_both_lines(tmp_path):
    make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    (tmp_path / "list.csv").write_text("path,label\ndata/red/0.png,red\ndata/blue/0.png,blue\n./data/red/0.png,blue\n")
    with pytest.raises(ValueError, match=r"list\.csv:4: './data/red/0\.png' is labelled 'blue' here but 'red' on "
                                         r"line 2; classification takes one label per image"):
        load_classification_data(tmp_path / "list.csv")


def test_the_linear_probe_counts_its_fits_on_a_progress_bar(tmp_path, monkeypatch):
    monkeypatch.setattr("tqdm.auto.tqdm", RecordingBar)
    RecordingBar.made = []
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = np.eye(3)[labels] * 3 + rng.normal(size=(30, 3))  # (30, 3) three separable clusters
    report = linear_probe(features, labels, features, labels, progress=True)
    (bar,) = [bar for bar in RecordingBar.made if bar.desc == "linear probe fits"]
    assert bar.disable is None and bar.count == len(report["sweep"]) + 1  # each C tried, then the final fit
    RecordingBar.made = []
    linear_probe(features, labels, features, labels)
    assert [bar.disable for bar in RecordingBar.made] == [True]  # the library stays quiet by default


def test_median_rank_is_the_literatures_floor_of_numpys_median_plus_one():
    from clipforge.evaluate.metrics import retrieval_metrics

    generator = torch.Generator().manual_seed(2)  # a seed whose two middle ranks are 9 and 11
    images, texts = torch.randn(20, 8, generator=generator), torch.randn(60, 8, generator=generator)
    owner = torch.arange(60) % 20  # 3 captions per image
    metrics = retrieval_metrics(images, texts, owner.tolist())
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T  # (20, 60)
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")  # (20, 60) captions, best first
    first = np.array([np.flatnonzero(owner.numpy()[order[i]] == i)[0] for i in range(20)])  # (20,) 0-based
    expected = float(np.floor(np.median(first)) + 1)
    assert expected != float(np.sort(first)[9] + 1)  # an even count whose middle two differ by 2 or more
    assert metrics["image_to_text_median_rank"] == expected
    t_order = np.argsort(-scores.numpy().T, axis=1, kind="stable")  # (60, 20) images, best first
    t_first = np.array([np.flatnonzero(t_order[j] == int(owner[j]))[0] for j in range(60)])  # (60,)
    assert metrics["text_to_image_median_rank"] == float(np.floor(np.median(t_first)) + 1)


def test_captions_longer_than_the_context_are_counted_in_a_note(tmp_path):
    write_tinted_image(tmp_path / "r.jpg", "red")
    write_tinted_image(tmp_path / "b.jpg", "blue", 1)
    long = "a blue photo of a very very long and winding caption indeed"  # 14 tokens with start and end
    (tmp_path / "captions.csv").write_text(f"image,caption\nr.jpg,red\nb.jpg,{long}\n")
    model = ColorCLIP()
    model.context_length = 8
    report = evaluate_retrieval(model, load_retrieval_data(tmp_path / "captions.csv"), progress=False)
    assert report["notes"][0] == "1 of 2 captions are longer than the model's context of 8 tokens and were cut " \
                                 "to their first 6"
    assert report["metrics"]["text_to_image_recall@1"] == 1.0  # "blue" is within the first 6 tokens


def test_one_image_spelled_two_ways_in_a_listing_is_one_image(tmp_path):
    write_tinted_image(tmp_path / "img" / "r.jpg", "red")
    write_tinted_image(tmp_path / "img" / "b.jpg", "blue", 1)
    (tmp_path / "captions.csv").write_text(f"image,caption\nimg/r.jpg,red\nimg/b.jpg,blue\n"
                                           f"img/../img/r.jpg,a red photo\n{tmp_path / 'img' / 'r.jpg'},red things\n")
    data = load_retrieval_data(tmp_path / "captions.csv")
    assert data.image_paths == [str(tmp_path / "img" / "r.jpg"), str(tmp_path / "img" / "b.jpg")]
    assert data.text_to_image == [0, 1, 0, 0]
    report = evaluate_retrieval(ColorCLIP(), data, progress=False)
    # As two images, the copy would tie with the original and its captions miss at R@1 for no reason.
    assert report["metrics"]["text_to_image_recall@1"] == 1.0 and report["num_images"] == 2


def test_a_tsv_label_with_a_quote_keeps_its_rows_and_its_quote(tmp_path):
    make_color_folder(tmp_path / "data", {"a": ["red"], "b": ["green"], "c": ["blue"]})
    (tmp_path / "list.tsv").write_text('data/a/0.png\t"big dog\ndata/b/0.png\t12" ruler\ndata/c/0.png\tcow\n')
    data = load_classification_data(tmp_path / "list.tsv")  # a CSV reader would make one 3-line label of it all
    assert data.classes == ['"big dog', '12" ruler', "cow"] and data.labels == [0, 1, 2]


def test_a_headerless_csv_with_quoted_commas_is_scored_like_the_folder(tmp_path):
    data_dir = make_color_folder(tmp_path / "data", {"red, ripe": ["red", "red"], "blue, deep": ["blue"]})
    with open(tmp_path / "list.csv", "w", newline="") as file:  # no header: the first row is data
        csv.writer(file).writerows([[f"data/{c}/{i}.{'jpg' if i % 2 else 'png'}", c]
                                    for c, n in (("red, ripe", 2), ("blue, deep", 1)) for i in range(n)])
    listed = evaluate_zeroshot(ColorCLIP(), load_classification_data(tmp_path / "list.csv"), templates=None,
                               progress=False)
    folder = evaluate_zeroshot(ColorCLIP(), load_classification_data(data_dir), templates=None, progress=False)
    assert listed.classes == folder.classes == ["blue, deep", "red, ripe"]
    assert listed.metrics == folder.metrics == {"top1": 1.0, "mean_per_class_recall": 1.0}
