"""Caption files (CSV, TSV, JSONL) of a folder of real images: columns, captions, early errors."""
import json

import numpy as np
import pytest
from _data_helpers import make_images, write_caption_file

from clipforge.data import CaptionDataset, open_dataset
from clipforge.data.samples import BadSample, choose_caption, to_pair


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    names = make_images(root / "images", 6)
    return root, [f"images/{n}" for n in names]


@pytest.mark.parametrize("suffix, image_column, caption_column", [
    (".csv", "image", "caption"), (".tsv", "filepath", "title"), (".jsonl", "file_name", "text"),
])
def test_default_column_names_are_found_in_each_format(folder, suffix, image_column, caption_column):
    root, names = folder
    rows = [(n, f"caption {i}") for i, n in enumerate(names)]
    dataset = CaptionDataset(write_caption_file(root / f"a{suffix}", rows, image_column, caption_column))
    assert len(dataset) == len(names)
    raw = dataset.read(2)
    assert raw.key == names[2] and raw.captions == ["caption 2"]
    assert raw.image == (root / names[2]).read_bytes()
    image, caption = to_pair(raw, seed=0, epoch=0, position=2)
    assert image.mode == "RGB" and image.size == (40, 32) and caption == "caption 2"


def test_custom_column_names_and_image_root(folder, tmp_path):
    root, names = folder
    rows = [(n.removeprefix("images/"), f"c{i}") for i, n in enumerate(names)]
    path = write_caption_file(tmp_path / "pairs.csv", rows, "jpg_file", "alt")
    dataset = CaptionDataset(path, image_root=root / "images", image_key="jpg_file", caption_key="alt")
    assert dataset.read(0).captions == ["c0"] and dataset.read(0).image is not None


def test_tsv_keeps_quotes_and_commas_in_captions(folder):
    root, names = folder
    path = write_caption_file(root / "q.tsv", [(names[0], '"quoted", with commas'), (names[1], 'it\'s "x')])
    dataset = CaptionDataset(path)
    assert dataset.read(0).captions == ['"quoted", with commas'] and dataset.read(1).captions == ['it\'s "x']


def test_jsonl_caption_list_is_one_sample_with_a_caption_drawn_per_epoch(folder):
    root, names = folder
    captions = ["a photo", "another view", "a third caption"]
    path = write_caption_file(root / "multi.jsonl", [(names[0], captions), (names[1], "single")])
    dataset = CaptionDataset(path)
    assert len(dataset) == 2 and dataset.read(0).captions == captions
    drawn = [choose_caption(dataset.read(0).captions, seed=0, epoch=e, position=0) for e in range(30)]
    assert set(drawn) == set(captions)  # every caption is used over epochs
    again = [choose_caption(dataset.read(0).captions, seed=0, epoch=e, position=0) for e in range(30)]
    assert drawn == again  # and the draw is a function of (seed, epoch, position)


def test_rows_are_stored_packed_not_as_python_lists(folder):
    root, names = folder
    dataset = CaptionDataset(write_caption_file(root / "p.csv", [(n, "ü caption") for n in names]))
    assert isinstance(dataset.images.buffer, np.ndarray) and isinstance(dataset.captions.buffer, np.ndarray)
    assert dataset.read(3).captions == ["ü caption"]


def test_unreadable_image_and_empty_caption_are_bad_samples_not_config_errors(folder):
    root, names = folder
    dataset = CaptionDataset(write_caption_file(root / "bad.csv", [(names[0], "ok"), ("images/gone.jpg", "x"),
                                                                   (names[1], "  ")]))
    assert len(dataset) == 3
    with pytest.raises(BadSample, match="cannot read image file"):
        to_pair(dataset.read(1), 0, 0, 1)
    with pytest.raises(BadSample, match="no caption"):
        to_pair(dataset.read(2), 0, 0, 2)


def test_epoch_view_is_a_seeded_permutation(folder):
    root, names = folder
    dataset = CaptionDataset(write_caption_file(root / "perm.csv", [(n, n) for n in names]))
    first = [r.key for r in dataset.epoch_view(epoch=0, seed=1).read(0, len(names))]
    assert sorted(first) == sorted(names)
    assert first == [r.key for r in dataset.epoch_view(epoch=0, seed=1).read(0, len(names))]
    assert first != [r.key for r in dataset.epoch_view(epoch=1, seed=1).read(0, len(names))]


# Configuration errors: raised when the dataset is opened, naming the file and what was expected.

def test_missing_caption_file_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption file not found: .*nope.csv"):
        CaptionDataset(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="training data not found"):
        open_dataset(tmp_path / "nope")


def test_missing_image_root_fails(folder):
    root, names = folder
    path = write_caption_file(root / "r.csv", [(names[0], "x")])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CaptionDataset(path, image_root=root / "elsewhere")


def test_wrong_image_root_fails_before_training(folder):
    root, names = folder
    path = write_caption_file(root / "w.csv", [(n, "x") for n in names])
    with pytest.raises(FileNotFoundError, match="none of the first 5 images .* exists under"):
        CaptionDataset(path, image_root=root / "images")  # paths already start with images/


def test_file_without_rows_fails(tmp_path):
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="no rows"):
        CaptionDataset(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        CaptionDataset(tmp_path / "blank.csv")


def test_missing_columns_fail_naming_the_columns_found(folder):
    root, names = folder
    path = write_caption_file(root / "cols.csv", [(names[0], "x")], "picture", "caption")
    with pytest.raises(ValueError, match=r"no image column: looked for 'image', .* found 'picture', 'caption'"):
        CaptionDataset(path)
    with pytest.raises(ValueError, match="no caption column: looked for 'label'"):
        CaptionDataset(path, image_key="picture", caption_key="label")


def test_bad_json_line_and_unknown_suffix_fail(folder):
    root, names = folder
    (root / "broken.jsonl").write_text(json.dumps({"image": names[0], "caption": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        CaptionDataset(root / "broken.jsonl")
    (root / "pairs.parquet").write_text("x")
    with pytest.raises(ValueError, match="unknown caption file type '.parquet'"):
        CaptionDataset(root / "pairs.parquet")


def test_open_dataset_picks_the_format_from_the_path(folder):
    root, names = folder
    path = write_caption_file(root / "o.jsonl", [(n, "x") for n in names])
    assert isinstance(open_dataset(path), CaptionDataset)
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_dataset(root / "images" / names[0].removeprefix("images/"))
