"""Audit of ``clipforge overlap`` as a user meets it, on the demo's real images: known duplicates planted
in a training folder (JPEG re-encodes and resized copies of evaluation images) are found and only
they; the clean / overlap accuracies are the exact shares of a separate zero-shot run; no overlap and
all overlap; thresholds outside the cosine range; a training collection searched in bounded blocks;
and the reuse of ``clipforge embed`` folders (same model and precision only, changed files embedded again).
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import clipforge.evaluate.overlap as overlap_module
from clipforge.evaluate.overlap import (NearestSearch, PixelThumbnails, absolute_image_path, find_overlap,
                                        nearest_neighbours, split_accuracy)

from _cli_errors import error_lines, run_cli
from _protocol_layouts import demo_images

pytestmark = pytest.mark.slow  # runs the tiny model and the CLI end to end

FAST = ["--workers", "0", "--no-cache"]
STYLES = ("noto", "twemoji", "openmoji")  # the evaluation classes: which style drew the emoji


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``eval/<style>/`` (5 images each), ``train/`` (40 Tux Paint and Open Clip Art images, plus a JPEG
    re-encode or a resized copy of 4 evaluation images), ``train-clean/`` (the 40 alone) and
    ``train-all/`` (a copy of every evaluation image)."""
    root = tmp_path_factory.mktemp("overlap-audit")
    images = demo_images()
    by_style = {style: [p for p in images if p.parent.name == style][500:505] for style in STYLES}
    others = [p for p in images if p.parent.name in ("tuxpaint", "openclipart")][::50][:40]
    for style, sources in by_style.items():
        for source in sources:
            (root / "eval" / style).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / "eval" / style / source.name)
    for folder in ("train", "train-clean", "train-all"):
        (root / folder).mkdir()
        for source in others:
            shutil.copyfile(source, root / folder / f"{source.parent.name}-{source.name}")
    evaluation = sorted((root / "eval").glob("*/*.png"))
    planted = [evaluation[1], evaluation[6], evaluation[7], evaluation[13]]
    for k, path in enumerate(planted):
        image = Image.open(path).convert("RGB")
        if k % 2:
            image.save(root / "train" / f"copy{k}.jpg", format="JPEG", quality=75)  # re-encoded
        else:
            image.resize((128, 128), Image.BICUBIC).save(root / "train" / f"copy{k}.png")  # resized
    for k, path in enumerate(evaluation):
        image = Image.open(path).convert("RGB")
        image.save(root / "train-all" / f"all{k}.jpg", format="JPEG", quality=90)
    return root, [absolute_image_path(p) for p in planted], evaluation


def _correct_by_path(data_folder) -> dict[str, bool]:
    """Each evaluation image's zero-shot hit by the model ``--model tiny-vit`` gives, scored apart."""
    from clipforge.cli._common import load_model_arg
    from clipforge.evaluate import evaluate_zeroshot, load_classification_data

    model, preprocess = load_model_arg("tiny-vit", torch.device("cpu"), 0)
    data = load_classification_data(data_folder)
    result = evaluate_zeroshot(model, data, None, "none", preprocess, cache_dir=None, progress=False)
    hits = (result.logits.argmax(-1) == result.targets).tolist()
    return {absolute_image_path(data.paths[i]): hit for i, hit in zip(result.indices.tolist(), hits)}


def test_planted_copies_are_found_and_the_accuracies_are_the_exact_shares(planted, capsys):
    root, duplicates, evaluation = planted
    out = root / "out"
    status, stdout, _ = run_cli(capsys, "overlap", "--train", root / "train", "--data", root / "eval", "--model", "tiny-vit",
                             "--templates", "none", "--out", out, *FAST)
    assert status == 0
    assert sorted((out / "overlap.txt").read_text().split()) == sorted(duplicates)  # the 4 copies, nothing else
    rows = {row["eval_image"]: row for row in csv.DictReader((out / "pairs.csv").open())}
    assert all(float(rows[path]["cosine"]) > 0.99 for path in duplicates)
    assert max(float(row["cosine"]) for path, row in rows.items() if path not in duplicates) < 0.98
    correct = _correct_by_path(root / "eval")
    hits_all = sum(correct.values())
    hits_overlap = sum(correct[path] for path in duplicates)
    report = json.loads((out / "report.json").read_text())
    expected = {"num_images": 15, "num_overlap": 4, "overlap_share": 4 / 15, "accuracy_all": hits_all / 15,
                "accuracy_overlap": hits_overlap / 4, "accuracy_clean": (hits_all - hits_overlap) / 11}
    expected["overlap_minus_clean"] = expected["accuracy_overlap"] - expected["accuracy_clean"]
    expected["all_minus_clean"] = expected["accuracy_all"] - expected["accuracy_clean"]
    for key, value in expected.items():  # exact: shares of counts, not float32 means
        assert report[key] == pytest.approx(value, abs=1e-12), key
    assert "4 of 15 evaluation images (26.67%)" in stdout


def test_no_overlap_reports_none_for_the_overlap_subset_and_excludes_nothing(planted, capsys):
    root, _, _ = planted
    out = root / "out-none"
    assert run_cli(capsys, "overlap", "--train", root / "train-clean", "--data", root / "eval", "--model", "tiny-vit",
                "--templates", "none", "--out", out, *FAST)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["num_overlap"], report["overlap_share"], report["accuracy_overlap"]) == (0, 0.0, None)
    assert report["overlap_minus_clean"] is None and report["all_minus_clean"] == 0.0
    assert report["accuracy_clean"] == report["accuracy_all"]
    assert (out / "overlap.txt").read_text() == ""
    status, _, _ = run_cli(capsys, "eval", "zeroshot", "--data", root / "eval", "--model", "tiny-vit", "--templates", "none",
                        "--exclude", out / "overlap.txt", "--out", root / "zs-none", *FAST)
    assert status == 0 and json.loads((root / "zs-none" / "report.json").read_text())["num_images"] == 15


def test_all_overlap_has_no_clean_subset_and_the_exclusion_says_so(planted, capsys):
    root, _, evaluation = planted
    out = root / "out-all"
    assert run_cli(capsys, "overlap", "--train", root / "train-all", "--data", root / "eval", "--model", "tiny-vit",
                "--templates", "none", "--out", out, *FAST)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["num_overlap"], report["overlap_share"]) == (15, 1.0)
    assert report["accuracy_clean"] is None and report["all_minus_clean"] is None
    assert report["overlap_minus_clean"] is None and report["accuracy_overlap"] == report["accuracy_all"]
    status, _, stderr = run_cli(capsys, "eval", "zeroshot", "--data", root / "eval", "--model", "tiny-vit",
                             "--exclude", out / "overlap.txt", "--out", root / "zs-all", *FAST)
    lines = error_lines(stderr)
    assert status == 2 and len(lines) == 1 and "lists every one of the 15 images" in lines[0]


@pytest.mark.parametrize("value", ["1.0001", "-1.5", "nan", "inf"])
def test_a_threshold_outside_the_cosine_range_stops_with_one_line(planted, capsys, value):
    root, _, _ = planted
    status, _, stderr = run_cli(capsys, "overlap", "--train", root / "train", "--data", root / "eval",
                             "--out", root / "never", "--threshold", value, *FAST)
    assert status == 2 and error_lines(stderr) == [f"clipforge overlap: error: --threshold is a cosine in [-1, 1], "
                                               f"got {float(value)}"]
    assert not (root / "never").exists()


def test_the_training_collection_is_embedded_and_searched_in_bounded_blocks(planted, monkeypatch):
    root, duplicates, evaluation = planted
    train = sorted(str(p) for p in (root / "train").iterdir())
    whole = find_overlap(PixelThumbnails(), train, [str(p) for p in evaluation], threshold=0.98, progress=False)
    sizes, encode = [], overlap_module.encode_images

    def recording(model, paths, *args, **kwargs):
        sizes.append((kwargs.get("desc", ""), len(paths)))
        return encode(model, paths, *args, **kwargs)

    monkeypatch.setattr(overlap_module, "encode_images", recording)
    blocked = find_overlap(PixelThumbnails(), train, [str(p) for p in evaluation], threshold=0.98, progress=False,
                           train_block=8)
    assert [n for desc, n in sizes if desc.startswith("train")] == [8, 8, 8, 8, 8, 4]
    assert blocked.train_paths == whole.train_paths
    torch.testing.assert_close(blocked.similarity, whole.similarity)
    assert torch.equal(blocked.nearest, whole.nearest)
    assert sorted(absolute_image_path(p) for p, _, _ in blocked.pairs()) == sorted(duplicates)
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(50, 7, generator=generator), torch.randn(300, 7, generator=generator)
    full = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    for chunk, limit in ((4096, 1 << 24), (16, 40), (1, 1)):  # at most `limit` similarities at once
        cosine, index = nearest_neighbours(queries, keys, chunk=chunk, max_similarities=limit)
        torch.testing.assert_close(cosine, full.max(1).values)
        assert torch.equal(index, full.argmax(1))
    search = NearestSearch(queries, chunk=16, max_similarities=40)
    for start in range(0, 300, 70):  # keys arriving block by block: the same answer
        search.add(keys[start:start + 70])
    assert search.seen == 300 and torch.equal(search.index, full.argmax(1))


def test_split_accuracy_counts_exactly_and_refuses_mismatched_lengths():
    report = split_accuracy(torch.tensor([1, 0, 1]), torch.tensor([True, False, False]))
    assert report["overlap_share"] == 1 / 3 and report["accuracy_all"] == 2 / 3
    assert report["all_minus_clean"] == 2 / 3 - 1 / 2
    with pytest.raises(ValueError, match="correct has 3 images and is_overlap 2"):
        split_accuracy(torch.tensor([1, 0, 1]), torch.tensor([True, False]))


def test_embed_folders_are_reused_only_for_the_same_model_and_unchanged_files(planted, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    root, duplicates, evaluation = planted
    train = tmp_path / "train"
    shutil.copytree(root / "train", train)
    assert run_cli(capsys, "embed", train, tmp_path / "emb", "--model", "tiny-vit", "--workers", "0", "--quiet")[0] == 0
    embedded, encode = [], overlap_module.encode_images

    def recording(model, paths, *args, **kwargs):
        if kwargs.get("desc", "").startswith("train"):
            embedded.extend(paths)
        return encode(model, paths, *args, **kwargs)

    monkeypatch.setattr(overlap_module, "encode_images", recording)
    base = ["overlap", "--train", train, "--data", root / "eval", "--features", "model", "--model", "tiny-vit", *FAST]

    def cosines(out) -> dict[str, tuple[str, float]]:
        return {row["eval_image"]: (row["nearest_train_image"], float(row["cosine"]))
                for row in csv.DictReader((out / "pairs.csv").open())}

    status, _, stderr = run_cli(capsys, *base, "--train-embeddings", tmp_path / "emb", "--out", tmp_path / "reused")
    assert status == 0 and embedded == []  # every training image came from the embed folder
    assert "44 reused, 0 embedded here (0 changed since, 0 not in it)" in stderr
    assert json.loads((tmp_path / "reused" / "report.json").read_text())["train_embeddings"]["reused"] == 44
    assert run_cli(capsys, *base, "--out", tmp_path / "fresh")[0] == 0
    fresh, reused = cosines(tmp_path / "fresh"), cosines(tmp_path / "reused")
    assert all(abs(reused[path][1] - fresh[path][1]) < 2e-3 for path in fresh)  # float16 parts

    # the training folder changes: one image now is a copy of an evaluation image, one is added
    victim = sorted(p for p in train.iterdir() if p.name.startswith("tuxpaint"))[0]
    target_eval = evaluation[10]
    Image.open(target_eval).convert("RGB").save(victim, format="PNG")
    os.utime(victim, ns=(victim.stat().st_atime_ns, (tmp_path / "emb").stat().st_mtime_ns + 10 ** 9))
    shutil.copyfile(evaluation[0], train / "added.png")
    embedded.clear()
    status, _, stderr = run_cli(capsys, *base, "--train-embeddings", tmp_path / "emb", "--out", tmp_path / "stale")
    assert status == 0 and sorted(embedded) == sorted([str(victim), str(train / "added.png")])
    assert "43 reused, 2 embedded here (1 changed since, 1 not in it)" in stderr
    stale = cosines(tmp_path / "stale")
    assert stale[absolute_image_path(target_eval)] == (absolute_image_path(victim), pytest.approx(1.0, abs=1e-5))
    assert stale[absolute_image_path(evaluation[0])][0] == absolute_image_path(train / "added.png")

    embedded.clear()  # another model's folder: nothing reused, and the reason is said
    status, _, stderr = run_cli(capsys, *base, "--seed", "1", "--train-embeddings", tmp_path / "emb",
                             "--out", tmp_path / "other")
    assert status == 0 and len(embedded) == 45 and "not reused: made by another model (fingerprint" in stderr


def test_bad_train_embeddings_stop_with_one_line(planted, tmp_path, capsys):
    root, _, _ = planted
    base = ["overlap", "--train", root / "train", "--data", root / "eval", "--out", tmp_path / "never", *FAST]
    status, _, stderr = run_cli(capsys, *base, "--train-embeddings", tmp_path)
    assert status == 2 and error_lines(stderr) == ["clipforge overlap: error: --train-embeddings holds model embeddings: "
                                               "it needs --features model (and --model, the checkpoint that made "
                                               "them); the default pixel descriptor embeds the images itself"]
    status, _, stderr = run_cli(capsys, *base, "--features", "model", "--model", "tiny-vit", "--train-embeddings", tmp_path)
    lines = error_lines(stderr)
    assert status == 2 and len(lines) == 1 and "no readable manifest.json" in lines[0]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    status, _, stderr = run_cli(capsys, *base, "--features", "model", "--model", "tiny-vit", "--train-embeddings", tmp_path)
    lines = error_lines(stderr)
    assert status == 2 and len(lines) == 1 and "is not a clipforge embed manifest" in lines[0]
    assert not (tmp_path / "never").exists()
