"""One-line errors and whole output files for every command (issue 16, items 3, 11 and 12):
atomic outputs on a full disk, path-type mistakes, messages that name the file and the option."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main

from _train_data import draw_shape, make_shapes

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save(clipforge.create_model("tiny-vit"), folder)
    return folder


def _error(capsys, command) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"clipforge {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _disk_full_after(limit: int):
    """A ``write`` that takes ``limit`` bytes, then fails as a full disk does."""
    written = [0]

    def write(self, data):
        if written[0] + len(data) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return len(data)
    return write


def test_convert_on_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.pt"
    assert main(["convert", str(model_dir), str(out), "--to", "openai"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    real_save = torch.save

    def save_on_full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as file:
            file.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save_on_full_disk)
    assert main(["convert", str(model_dir), str(out), "--to", "openai"]) == 2
    line = _error(capsys, "convert")
    assert f"no space left on the device writing {out}" in line
    assert out.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no partial temporary
    monkeypatch.setattr(torch, "save", real_save)
    clipforge.load(out)


def test_convert_safetensors_on_a_full_disk_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import clipforge.checkpoints.write as write
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(write, "save_file", save_file)
    assert main(["convert", str(model_dir), str(tmp_path / "out"), "--to", "clipforge"]) == 2
    assert "no space left on the device writing" in _error(capsys, "convert")
    assert list((tmp_path / "out").iterdir()) == []


def _eval_folder(root: Path) -> Path:
    for index, name in enumerate(["red", "blue"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            draw_shape(name, "circle", i + index).save(root / name / f"{i}.png")
    return root


def test_eval_report_and_plots_on_a_full_disk_keep_the_previous_report(model_dir, tmp_path, capsys, monkeypatch):
    data = _eval_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["eval", "zeroshot", "--model", str(model_dir), "--data", str(data), "--templates", "none",
            "--workers", "0", "--no-cache", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"report.json", "per_class_accuracy.png", "confusion_matrix.png"}
    capsys.readouterr()
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kw: (Path(fname).write_bytes(b"\x89PNG"),
                                                                       _raise_enospc()))
    assert main(args) == 2
    assert "no space left on the device writing" in _error(capsys, "eval")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _raise_enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_shards_on_a_full_disk_leave_no_partial_shard(shapes, tmp_path, capsys, monkeypatch):
    import tarfile
    out = tmp_path / "shards"
    real_addfile = tarfile.TarFile.addfile
    calls = [0]

    def addfile(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, *args, **kwargs)
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    assert main(["shards", str(shapes.parent), str(shapes), str(out), "--max-count", "2"]) == 2
    assert "no space left on the device writing shards into" in _error(capsys, "shards")
    assert list(out.iterdir()) == []


def test_a_bad_sizes_json_names_the_file(shapes, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", str(shapes.parent), str(shapes), str(out), "--max-count", "4"]) == 0
    (out / "sizes.json").write_text("{not json")
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(out / "data-{000000..000001}.tar"),
                 "--batch-size", "2", "--steps", "1", "--run-dir", str(tmp_path / "run")]) == 2
    assert f"{out / 'sizes.json'}: not valid JSON" in _error(capsys, "train")


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "tiny", "--data", "{shapes}", "--device", "cuda", "--run-dir", "{tmp}/r"],
     "CUDA is not available on this machine"),
    (["train", "--preset", "tiny", "--data", "{shapes}", "--device", "foo", "--run-dir", "{tmp}/r"],
     "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
    (["classify", "{image}", "--labels", "a,b", "--model", "{model}", "--device", "cuda"],
     "--device: device 'cuda' was asked for but CUDA is not available"),
    (["classify", "{image}", "--labels", "a,b", "--model", "{model}", "--device", "foo"],
     "got 'foo'"),
    (["train", "--preset", "tiny", "--data", "{shapes}", "--run-dir", "{file}"],
     "--run-dir {file}: is a file; expected a folder"),
    (["train", "--preset", "tiny", "--data", "{images}", "--run-dir", "{tmp}/r"], "no .tar shards in folder"),
    (["shards", "{root}", "{shapes}", "{file}"], "{file}: is a file; expected a folder to write the shards"),
    (["shards", "{images}", "{shapes}", "{tmp}/s"], "say where they are with --set data.image_root=DIR (train) or SRC_DIR"),
    (["shards", "{file}", "{shapes}", "{tmp}/s"], "{file}: is a file; expected the folder the listed images"),
    (["shards", "{images}", "{images}", "{tmp}/s"], "is a folder; expected a caption file"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{evaldata}", "--out", "{file}"],
     "--out {file}: is a file; expected a folder"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{evaldata}", "--cache-dir", "{file}"],
     "--cache-dir {file}: is a file; expected a folder"),
    (["eval", "retrieval", "--model", "{model}", "--data", "{images}"],
     "is a folder; retrieval --data takes a captions file"),
    (["eval", "retrieval", "--model", "{model}", "--data", "{coco}"],
     "images entry 1 needs 'id' and 'file_name' (COCO captions)"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{dogs}", "--workers", "0", "--no-cache"],
     "labels 'Dog' and 'dog' differ only in case"),
    (["classify", "{loop}", "--labels", "a,b", "--model", "{model}"], "{loop}: is a symbolic link loop"),
    (["convert", "{loop}", "{tmp}/o", "--to", "clipforge"], "{loop}: is a symbolic link loop"),
    (["classify", "{images}", "--labels", "a,b", "--model", "{model}"], "is a folder; classify takes image files"),
    (["classify", "{image}", "--labels-file", "{latin1}", "--model", "{model}"],
     "--labels-file {latin1}: not UTF-8 text"),
    (["classify", "{image}", "--labels-file", "{images}", "--model", "{model}"], "is a folder; expected a text file"),
    (["classify", "{image}", "--labels", "a,b", "--model", "{nosafe}"],
     "{nosafe}/model.safetensors: missing; expected the model's weights"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{foobar}"], "names no image column"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{latin1csv}"], "{latin1csv}: not UTF-8 text"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{evaldata}", "--batch-size", "0"], None),
])
def test_mistakes_are_one_line_naming_the_file_or_option(shapes, model_dir, tmp_path, capsys, args, message):
    names = {"shapes": str(shapes), "images": str(shapes.parent / "images"), "tmp": str(tmp_path), "root": str(shapes.parent),
             "image": str(next((shapes.parent / "images").iterdir())), "model": str(model_dir),
             "file": str(tmp_path / "a-file"), "evaldata": str(_eval_folder(tmp_path / "evaldata")),
             "coco": str(tmp_path / "coco.json"), "dogs": str(tmp_path / "dogs"), "loop": str(tmp_path / "loop1"),
             "latin1": str(tmp_path / "labels.txt"), "nosafe": str(tmp_path / "nosafe")}
    (tmp_path / "a-file").write_text("x")
    names.update(foobar=str(tmp_path / "foobar.csv"), latin1csv=str(tmp_path / "latin1.csv"))
    (tmp_path / "foobar.csv").write_text("foo,bar\nred/0.png,red\n")
    (tmp_path / "latin1.csv").write_bytes("image,label\nred/0.png,café\n".encode("latin-1"))
    (tmp_path / "coco.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    for name in ("Dog", "dog"):
        (tmp_path / "dogs" / name).mkdir(parents=True)
        draw_shape("red", "circle", 0).save(tmp_path / "dogs" / name / "0.png")
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    (tmp_path / "labels.txt").write_bytes("café\ndog\n".encode("latin-1"))
    (tmp_path / "nosafe").mkdir()
    (tmp_path / "nosafe" / "config.json").write_text((model_dir / "config.json").read_text())
    argv = [part.format(**names) for part in args]
    if message is None:  # an argparse usage error
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
        return
    assert main(argv) == 2
    assert message.format(**names) in _error(capsys, argv[0])


def test_linear_probe_with_one_image_per_class_explains_c_and_names_the_classes(model_dir, tmp_path, capsys):
    data = tmp_path / "one"
    for index, name in enumerate(["cat", "dog"]):
        (data / name).mkdir(parents=True)
        draw_shape("red" if index else "blue", "square", index).save(data / name / "0.png")
    assert main(["eval", "linear-probe", "--model", str(model_dir), "--train", str(data), "--test", str(data),
                 "--workers", "0", "--no-cache"]) == 0
    captured = capsys.readouterr()
    assert "C         1 (not tuned, see the note)" in captured.out
    assert ("note: C was not tuned: 2 class(es) have a single training image ('cat', 'dog'), so none could be "
            "held out to choose C on; used C=1.0") in captured.err
    assert main(["eval", "linear-probe", "--model", str(model_dir), "--train", str(data), "--test", str(data),
                 "--workers", "0", "--no-cache", "--few-shot", "2"]) == 2
    assert "class 'cat' has 1 training images, fewer than the 2 per class of a 2-shot probe" in _error(capsys, "eval")


@pytest.mark.slow
def test_classify_into_a_closed_pipe_is_quiet(shapes, model_dir):
    images = sorted(str(p) for p in (shapes.parent / "images").iterdir())
    command = (f"{sys.executable} -m clipforge.cli classify {' '.join(images * 100)} --labels red,blue --json "
               f"--templates none --model {model_dir} | head -1")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_messages_name_the_cli_option(shapes, tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--data", str(shapes), "--set", "data.caption_key=nope",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "--set data.caption_key=NAME" in _error(capsys, "train")
    assert main(["train", "--preset", "tiny", "--data", str(shapes), "--batch-size", "64",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "data.workers (--set data.workers=N)" in _error(capsys, "train")
    from clipforge.data.skips import TooManyBadSamples
    assert "--set data.max_skip_fraction=" in str(TooManyBadSamples(5, 10, 0.01, [("a", "bad")]))
