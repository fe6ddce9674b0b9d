"""Caption listings in every supported format, and retrieval recall on real images with known answers."""
import csv
import json

import pytest
from _eval_helpers import ColorCLIP, write_tinted_image

from clipforge.evaluate import evaluate_retrieval, load_retrieval_data


@pytest.fixture
def images(tmp_path):
    """Three real tinted images under tmp_path/images."""
    for name, color in (("r.jpg", "red"), ("g.png", "green"), ("b.jpg", "blue")):
        write_tinted_image(tmp_path / "images" / name, color)
    return tmp_path


ROWS = [("images/r.jpg", "a red photo"), ("images/r.jpg", "something red"),
        ("images/g.png", "a green photo"), ("images/b.jpg", "a blue photo"), ("images/b.jpg", "blue, blue")]


def write_csv(path, rows, header=("image", "caption"), delimiter=","):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_groups_several_captions_per_image(images):
    data = load_retrieval_data(write_csv(images / "captions.csv", ROWS))
    assert [p.rsplit("/", 1)[1] for p in data.image_paths] == ["r.jpg", "g.png", "b.jpg"]
    assert data.text_to_image == [0, 0, 1, 2, 2]
    assert data.texts[1] == "something red"


def test_tsv_jsonl_json_list_coco_and_karpathy_give_the_same_pairs(images):
    expected = load_retrieval_data(write_csv(images / "a.csv", ROWS))
    tsv = load_retrieval_data(write_csv(images / "b.tsv", ROWS, ("filepath", "title"), "\t"))
    jsonl = images / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in ROWS))
    grouped = images / "d.json"
    grouped.write_text(json.dumps([{"image": "images/r.jpg", "captions": ["a red photo", "something red"]},
                                   {"file_name": "images/g.png", "text": "a green photo"},
                                   {"image": "images/b.jpg", "captions": ["a blue photo", "blue, blue"]}]))
    coco = images / "e.json"
    coco.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "r.jpg"}, {"id": 8, "file_name": "g.png"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 7, "caption": "a red photo"}, {"image_id": 7, "caption": "something red"},
                        {"image_id": 8, "caption": "a green photo"}, {"image_id": 9, "caption": "a blue photo"},
                        {"image_id": 9, "caption": "blue, blue"}]}))
    karpathy = images / "f.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "images", "filename": "r.jpg", "split": "test",
         "sentences": [{"raw": "a red photo"}, {"raw": "something red"}]},
        {"filepath": "images", "filename": "g.png", "split": "test", "sentences": [{"raw": "a green photo"}]},
        {"filepath": "images", "filename": "x.jpg", "split": "train", "sentences": [{"raw": "not used"}]},
        {"filepath": "images", "filename": "b.jpg", "split": "test",
         "sentences": [{"raw": "a blue photo"}, {"raw": "blue, blue"}]}]}))
    loaded = [tsv, load_retrieval_data(jsonl), load_retrieval_data(grouped),
              load_retrieval_data(coco, image_root=images / "images"), load_retrieval_data(karpathy)]
    for data in loaded:
        assert (data.image_paths, data.texts, data.text_to_image) == \
               (expected.image_paths, expected.texts, expected.text_to_image)
    with pytest.raises(ValueError, match="no images in split 'val'; splits present: \\['test', 'train'\\]"):
        load_retrieval_data(karpathy, split="val")


def test_missing_images_stop_with_one_message_or_are_dropped_on_request(images):
    path = write_csv(images / "captions.csv", ROWS + [("images/gone.jpg", "a lost photo")])
    message = r"captions.csv: 1 of 4 listed images are missing under .*, e\.g\. '.*gone\.jpg'; pass"
    with pytest.raises(FileNotFoundError, match=message):
        load_retrieval_data(path)
    data = load_retrieval_data(path, skip_missing=True)
    assert len(data.image_paths) == 3 and "a lost photo" not in data.texts
    assert any("dropped 1 missing images" in note for note in data.notes)


def test_bad_caption_listings_name_the_file_and_problem(images):
    headerless = images / "bad.csv"
    headerless.write_text("image,url\nimages/r.jpg,http://x\n")
    with pytest.raises(ValueError, match="bad.csv: no caption column: looked for .caption."):
        load_retrieval_data(headerless)
    broken = images / "bad.jsonl"
    broken.write_text('{"image": "images/r.jpg", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_retrieval_data(broken)
    with pytest.raises(ValueError, match="unrecognised JSON"):
        (images / "odd.json").write_text('{"hello": 1}')
        load_retrieval_data(images / "odd.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_retrieval_data(images / "absent.csv")


def test_retrieval_recall_with_known_answers(images):
    # Caption "a green photo" of the red image is wrong on purpose: text->image misses it at R@1.
    # Image->text: the red image still hits (its other caption is red); the green image's caption
    # "green" ties with "a green photo", which has the lower index, so ranks second: a miss at R@1.
    rows = [("images/r.jpg", "a red photo"), ("images/r.jpg", "a green photo"),
            ("images/g.png", "green"), ("images/b.jpg", "blue")]
    report = evaluate_retrieval(ColorCLIP(), load_retrieval_data(write_csv(images / "c.csv", rows)), progress=False)
    metrics = report["metrics"]
    assert metrics["text_to_image_recall@1"] == pytest.approx(3 / 4)
    assert metrics["text_to_image_recall@5"] == 1.0
    assert metrics["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_recall@5"] == 1.0
    assert report["num_images"] == 3 and report["num_texts"] == 4
    # 3 images and 4 captions to rank: R@5 and R@10 cannot miss, and the report says so.
    assert report["notes"] == ["text-to-image recall@5, @10 is 100% by construction: only 3 images to rank",
                               "image-to-text recall@5, @10 is 100% by construction: only 4 captions to rank"]


def test_a_one_image_listing_is_noted_as_trivial_in_the_cli(images, capsys):
    from clipforge.cli import main

    listing = write_csv(images / "one.csv", [("images/r.jpg", "a red photo")])
    assert main(["eval", "retrieval", "--model", "tiny-vit", "--workers", "0", "--data", str(listing)]) == 0
    err = capsys.readouterr().err
    assert "note: text-to-image recall@1, @5, @10 is 100% by construction: only 1 image to rank" in err


def test_unreadable_image_is_skipped_with_its_captions(images):
    (images / "images" / "broken.jpg").write_bytes(b"garbage")
    rows = ROWS + [("images/broken.jpg", "a broken photo"), ("images/broken.jpg", "still broken")]
    report = evaluate_retrieval(ColorCLIP(), load_retrieval_data(write_csv(images / "c.csv", rows)), progress=False)
    assert report["num_images"] == 3 and report["num_texts"] == 5
    assert [entry["path"].rsplit("/", 1)[1] for entry in report["skipped"]] == ["broken.jpg"]
    assert report["metrics"]["image_to_text_recall@1"] == 1.0
