"""``clipforge overlap --train`` over a training collection in tar shards, read in place: the same
duplicates and cosines as the same images in a folder, pairs and contact sheet naming
``<shard>.tar#<member>``, and a cut or remote shard refused in one line."""
from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipforge.evaluate.overlap import absolute_image_path, training_images

from _cli_errors import run_cli
from _protocol_layouts import demo_images

pytestmark = pytest.mark.slow  # runs the CLI end to end

FAST = ["--workers", "0", "--no-cache"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """``eval/<style>/`` (4 images each), ``train/`` (24 other images and a JPEG re-encode and a
    resized copy of two evaluation images) and the same training images as two shards."""
    root = tmp_path_factory.mktemp("overlap-shards")
    images = demo_images()
    for style in ("noto", "twemoji"):
        (root / "eval" / style).mkdir(parents=True)
        for source in [p for p in images if p.parent.name == style][300:304]:
            shutil.copyfile(source, root / "eval" / style / source.name)
    (root / "train").mkdir()
    for source in [p for p in images if p.parent.name in ("tuxpaint", "openclipart")][::60][:24]:
        shutil.copyfile(source, root / "train" / f"{source.parent.name}-{source.name}")
    evaluation = sorted((root / "eval").glob("*/*.png"))
    Image.open(evaluation[1]).convert("RGB").save(root / "train" / "copy0.jpg", format="JPEG", quality=75)
    Image.open(evaluation[6]).convert("RGB").resize((128, 128), Image.BICUBIC).save(root / "train" / "copy1.png")
    files = sorted((root / "train").iterdir())
    (root / "shards").mkdir()
    for number, part in enumerate((files[:13], files[13:])):
        with tarfile.open(root / "shards" / f"train-{number}.tar", "w") as tar:
            for k, path in enumerate(part):
                tar.add(path, arcname=f"{number:02d}{k:04d}{path.suffix}")
                caption = tarfile.TarInfo(f"{number:02d}{k:04d}.txt")
                caption.size = 5
                tar.addfile(caption, fileobj=io.BytesIO(b"a cap"))
    return root, [absolute_image_path(evaluation[1]), absolute_image_path(evaluation[6])]


def _overlap(capsys, root: Path, train: str, out: Path) -> tuple[int, str, str]:
    return run_cli(capsys, "overlap", "--train", train, "--data", root / "eval", "--out", out, *FAST)


def test_shards_find_the_same_duplicates_at_the_same_cosines_as_the_folder(collection, capsys):
    root, duplicates = collection
    status, _, err = _overlap(capsys, root, str(root / "train"), root / "out-folder")
    assert status == 0, err
    status, _, err = _overlap(capsys, root, str(root / "shards" / "train-{0..1}.tar"), root / "out-shards")
    assert status == 0, err
    for out in ("out-folder", "out-shards"):
        assert sorted((root / out / "overlap.txt").read_text().split()) == sorted(duplicates)
    folder = {r["eval_image"]: r for r in csv.DictReader((root / "out-folder" / "pairs.csv").open())}
    shards = {r["eval_image"]: r for r in csv.DictReader((root / "out-shards" / "pairs.csv").open())}
    assert folder.keys() == shards.keys()
    for path, row in shards.items():  # the same pixels, read from the shard by offset
        assert float(row["cosine"]) == pytest.approx(float(folder[path]["cosine"]), abs=1e-6)
        assert ".tar#" in row["nearest_train_image"] and row["nearest_train_image"].startswith(str(root / "shards"))
    report = json.loads((root / "out-shards" / "report.json").read_text())
    assert report["num_train_images"] == 26 and report["num_overlap"] == 2
    sheet = Image.open(root / "out-shards" / "contact_sheet.png").convert("RGB")
    # the training tile of the first pair is drawn from the shard, not an empty red box
    tile = sheet.crop((96 + 2, 0, 2 * 96 + 2, 96))
    assert len(tile.getcolors(1 << 16)) > 10
    # a folder of shards is read as the same collection
    assert len(training_images(root / "shards").paths) == 26


def test_a_cut_or_remote_training_shard_is_refused_in_one_line(collection, tmp_path, capsys):
    root, _ = collection
    shard = tmp_path / "cut.tar"
    with tarfile.open(root / "shards" / "train-0.tar") as tar:
        cut = tar.getmembers()[4].offset  # a sample's header: cut between two members
    shard.write_bytes((root / "shards" / "train-0.tar").read_bytes()[:cut])
    status, _, err = _overlap(capsys, root, str(shard), tmp_path / "out")
    assert status != 0 and "no end-of-archive block" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = _overlap(capsys, root, "http://127.0.0.1:9/train-{0..1}.tar", tmp_path / "out2")
    assert status != 0 and "must be local files" in err and len(err.strip().splitlines()) == 1, err
