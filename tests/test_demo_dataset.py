"""The offline demo dataset: real images with human-written captions, a held-out split, and a
Fluent 3D zero-shot set whose class names all occur in training.

The tests that build a slice read the installed sources (Debian packages plus the npm packages in
the default demo cache) and never touch the network; where the sources are missing they are skipped
with the command that installs them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from clipforge.demo import sources as demo_sources
from clipforge.demo.dataset import (EVAL_SOURCE, TRAIN_SOURCES, DemoDataConfig, load_demo_dataset,
                                         prepare_demo_data, read_records, render_square, split_records,
                                         validation_records)
from clipforge.demo.records import emoji_key, with_article
from clipforge.demo.sources import DemoSourceError

SLICE = DemoDataConfig(max_per_source=40, openclipart_max=40, eval_classes=5, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def built(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    return prepare_demo_data(cache_dir, SLICE, data_dir=data_dir, install=False, progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_with_article_handles_vowels_plurals_and_determiners():
    assert with_article("red apple") == "a red apple"
    assert with_article("octopus") == "an octopus"
    assert with_article("umbrella with rain drops") == "an umbrella with rain drops"
    assert with_article("unicorn") == "a unicorn"
    assert with_article("chopsticks") == "chopsticks"
    assert with_article("face with tears of joy") == "a face with tears of joy"
    assert with_article("the letter A") == "the letter A"
    # the sound decides, not the letter
    assert with_article("hourglass not done") == "an hourglass not done"
    assert with_article("one-piece swimsuit") == "a one-piece swimsuit"
    assert with_article("euro banknote") == "a euro banknote"
    assert with_article("one o'clock") == "one o'clock" and with_article("eleven-thirty") == "eleven-thirty"


def test_emoji_key_ignores_variation_selector_and_case():
    assert emoji_key("2764-FE0F") == emoji_key("2764") == "2764"
    assert emoji_key("1F469-200D-1F4BC") == "1f469-200d-1f4bc"


def test_render_square_crops_to_content_and_fills_transparency_with_white(tmp_path: Path):
    source = Image.new("RGBA", (300, 100), (0, 0, 0, 0))
    source.paste((200, 0, 0, 255), (100, 25, 200, 75))  # a 100 x 50 red bar in a transparent field
    source.save(tmp_path / "bar.png")
    square = render_square(tmp_path / "bar.png", 32)
    assert square.mode == "RGB" and square.size == (32, 32)
    assert square.getpixel((0, 0)) == (255, 255, 255)  # transparent margin became white
    assert square.getpixel((16, 16)) == (200, 0, 0)
    assert square.getpixel((2, 16))[1] < 50  # cropped to the bar: it now spans (almost) the full width


def test_render_square_rasterises_svg_with_librsvg(tmp_path: Path):
    if not demo_sources.is_installed("librsvg2-bin", tmp_path):
        pytest.skip(f"rsvg-convert missing; run: {demo_sources.install_commands(['librsvg2-bin'], tmp_path)[0]}")
    (tmp_path / "dot.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72" width="72" '
                                      'height="72"><circle cx="36" cy="36" r="18" fill="#00c000"/></svg>')
    square = render_square(tmp_path / "dot.svg", 32)
    assert square.mode == "RGB" and square.size == (32, 32)
    assert square.getpixel((0, 0)) == (255, 255, 255)  # transparent background became white
    red, green, blue = square.getpixel((16, 16))
    assert green > 150 and red < 60 and blue < 60
    assert square.getpixel((16, 2))[0] < 128  # cropped to the circle: it spans (almost) the full height
    (tmp_path / "broken.svg").write_text("<svg")
    with pytest.raises(ValueError, match="rsvg-convert could not render it"):
        render_square(tmp_path / "broken.svg", 32)


def test_missing_npm_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(demo_sources.shutil, "which", lambda name: None)
    expected = r"npm is not on PATH.*npm install --prefix .*emoji-datasource-google@"
    with pytest.raises(DemoSourceError, match=expected):
        demo_sources.install_sources(tmp_path, ["noto"], progress=False)


def test_apt_source_as_non_root_names_the_sudo_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(demo_sources, "is_installed", lambda package, cache: False)
    monkeypatch.setattr(demo_sources, "_is_root", lambda: False)
    monkeypatch.setattr(demo_sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    expected = "sudo apt-get install -y --no-install-recommends tuxpaint-stamps-default"
    with pytest.raises(DemoSourceError, match=expected):
        demo_sources.install_sources(tmp_path, ["tuxpaint"], progress=False)


def test_prepare_without_install_names_missing_sources(tmp_path: Path):
    config = DemoDataConfig(max_per_source=2, eval_classes=1)
    with pytest.raises(DemoSourceError, match="npm install --prefix"):
        prepare_demo_data(tmp_path / "empty-cache", config, install=False, progress=False)


def test_slice_has_real_images_from_every_source_and_consistent_counts(built):
    train = _jsonl(built.train_captions)
    heldout = _jsonl(built.heldout_captions)
    counts = built.counts
    assert counts["train_images"] == len(train) == len({row["image"] for row in train})
    assert counts["train_pairs"] == sum(len(row["caption"]) for row in train)
    assert counts["heldout_pairs"] == len(heldout)
    assert counts["heldout_images"] == len({row["image"] for row in heldout}) > 0
    assert {row["image"].split("/")[1] for row in train} == set(TRAIN_SOURCES)
    for row in train:
        assert row["caption"] and all(isinstance(c, str) and c.strip() for c in row["caption"])
    for relative in [row["image"] for row in train[::7]] + [row["image"] for row in heldout]:
        with Image.open(built.root / relative) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
            assert max(ImageStat.Stat(image).stddev) > 5, f"{relative} is blank"
    assert set(built.manifest["sources"]) == {*TRAIN_SOURCES, EVAL_SOURCE}
    for note in built.manifest["sources"].values():
        assert all(package["licence"] for package in note["packages"])


def test_eval_set_is_fluent_only_with_class_names_from_training(built):
    class_dirs = sorted(p for p in built.eval_dir.iterdir() if p.is_dir())
    assert [p.name for p in class_dirs] == built.classnames and len(built.classnames) == 5
    assert sum(len(list(p.glob("*.png"))) for p in class_dirs) == built.counts["eval_images"]
    train = _jsonl(built.train_captions)
    train_text = "\n".join(c.lower() for row in train for c in row["caption"])
    assert all(name.lower() in train_text for name in built.classnames)
    listed = [row["image"] for row in train + _jsonl(built.heldout_captions)]
    assert not any(EVAL_SOURCE in path for path in listed)  # Fluent never reaches training or retrieval
    names = (built.root / "eval" / f"{EVAL_SOURCE}_classnames.txt").read_text(encoding="utf-8").split("\n")
    assert names[:-1] == built.classnames


def test_validation_classes_are_other_fluent_emoji_whose_styles_train(built, cache_dir: Path):
    records = read_records(cache_dir, SLICE)
    train, _, _ = split_records(records, SLICE)
    validation = validation_records(records, SLICE, count=10)
    assert validation and all(r.source == EVAL_SOURCE for r in validation)
    assert not {r.label for r in validation} & set(built.classnames)  # never an eval class
    assert {r.group for r in validation} <= {r.group for r in train}  # their Noto/Twemoji styles train
    assert len({r.label for r in validation}) == len(validation)


def test_heldout_images_share_no_emoji_or_caption_with_training(built):
    train = _jsonl(built.train_captions)
    heldout = _jsonl(built.heldout_captions)
    stem = lambda path: path.rsplit("/", 1)[1]  # noqa: E731 - an emoji's two styles share a file stem
    assert not {stem(r["image"]) for r in heldout if "/noto/" in r["image"] or "/twemoji/" in r["image"]} & \
        {stem(r["image"]) for r in train}
    assert len({row["caption"].lower() for row in heldout}) == len(heldout)  # retrieval answers are unique


def test_rerun_is_a_noop_and_an_interrupted_run_resumes(built, cache_dir: Path):
    manifest = built.root / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepare_demo_data(cache_dir, SLICE, data_dir=built.root, install=False, progress=False)
    assert manifest.stat().st_mtime_ns == stamp and again.counts == built.counts

    # Interrupt: no manifest, one source not marked done, one image lost, a half-written temporary.
    first_image = built.root / _jsonl(built.train_captions)[0]["image"]
    source = first_image.parent.name
    manifest.unlink()
    (built.root / "images" / f".done-{source}").unlink()
    first_image.unlink()
    (first_image.parent / "partial.tmp.png").write_bytes(b"\x89PNG")
    resumed = prepare_demo_data(cache_dir, SLICE, data_dir=built.root, install=False, progress=False)
    assert first_image.is_file() and resumed.counts == built.counts
    assert load_demo_dataset(built.root).classnames == built.classnames


def test_changed_options_rebuild_the_eval_folder_without_stale_classes(built, cache_dir: Path, tmp_path: Path):
    copy = tmp_path / "data"
    shutil.copytree(built.root, copy)
    fewer = DemoDataConfig(**{**SLICE.__dict__, "eval_classes": 2})
    rebuilt = prepare_demo_data(cache_dir, fewer, data_dir=copy, install=False, progress=False)
    assert sorted(p.name for p in rebuilt.eval_dir.iterdir()) == rebuilt.classnames and len(rebuilt.classnames) == 2


def test_a_folder_of_another_image_size_is_refused(built, cache_dir: Path):
    bigger = DemoDataConfig(**{**SLICE.__dict__, "image_size": 96})
    with pytest.raises(ValueError, match="holds 64 px images but image_size=96"):
        prepare_demo_data(cache_dir, bigger, data_dir=built.root, install=False, progress=False)


def test_training_and_evaluation_readers_accept_the_files(built):
    from clipforge.data import captions
    from clipforge.evaluate import datasets as eval_datasets

    train = captions.CaptionDataset(built.train_captions)
    assert len(train) == built.counts["train_images"]
    sample = train.read(0)
    assert sample.image.startswith(b"\x89PNG") and len(sample.captions) >= 2
    folder = eval_datasets.load_image_folder(built.eval_dir)
    assert folder.classes == built.classnames and len(folder.paths) == built.counts["eval_images"]
    retrieval = eval_datasets.load_retrieval_data(built.heldout_captions)
    assert len(retrieval.image_paths) == built.counts["heldout_images"]
    assert len(retrieval.texts) == built.counts["heldout_pairs"]
