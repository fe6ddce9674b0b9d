"""Training and evaluation read image-caption listings through one reader and agree on every file."""
import json

import pytest
from PIL import Image

from clipforge.data.captions import CaptionDataset, ListingError, read_listing
from clipforge.evaluate import load_retrieval_data


@pytest.fixture()
def folder(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return tmp_path


def _training_captions(listing):
    dataset = CaptionDataset(listing)
    return [dataset.read(i).captions for i in range(len(dataset))]


def test_jsonl_caption_list_is_several_captions_for_training_and_retrieval(folder):
    listing = folder / "pairs.jsonl"
    listing.write_text(json.dumps({"image": "a.png", "caption": ["a cat", "a kitten asleep"]}) + "\n"
                       + json.dumps({"image": "b.png", "caption": "a blue square"}) + "\n")
    assert _training_captions(listing) == [["a cat", "a kitten asleep"], ["a blue square"]]
    retrieval = load_retrieval_data(listing)
    assert retrieval.texts == ["a cat", "a kitten asleep", "a blue square"]
    assert retrieval.text_to_image == [0, 0, 1]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_byte_order_mark_is_accepted_by_training_and_retrieval(folder, suffix, sep):
    listing = folder / f"pairs{suffix}"
    listing.write_bytes(f"\ufeffimage{sep}caption\na.png{sep}a red square\nb.png{sep}a blue square\n".encode("utf-8"))
    assert _training_captions(listing) == [["a red square"], ["a blue square"]]
    assert load_retrieval_data(listing).texts == ["a red square", "a blue square"]


def test_columns_are_found_in_any_case_and_headerless_rows_start_with_an_image(folder):
    (folder / "upper.csv").write_text("Image,Caption\na.png,red\n")
    assert read_listing(folder / "upper.csv").captions == [["red"]]
    (folder / "bare.csv").write_text("a.png,red\nb.png,blue\n")
    assert read_listing(folder / "bare.csv").images == ["a.png", "b.png"]
    assert load_retrieval_data(folder / "bare.csv").texts == ["red", "blue"]


def test_a_header_naming_no_known_column_is_an_error_not_a_data_row(folder):
    (folder / "odd.csv").write_text("foo,bar\na.png,red\n")
    with pytest.raises(ListingError, match=r"odd.csv: no image column: looked for .*found 'foo', 'bar'"):
        read_listing(folder / "odd.csv")
    with pytest.raises(ValueError, match="odd.csv: no image column"):
        CaptionDataset(folder / "odd.csv")


def test_non_utf8_listing_names_the_file(folder):
    (folder / "latin.csv").write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ListingError, match="latin.csv: not UTF-8"):
        read_listing(folder / "latin.csv")


@pytest.mark.parametrize("row, message", [
    ({"image": "a.png", "caption": 123}, "pairs.jsonl:2: a caption must be text or a list of texts, got 123"),
    ({"image": "a.png", "caption": {"a": 1}}, 'pairs.jsonl:2: a caption must be text .*got {"a": 1}'),
    ({"image": "a.png", "caption": ["fine", True]}, "pairs.jsonl:2: a caption must be text .*got true"),
    ({"image": 7, "caption": "x"}, "pairs.jsonl:2: image must be an image path, got 7"),
])
def test_a_jsonl_value_of_the_wrong_kind_is_refused_not_trained_on_as_text(folder, row, message):
    listing = folder / "pairs.jsonl"
    listing.write_text(json.dumps({"image": "b.png", "caption": "ok"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ListingError, match=message):
        read_listing(listing)


def test_a_csv_row_with_more_fields_than_columns_is_refused(folder):
    (folder / "bare.csv").write_text("a.png,a cat, asleep on a mat\n")  # an unquoted comma cut the caption
    with pytest.raises(ListingError, match="bare.csv:1: 3 fields where the listing has 2 columns; quote a caption"):
        read_listing(folder / "bare.csv")
    (folder / "header.csv").write_text('image,caption\na.png,"a cat, asleep",\nb.png,red,extra\n')
    with pytest.raises(ListingError, match="header.csv:3: 3 fields where the listing has 2 columns"):
        read_listing(folder / "header.csv")
    (folder / "quoted.csv").write_text('image,caption\na.png,"a cat, asleep"\n')
    assert read_listing(folder / "quoted.csv").captions == [["a cat, asleep"]]
