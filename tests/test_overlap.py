"""``clipforge overlap``: resized / re-encoded training images are found, other styles are not."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.evaluate.overlap import nearest_neighbours, split_accuracy

from _protocol_layouts import demo_images

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


@pytest.fixture(scope="module")
def overlap_case(tmp_path_factory):
    """Training: 80 Noto images. Eval (2 classes by style folder): 6 of them resized or re-encoded
    (duplicates), the Twemoji drawings of 6 others, 6 Fluent 3D images (not duplicates)."""
    root = tmp_path_factory.mktemp("overlap")
    images = demo_images()
    noto = [p for p in images if p.parent.name == "noto"][200:280]
    twemoji = {p.name: p for p in images if p.parent.name == "twemoji"}
    fluent = [p for p in images if p.parent.name == "fluent3d"][:6]
    (root / "train.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": "an emoji"}) + "\n" for p in noto))
    duplicates = []
    for k, source in enumerate(noto[:6]):
        image = Image.open(source).convert("RGB")
        target = root / "eval" / "copies" / f"dup{k}.{'jpg' if k % 2 else 'png'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if k % 2:
            image.save(target, format="JPEG", quality=85)  # re-encoded
        else:
            image.resize((48, 48), Image.BICUBIC).resize((64, 64), Image.BICUBIC).save(target)  # resized
        duplicates.append(str(target))
    others = [twemoji[p.name] for p in noto[10:] if p.name in twemoji][:6] + fluent
    for k, source in enumerate(others):
        target = root / "eval" / "drawings" / f"other{k}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return root, sorted(duplicates)


def test_overlap_lists_the_resized_and_reencoded_copies_only(overlap_case, capsys):
    root, duplicates = overlap_case
    out = root / "out-pixels"
    assert main(["overlap", "--train", str(root / "train.jsonl"), "--data", str(root / "eval"),
                 "--out", str(out), "--workers", "0", "--no-cache"]) == 0
    assert sorted((out / "overlap.txt").read_text().split()) == duplicates
    report = json.loads((out / "report.json").read_text())
    assert report["num_overlap"] == 6 and report["num_images"] == 18 and report["threshold"] == 0.98
    assert report["overlap_share"] == pytest.approx(6 / 18)
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == 18 and all(float(r["cosine"]) >= 0.98 for r in rows if r["duplicate"] == "1")
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 200
    assert "6 of 18 evaluation images (33.33%)" in capsys.readouterr().out


def test_clean_accuracy_equals_zero_shot_with_the_overlap_excluded(overlap_case, capsys):
    root, _ = overlap_case
    out = root / "out-model"
    assert main(["overlap", "--train", str(root / "train.jsonl"), "--data", str(root / "eval"), "--model", "tiny-vit",
                 "--templates", "none", "--out", str(out), "--workers", "0", "--no-cache"]) == 0
    report = json.loads((out / "report.json").read_text())
    runs = {}
    for name, extra in (("all", []), ("clean", ["--exclude", str(out / "overlap.txt")])):
        assert main(["eval", "zeroshot", "--data", str(root / "eval"), "--model", "tiny-vit", "--templates", "none",
                     "--no-cache", "--workers", "0", "--out", str(root / f"zs-{name}"), *extra]) == 0
        runs[name] = json.loads((root / f"zs-{name}" / "report.json").read_text())
    assert runs["clean"]["num_images"] == 12 and runs["clean"]["excluded"]["num_images"] == 6
    assert report["accuracy_all"] == pytest.approx(runs["all"]["metrics"]["top1"], abs=1e-6)
    assert report["accuracy_clean"] == pytest.approx(runs["clean"]["metrics"]["top1"], abs=1e-6)
    assert report["all_minus_clean"] == pytest.approx(report["accuracy_all"] - report["accuracy_clean"])


def test_split_accuracy_and_nearest_neighbours_by_hand():
    report = split_accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([True, True, False, False]))
    assert (report["accuracy_overlap"], report["accuracy_clean"], report["accuracy_all"]) == (0.5, 1.0, 0.75)
    assert report["overlap_minus_clean"] == -0.5 and report["all_minus_clean"] == -0.25
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(9, 5, generator=generator), torch.randn(23, 5, generator=generator)
    cosine, index = nearest_neighbours(queries, keys, chunk=4)
    full = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    torch.testing.assert_close(cosine, full.max(1).values)
    assert torch.equal(index, full.argmax(1))


def test_bad_overlap_arguments_stop_with_one_line(overlap_case, capsys):
    root, _ = overlap_case
    base = ["overlap", "--train", str(root / "train.jsonl"), "--data", str(root / "eval"), "--out", str(root / "x")]
    assert main(base + ["--threshold", "1.5"]) == 2
    assert "--threshold is a cosine in [-1, 1], got 1.5" in capsys.readouterr().err
    assert main(base + ["--features", "model"]) == 2
    assert "--features model needs --model" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--data", str(root / "eval"), "--model", "tiny-vit", "--exclude",
                 str(root / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_exclude_list_keeps_a_protocols_label_mapping(tmp_path):
    from clipforge.evaluate import load_classification_data
    from clipforge.evaluate.overlap import drop_listed

    from _protocol_layouts import make_class_folders, wnid_table

    made = make_class_folders(tmp_path / "imagenet-a", wnid_table("imagenet_a"), per_folder=2)
    data = load_classification_data(tmp_path / "imagenet-a", dataset="imagenet-a")
    listed = [str(made[wnid][0]) for wnid in wnid_table("imagenet_a")[:3]]
    (tmp_path / "overlap.txt").write_text("# from clipforge overlap\n" + "\n".join(listed) + "\n")
    kept, dropped, unmatched = drop_listed(data, tmp_path / "overlap.txt")
    assert sorted(dropped) == sorted(listed) and unmatched == [] and len(kept.paths) == 397 and type(kept) is type(data)
    assert kept.label_hits == data.label_hits and kept.labels[:5] == [0, 1, 2, 3, 3]
