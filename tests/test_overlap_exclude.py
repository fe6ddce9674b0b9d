"""``overlap`` -> ``eval zeroshot --exclude`` from any folder, and both commands' argument and output checks.

Real demo images throughout: an evaluation folder whose first images are copies of training images,
and a CLIP_benchmark webdataset set read in place.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import clipforge.evaluate.overlap as overlap_module
from clipforge.evaluate import load_classification_data
from clipforge.evaluate.overlap import drop_listed
from clipforge.evaluate.report import write_zeroshot_report

from _cli_errors import error_lines, run_cli
from _protocol_layouts import demo_images, make_wds

pytestmark = pytest.mark.slow  # runs the tiny model and the CLI end to end

FAST = ["--workers", "0", "--no-cache"]


@pytest.fixture
def case(tmp_path):
    """``train.jsonl`` (20 Noto images) and ``eval/`` (2 classes): 3 exact copies of training
    images in ``eval/copies``, 3 other drawings in ``eval/others``."""
    images = [p for p in demo_images() if p.parent.name == "noto"]
    train, others = images[300:320], images[400:403]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": "an emoji"}) + "\n"
                                                  for p in train))
    for folder, sources in (("copies", train[:3]), ("others", others)):
        (tmp_path / "eval" / folder).mkdir(parents=True)
        for k, source in enumerate(sources):
            (tmp_path / "eval" / folder / f"{folder}{k}.png").write_bytes(source.read_bytes())
    return tmp_path


def overlap_args(case: Path, out, *extra) -> list:
    return ["overlap", "--train", case / "train.jsonl", "--data", case / "eval", "--out", out, *FAST, *extra]


def test_overlap_list_is_absolute_and_excludes_from_another_folder(case, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(case)  # --data and --out relative to the working folder
    status, _, _ = run_cli(capsys, "overlap", "--train", "train.jsonl", "--data", "eval", "--out", "ov", *FAST)
    assert status == 0
    listed = (case / "ov" / "overlap.txt").read_text().split()
    assert sorted(listed) == sorted(os.path.realpath(case / "eval" / "copies" / f"copies{k}.png") for k in range(3))
    rows = (case / "ov" / "pairs.csv").read_text().splitlines()[1:]
    assert all(os.path.isabs(cell) for row in rows for cell in row.split(",")[:2])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    status, out, err = run_cli(capsys, "eval", "zeroshot", "--model", "tiny-vit", "--data", case / "eval", "--templates",
                           "none", "--exclude", case / "ov" / "overlap.txt", *FAST)
    assert status == 0 and "left out 3 images listed in" in out and "6 images" not in out
    assert not [line for line in error_lines(err) if line.startswith("warning")]


def test_relative_entries_are_read_against_the_list_folder_then_the_data_folder(case):
    data = load_classification_data(case / "eval")
    lists = case / "lists"
    lists.mkdir()
    (lists / "exclude.txt").write_text("# hand-written\n"
                                       "copies/copies0.png\n"            # relative to the data set's folder
                                       "../eval/copies/copies1.png\n"    # relative to the list's folder
                                       "copies/copies1.png\n"            # the same image again
                                       "copies/missing.png\n")           # names no image
    kept, dropped, unmatched = drop_listed(data, lists / "exclude.txt")
    assert sorted(Path(p).name for p in dropped) == ["copies0.png", "copies1.png"]
    assert unmatched == ["copies/missing.png"] and len(kept.paths) == 4


def test_a_list_naming_no_image_stops_before_the_model_with_one_line(case, capsys):
    (case / "out").mkdir()
    (case / "out" / "stale.txt").write_text("eval/copies/copies0.png\n")  # relative to the working folder case/
    status, _, err = run_cli(capsys, "eval", "zeroshot", "--model", case / "no-model", "--data", case / "eval",
                         "--exclude", case / "out" / "stale.txt", *FAST)
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "Traceback" not in err
    assert "stale.txt: none of its 1 paths is an image of" in lines[0] and "relative to the list's folder" in lines[0]


def test_a_list_partly_matching_warns_with_the_count(case, capsys):
    (case / "some.txt").write_text(f"{case / 'eval' / 'copies' / 'copies2.png'}\n/elsewhere/a.png\n/elsewhere/b.png\n")
    status, out, err = run_cli(capsys, "eval", "zeroshot", "--model", "tiny-vit", "--data", case / "eval", "--templates",
                           "none", "--exclude", case / "some.txt", "--out", case / "zs", *FAST)
    assert status == 0 and "left out 1 images listed in" in out
    assert "warning: 2 path(s) in" in err and "/elsewhere/a.png" in err
    assert json.loads((case / "zs" / "report.json").read_text())["excluded"] == {
        "list": str(case / "some.txt"), "num_images": 1, "num_unmatched": 2}


def test_an_empty_list_drops_nothing(case):
    (case / "empty.txt").write_text("# clipforge overlap found nothing\n")
    kept, dropped, unmatched = drop_listed(load_classification_data(case / "eval"), case / "empty.txt")
    assert len(kept.paths) == 6 and dropped == [] and unmatched == []


@pytest.fixture
def wds_case(tmp_path):
    """A CLIP_benchmark webdataset set (4 classes x 2 images, 2 shards); training: its first 3 images."""
    samples = make_wds(tmp_path / "wds", ["ant", "bee", "cat", "dog"], templates=["a photo of a {c}."])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": str(source), "caption": "x"}) + "\n"
                                                  for source, _ in samples[:3]))
    return tmp_path


def test_webdataset_members_are_listed_excluded_and_drawn(wds_case, capsys):
    status, _, _ = run_cli(capsys, "overlap", "--train", wds_case / "train.jsonl", "--data", wds_case / "wds",
                       "--dataset", "wds", "--out", wds_case / "ov", *FAST)
    assert status == 0
    listed = (wds_case / "ov" / "overlap.txt").read_text().split()
    shard0 = os.path.realpath(wds_case / "wds" / "test" / "0.tar")
    assert sorted(listed) == [f"{shard0}#s{k:07d}.png" for k in range(3)]
    data = load_classification_data(wds_case / "wds", dataset="wds")
    (wds_case / "relative.txt").write_text("test/0.tar#s0000000.png\n")  # relative to the set's folder
    for name in ("ov/overlap.txt", "relative.txt"):
        kept, dropped, unmatched = drop_listed(data, wds_case / name)
        assert len(dropped) == (3 if name.startswith("ov") else 1) and not unmatched
        assert len(kept.paths) == 8 - len(dropped) and type(kept) is type(data)
    with Image.open(wds_case / "ov" / "contact_sheet.png") as sheet:
        eval_tile = sheet.convert("RGB").crop((0, 0, 96, 96))
    assert len(eval_tile.getcolors(96 * 96)) > 20  # the image, not an empty red box


def test_contact_sheet_reads_members_through_the_protocol(wds_case, tmp_path):
    from clipforge.evaluate.overlap import image_opener, write_contact_sheet

    data = load_classification_data(wds_case / "wds", dataset="wds")
    train_image = str(next(p for p in demo_images() if p.parent.name == "noto"))
    sheet_path = write_contact_sheet([(data.paths[0], train_image, 0.99)], tmp_path / "sheet.png",
                                     open_eval_image=image_opener(data))
    with Image.open(sheet_path) as sheet:
        tiles = [sheet.convert("RGB").crop((x, 0, x + 96, 96)) for x in (0, 98)]
    assert all(len(tile.getcolors(96 * 96)) > 20 for tile in tiles)


def test_overlap_reads_the_model_from_clipforge_model(case, monkeypatch, capsys):
    monkeypatch.setenv("CLIPFORGE_MODEL", "tiny-vit")
    status, out, _ = run_cli(capsys, *overlap_args(case, case / "ov", "--templates", "none"))
    report = json.loads((case / "ov" / "report.json").read_text())
    assert status == 0 and report["model"] == "tiny-vit" and report["accuracy_all"] is not None
    assert "zero-shot top-1 (tiny-vit)" in out


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--batch-size", "-1", "argument --batch-size: must be at least 1, got -1"),
    ("--workers", "-1", "argument --workers: must be at least 0, got -1"),
    ("--workers", "two", "argument --workers: expected an integer, got 'two'"),
])
def test_overlap_counts_are_validated(case, capsys, flag, value, message):
    status, _, err = run_cli(capsys, *overlap_args(case, case / "ov", flag, value))
    assert status == 2 and message in err and "Traceback" not in err
    assert not (case / "ov").exists()


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a chmod 555 folder, or /sys when running as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    try:
        os.mkdir("/sys/clipforge-probe")
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return Path("/sys")
    pytest.skip("no folder here refuses writes to this process")


@pytest.mark.parametrize("command", ["overlap", "zeroshot"])
@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_bad_out_folders_stop_with_one_line_before_any_compute(case, tmp_path, capsys, command, where):
    (case / "afile").write_text("not a folder\n")
    out = {"file": case / "afile", "under a file": case / "afile" / "sub",
           "read-only": (_read_only_folder(tmp_path) if where == "read-only" else case) / "out"}[where]
    cache = case / "feature-cache"
    if command == "overlap":
        argv = ["overlap", "--train", case / "train.jsonl", "--data", case / "eval"]
    else:
        argv = ["eval", "zeroshot", "--model", "tiny-vit", "--data", case / "eval"]
    status, _, err = run_cli(capsys, *argv, "--out", out, "--cache-dir", cache, "--workers", "0")
    lines = error_lines(err)
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"--out {out}: " in lines[0] and "expected a" in lines[0]
    assert not cache.exists()  # nothing was embedded
    assert (case / "afile").read_text() == "not a folder\n"


def test_1000way_needs_an_imagenet_family_dataset(case, wds_case, capsys):
    status, _, err = run_cli(capsys, "eval", "zeroshot", "--model", "tiny-vit", "--data", case / "eval",
                         "--protocol", "1000way", *FAST)
    assert status == 2 and "--protocol 1000way applies only with --dataset" in err
    for argv in (["eval", "zeroshot", "--model", "tiny-vit"], ["overlap", "--train", wds_case / "train.jsonl",
                                                               "--out", wds_case / "ov"]):
        status, _, err = run_cli(capsys, *argv, "--data", wds_case / "wds", "--dataset", "wds", "--protocol", "1000way",
                             *FAST)
        assert status == 2 and "--protocol 1000way does not apply to --dataset wds" in err


def _zeroshot_report(classes: int) -> dict:
    """A zero-shot report as ``ZeroShotResult.to_report`` writes it, for ``classes`` classes."""
    names = [f"class {k}" for k in range(classes)]
    return {"task": "zeroshot", "num_images": classes, "num_classes": classes, "metrics": {"top1": 0.5},
            "per_class": [{"class": name, "recall": k % 2} for k, name in enumerate(names)],
            "confusion_matrix": [[int(i == j) for j in range(classes)] for i in range(classes)]}


def test_a_failed_report_write_leaves_the_previous_runs_files(tmp_path, monkeypatch):
    out = tmp_path / "zs"
    write_zeroshot_report(_zeroshot_report(3), out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(before) == ["confusion_matrix.png", "per_class_accuracy.png", "report.json"]

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("clipforge.evaluate.report.write_text_atomic", full_disk)
    with pytest.raises(OSError) as caught:
        write_zeroshot_report(_zeroshot_report(5), out)  # plots differ: 5 classes
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no staging folder left either
    assert str(caught.value) == f"no space left on the device writing {out} (the previous files are intact)"


def test_a_plot_the_new_run_does_not_make_is_removed(tmp_path):
    out = tmp_path / "zs"
    write_zeroshot_report(_zeroshot_report(3), out)
    written = write_zeroshot_report(_zeroshot_report(40), out)  # over 30 classes: no confusion matrix
    assert sorted(path.name for path in out.iterdir()) == ["per_class_accuracy.png", "report.json"]
    assert sorted(path.name for path in written) == ["per_class_accuracy.png", "report.json"]
    assert oct((out / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_docstring_threshold_matches_the_default():
    threshold = overlap_module.DEFAULT_THRESHOLDS["pixels"]
    assert f"Threshold {threshold}." in overlap_module.__doc__ and "0.97" not in overlap_module.__doc__
