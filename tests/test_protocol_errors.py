"""Bad evaluation-set layouts stop with one line naming the file and what was expected: ObjectNet's
mapping files, flat ImageNet's ground truth, webdataset shards, unreadable or non-UTF-8 files, a
file given for a folder; and the command turns any such OSError into that line with exit 2."""
from __future__ import annotations

import errno
import gzip
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import clipforge.cli.eval as eval_cli
from clipforge.cli import main
from clipforge.evaluate.protocols import load_protocol_data

from _protocol_layouts import copy_image, demo_images, make_class_folders, make_objectnet, make_wds, wnid_table

ROOT = Path(__file__).resolve().parents[1]
MAPPINGS = "objectnet-1.0/mappings"


def one_line_error(capsys, *args: str) -> str:
    """The single stderr line of ``clipforge eval zeroshot ARGS`` that exits 2 (the data fails before the model)."""
    assert main(["eval", "zeroshot", "--model", "tiny-vit", "--workers", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def objectnet_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectnet")
    make_objectnet(root)
    return root


@pytest.fixture
def objectnet(objectnet_release, tmp_path):
    """A copy of the release with its own mappings (the images folder linked, not copied)."""
    copy = tmp_path / "objectnet"
    (copy / "objectnet-1.0").mkdir(parents=True)
    (copy / "objectnet-1.0" / "images").symlink_to(objectnet_release / "objectnet-1.0" / "images")
    shutil.copytree(objectnet_release / MAPPINGS, copy / MAPPINGS)
    return copy


def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


LABELS, IDS, TO_IMAGENET, FOLDERS = ("imagenet_to_label_2012_v2", "pytorch_to_imagenet_2012_id.json",
                                     "objectnet_to_imagenet_1k.json", "folder_to_objectnet_label.json")
# defect -> (file damaged, how, file the error names, what it says); class 0 has 2012 id 3 (line 4).
OBJECTNET_DEFECTS = {
    "extra label line": (LABELS, lambda p: p.write_text(p.read_text() + "an extra label\n"), LABELS,
                         f"line 1001 ('an extra label') is 2012 id 1000, which {IDS} gives no class"),
    "id missing": (IDS, lambda p: _edit_json(p, lambda m: _without(m, "0")), LABELS,
                   f"line 4 ('tench (0)') is 2012 id 3, which {IDS} gives no class"),
    "number for labels": (TO_IMAGENET, lambda p: _edit_json(p, lambda m: {**m, "thing 000": 5}), TO_IMAGENET,
                          "'thing 000' maps to 5; expected a JSON object of ObjectNet label -> ImageNet labels"),
    "list for object": (FOLDERS, lambda p: p.write_text('["object_000"]'), FOLDERS,
                        "expected a JSON object of folder name -> ObjectNet label (a string), found an array"),
    "text for id": (IDS, lambda p: _edit_json(p, lambda m: {**m, "0": "abc"}), IDS,
                    "'0' maps to 'abc'; expected a JSON object of class index (0..999) -> ImageNet 2012 id"),
    "class index out of range": (IDS, lambda p: _edit_json(p, lambda m: {**_without(m, "0"), "1000": m["0"]}), IDS,
                                 "'1000' maps to 3; expected a JSON object of class index (0..999)"),
    "two classes, one id": (IDS, lambda p: _edit_json(p, lambda m: {**m, "1": m["0"]}), IDS,
                            "classes 0 and 1 both map to 2012 id 3"),
    "not UTF-8": (FOLDERS, lambda p: p.write_bytes(b"\xff" + p.read_bytes()), FOLDERS,
                  "not UTF-8 text (byte 0: invalid start byte)"),
}


@pytest.mark.parametrize("defect", OBJECTNET_DEFECTS)
def test_objectnet_mapping_of_the_wrong_shape_is_one_line_naming_the_file(objectnet, defect, capsys):
    damaged, damage, named, expected = OBJECTNET_DEFECTS[defect]
    damage(objectnet / MAPPINGS / damaged)
    with pytest.raises(ValueError) as raised:
        load_protocol_data(objectnet, "objectnet")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{objectnet / MAPPINGS / named}: ") and expected in message
    err = one_line_error(capsys, "--dataset", "objectnet", "--data", str(objectnet))
    assert err == f"clipforge eval: error: {message}"


@pytest.fixture
def flat(tmp_path):
    """A flat ImageNet validation folder of three real JPEGs, no ground truth yet."""
    for number in range(1, 4):
        copy_image(demo_images()[number * 5], tmp_path / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", jpeg=True)
    return tmp_path / "val"


def _savemat(path: Path, **variables) -> None:
    pytest.importorskip("scipy.io").savemat(path, variables)


def _meta(rows: list[tuple[int, str, int]]) -> np.ndarray:
    synsets = np.zeros(len(rows), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, row in enumerate(rows):
        synsets[k] = row
    return synsets.reshape(-1, 1)


GROUND_TRUTH, KAGGLE, META = "ILSVRC2012_validation_ground_truth.txt", "LOC_val_solution.csv", "meta.mat"
# defect -> (file written, its content, file the error names, what it says); meta.mat cases get ids 1, 2, 1.
FLAT_DEFECTS = {
    "kaggle row without a label": (
        KAGGLE, "ImageId,PredictionString\nILSVRC2012_val_00000002,n01440764 1 2 3 4\nILSVRC2012_val_00000001,\n",
        KAGGLE, "line 3: ILSVRC2012_val_00000001 has no label; expected a PredictionString"),
    "kaggle without its header": (KAGGLE, "ILSVRC2012_val_00000001,n01440764 1 2 3 4\n", KAGGLE,
                                  "expected Kaggle's header ImageId,PredictionString, found ILSVRC2012_val_00000001"),
    "junk meta.mat": (META, b"this is not a MATLAB file\n", META, "not a readable MATLAB file ("),
    "numbers for synsets": (META, lambda path: _savemat(path, synsets=np.arange(5)), META,
                            "expected the devkit's meta.mat: a 'synsets' struct array with the fields"),
    "no leaf synset": (META, lambda path: _savemat(path, synsets=_meta([(1, "n00001740", 3)])), META,
                       "'synsets' holds no leaf classes"),
    "id outside meta.mat": (META, lambda path: _savemat(path, synsets=_meta([(1, "n01440764", 0)])), GROUND_TRUTH,
                            "entry 2 is '2', neither a wnid nor an ILSVRC2012 id of"),
    "ground truth not UTF-8": (GROUND_TRUTH, b"n01440764\n\xff\n", GROUND_TRUTH,
                               "not UTF-8 text (byte 10: invalid start byte)"),
    "kaggle not UTF-8": (KAGGLE, b"ImageId,PredictionString\n\xff\n", KAGGLE, "not UTF-8 text"),
}


@pytest.mark.parametrize("defect", FLAT_DEFECTS)
def test_flat_imagenet_bad_ground_truth_is_one_line_naming_the_file(flat, defect, capsys):
    written, content, named, expected = FLAT_DEFECTS[defect]
    if written == META:
        (flat / GROUND_TRUTH).write_text("1\n2\n1\n")
    if callable(content):
        content(flat / written)
    elif isinstance(content, bytes):
        (flat / written).write_bytes(content)
    else:
        (flat / written).write_text(content)
    with pytest.raises(ValueError) as raised:
        load_protocol_data(flat, "imagenet")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{flat / named}: ") and expected in message, message
    assert one_line_error(capsys, "--dataset", "imagenet", "--data", str(flat)) == f"clipforge eval: error: {message}"


@pytest.mark.parametrize("dataset", ["imagenet", "imagenet-v2", "imagenet-r", "objectnet", "wds"])
def test_a_file_given_for_the_data_folder_is_called_a_file(tmp_path, dataset, capsys):
    given = tmp_path / "val.tar"
    given.write_bytes(b"not a folder")
    with pytest.raises(ValueError, match=rf"^{given}: is a file, not a folder \(expected "):
        load_protocol_data(given, dataset)
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'absent'}: no such folder \(expected "):
        load_protocol_data(tmp_path / "absent", dataset)
    assert "is a file, not a folder" in one_line_error(capsys, "--dataset", dataset, "--data", str(given))


@pytest.fixture
def wds(tmp_path):
    make_wds(tmp_path / "wds", ["cat", "dog", "fish"])
    return tmp_path / "wds"


def _add_shard(root: Path, members: list[tuple[str, bytes]], name: str = "9.tar") -> Path:
    with tarfile.open(root / "test" / name, "w") as archive:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return root / "test" / name


def test_upper_case_image_and_label_suffixes_are_one_sample(wds):
    image = demo_images()[7]
    _add_shard(wds, [("y.PNG", image.read_bytes()), ("y.CLS", b"2\n")])
    data = load_protocol_data(wds, "wds")
    assert data.paths[-1] == f"{wds / 'test' / '9.tar'}#y.PNG" and data.labels[-1] == 2
    from PIL import Image

    read = data.wrap_preprocess(np.asarray)(data.paths[-1])
    assert np.array_equal(read, np.asarray(Image.open(image)))


@pytest.mark.parametrize("compress, name", [(gzip.compress, "gzip"), (lzma.compress, "xz")])
def test_compressed_shard_named_tar_is_refused_in_one_line(wds, compress, name, capsys):
    shard = wds / "test" / "0.tar"
    shard.write_bytes(compress(shard.read_bytes()))  # tarfile would index it; offsets into it would be wrong
    with pytest.raises(ValueError, match=rf"^{shard}: a {name}-compressed tar; images are read by offset from "
                                         rf"plain tar shards, so decompress it first"):
        load_protocol_data(wds, "wds")
    assert one_line_error(capsys, "--dataset", "wds", "--data", str(wds)).endswith("> plain.tar)")


@pytest.mark.parametrize("content, expected", [
    (b"hello world" * 10, "not a readable tar file (truncated header)"),
    (b"", "not a readable tar file (empty file)"),
])
def test_a_shard_that_is_not_a_tar_is_one_line(wds, content, expected, capsys):
    (wds / "test" / "1.tar").write_bytes(content)
    err = one_line_error(capsys, "--dataset", "wds", "--data", str(wds))
    assert err == f"clipforge eval: error: {wds / 'test' / '1.tar'}: {expected}"


@pytest.mark.parametrize("label, shown", [(b"dog", "'dog'"), (b"\xff1", r"b'\xff1'")])
def test_a_label_that_is_not_an_integer_names_the_member(wds, label, shown):
    _add_shard(wds, [("x.png", demo_images()[3].read_bytes()), ("x.cls", label)])
    with pytest.raises(ValueError, match=re.escape(f"9.tar#x.cls: expected an integer class, got {shown}") + "$"):
        load_protocol_data(wds, "wds")


def test_classnames_not_utf8_names_the_file(wds, capsys):
    (wds / "classnames.txt").write_bytes(b"cat\n\xffdog\n")
    err = one_line_error(capsys, "--dataset", "wds", "--data", str(wds))
    assert err == (f"clipforge eval: error: {wds / 'classnames.txt'}: not UTF-8 text (byte 4: invalid start byte); "
                   "save it as UTF-8")


def test_unreadable_class_folder_is_reported_unreadable_not_empty(tmp_path, monkeypatch, capsys):
    root = tmp_path / "imagenet-r"
    make_class_folders(root, wnid_table("imagenet_r"))
    locked = root / "n01484850"
    scandir = os.scandir

    def refuse(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)  # what os.walk meets in a mode-000 folder (tests run as root)
    with pytest.raises(PermissionError) as raised:
        load_protocol_data(root, "imagenet-r")
    assert raised.value.filename == str(locked)
    err = one_line_error(capsys, "--dataset", "imagenet-r", "--data", str(root))
    assert err == f"clipforge eval: error: Permission denied: {locked}"


def test_unreadable_mapping_file_is_one_line_naming_it(objectnet, monkeypatch, capsys):
    locked = objectnet / MAPPINGS / "objectnet_to_imagenet_1k.json"
    read_text = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    err = one_line_error(capsys, "--dataset", "objectnet", "--data", str(objectnet))
    assert err == f"clipforge eval: error: Permission denied: {locked}"


@pytest.mark.parametrize("raised, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/val"), "Permission denied: /data/val"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/report/x"), "Not a directory: /runs/report/x"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/gt.txt"), "Is a directory: /data/gt.txt"),
    (FileExistsError(errno.EEXIST, "File exists", "/runs/a", None, "/runs/b"), "File exists: /runs/a -> /runs/b"),
    (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
    (FileExistsError("out/ already holds 3 shards;\n remove them"), "out/ already holds 3 shards; remove them"),
])
def test_command_turns_os_errors_about_files_into_one_line_exit_2(raised, expected, monkeypatch, capsys):
    def fail(args):
        raise raised

    monkeypatch.setattr(eval_cli, "run_zeroshot", fail)
    assert one_line_error(capsys, "--data", "anything") == f"clipforge eval: error: {expected}"


@pytest.mark.parametrize("raised", [OSError(errno.ENOMEM, "Cannot allocate memory"), OSError("a library's own")])
def test_os_errors_naming_no_file_stay_crashes(raised, monkeypatch):
    def fail(args):
        raise raised

    monkeypatch.setattr(eval_cli, "run_zeroshot", fail)
    with pytest.raises(OSError) as caught:
        main(["eval", "zeroshot", "--model", "tiny-vit", "--data", "anything"])
    assert caught.value is raised


def _unprivileged() -> list[str]:
    """A command prefix under which mode-000 files cannot be read, or skip."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without a working setpriv to drop the permission override")
    return prefix


@pytest.mark.slow
def test_mode_000_data_is_one_line_in_a_real_process(tmp_path, wds):
    prefix = _unprivileged()
    root = tmp_path / "imagenet-r"
    make_class_folders(root, wnid_table("imagenet_r"))
    flat_root = tmp_path / "flat"
    copy_image(demo_images()[1], flat_root / "ILSVRC2012_val_00000001.JPEG", jpeg=True)
    (flat_root / "ILSVRC2012_validation_ground_truth.txt").write_text("n01440764\n")
    cases = [(root / "n01484850", "imagenet-r", root), (root, "imagenet-r", root),
             (flat_root / "ILSVRC2012_validation_ground_truth.txt", "imagenet", flat_root),
             (wds / "test" / "1.tar", "wds", wds)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for locked, dataset, data in cases:
        locked.chmod(0)
        try:
            command = [sys.executable, "-m", "clipforge", "eval", "zeroshot", "--model", "tiny-vit",
                       "--dataset", dataset, "--data", str(data)]
            done = subprocess.run([*prefix, *command], capture_output=True, text=True, env=env, timeout=300)
        finally:
            locked.chmod(0o755)
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"clipforge eval: error: Permission denied: {locked}\n"
