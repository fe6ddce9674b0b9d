"""Listings as real tools leave them: a labels file with a byte-order mark, macOS ``__MACOSX`` and
other hidden folders in an image folder, corrupt images handed to ``clipforge shards``."""
from __future__ import annotations

import argparse
import shutil

import pytest
import webdataset
from _data_helpers import make_images, make_pairs, write_bad_images, write_caption_file

from clipforge.cli import shards as shards_cli
from clipforge.data import write_shards
from clipforge.evaluate import load_classification_data, resolve_templates
from clipforge.evaluate.prompts import resolve_classnames


def test_hidden_and_macosx_folders_are_never_classes_nor_images(tmp_path):
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        make_images(root / name, 2)
    make_images(root / "__MACOSX" / "cat", 2)  # what unzip leaves from an archive made on a Mac
    make_images(root / ".thumbnails", 1)
    make_images(root / "cat" / ".previews", 2)  # hidden inside a class: not walked
    make_images(root / "cat" / "__MACOSX", 1)
    shutil.copy(root / "cat" / "img_000.jpg", root / "cat" / "._img_000.jpg")  # AppleDouble file
    data = load_classification_data(root)
    assert data.classes == ["cat", "dog"]
    assert len(data.paths) == 4
    assert not any("MACOSX" in path or "/." in path for path in data.paths)


def test_labels_csv_and_templates_and_classnames_files_with_byte_order_mark(tmp_path):
    names = make_images(tmp_path / "images", 2)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,label\nimages/{names[0]},dog\nimages/{names[1]},cat\n", encoding="utf-8-sig")
    assert load_classification_data(labels).classes == ["cat", "dog"]
    headerless = tmp_path / "headerless.csv"
    headerless.write_text(f"images/{names[0]},dog\n", encoding="utf-8-sig")
    data = load_classification_data(headerless)
    assert data.classes == ["dog"] and data.paths[0].endswith(names[0])
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n", encoding="utf-8-sig")
    assert resolve_templates(str(templates)) == ["a photo of a {}.", "a drawing of a {}."]
    as_json = tmp_path / "templates.json"
    as_json.write_text('["a photo of a {}."]', encoding="utf-8-sig")
    assert resolve_templates(str(as_json)) == ["a photo of a {}."]
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("cat\ndog\n", encoding="utf-8-sig")
    assert resolve_classnames(str(classnames), ["cat", "dog"]) == ["cat", "dog"]


def test_classify_labels_file_with_byte_order_mark_reads_the_first_label_plainly(tmp_path, monkeypatch):
    from clipforge.cli import classify as classify_cli

    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("dog\ncat\n", encoding="utf-8-sig")
    seen = {}

    def fake_check(labels):  # stop before any model loads: the labels are what is under test
        seen["labels"] = list(labels)
        raise SystemExit(0)

    monkeypatch.setattr("clipforge.evaluate.check_classnames", fake_check)
    args = argparse.Namespace(top_k=5, labels_file=str(labels_file), labels=None)
    with pytest.raises(SystemExit):
        classify_cli.run(args)
    assert seen["labels"] == ["dog", "cat"]


def test_shards_leave_out_and_count_corrupt_images(tmp_path, capsys):
    caption_file, names = make_pairs(tmp_path, 6)
    bad = write_bad_images(tmp_path / "images")  # truncated.jpg, text.png, noise.jpg; missing.jpg absent
    rows = [(name, f"photo {i}") for i, name in enumerate(names)]
    rows += [(f"images/{name}", f"broken {what}") for name, what in bad.items()]
    listing = write_caption_file(tmp_path / "mixed.csv", rows)
    written = write_shards(listing, tmp_path / "out", shuffle=False)
    assert written.num_samples == 6 and written.num_skipped == 4 and written.num_corrupt == 3
    packed = [sample["txt"].decode() for sample in webdataset.WebDataset(written.pattern, shardshuffle=False)]
    assert packed == [f"photo {i}" for i in range(6)]
    unchecked = write_shards(listing, tmp_path / "unchecked", check_images=False)
    assert unchecked.num_samples == 9 and unchecked.num_corrupt == 0
    args = argparse.Namespace(captions=str(listing), out_dir=str(tmp_path / "cli"), src_dir=str(tmp_path),
                              max_count=100, max_size=1000.0, prefix="data", no_shuffle=False, seed=0,
                              image_key=None, caption_key=None, overwrite=False)
    assert shards_cli.run(args) == 0
    assert ("left out 4 rows (40.0%): 3 corrupt images, 0 without a caption, 1 whose image could not be read"
            in capsys.readouterr().out)
