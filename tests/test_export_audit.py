"""Audit of ``clipforge convert --to onnx``: where an export may land, what a failed or killed run
leaves, arguments checked before anything is written, and the calibration sample."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

import torch  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import main  # noqa: E402
from clipforge.export import convert_to_onnx, export_onnx, load_export  # noqa: E402

from _checkpoint_helpers import tiny_model  # noqa: E402
from _cli_errors import run_cli as run  # noqa: E402
from _eval_helpers import COLORS, make_color_folder, write_tinted_image  # noqa: E402

CLASSES = {"red": ["red"] * 3, "green": ["green"] * 3, "blue": ["blue"] * 3}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))


def test_an_export_never_lands_in_a_checkpoint_or_other_non_empty_folder(tmp_path):
    model = tiny_model("tiny-vit")
    checkpoint = clipforge.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: holds .*config\.json.*, not an ONNX export; expected a new or empty"):
        export_onnx(model, checkpoint)
    loaded, _ = clipforge.load(checkpoint)  # still the PyTorch checkpoint, not shadowed by an export
    assert type(loaded).__name__ == "CLIP" and not list(checkpoint.glob("*.onnx"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds keep.txt, not an ONNX export"):
        export_onnx(model, tmp_path / "notes")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert export_onnx(model, tmp_path / "empty") == tmp_path / "empty"  # an empty folder is fine


def test_reexport_replaces_the_earlier_int8_export_and_lists_only_its_own_graphs(capsys, tmp_path):
    checkpoint = clipforge.save(tiny_model("tiny-vit"), tmp_path / "ckpt")
    images = make_color_folder(tmp_path / "calib", CLASSES)
    out = tmp_path / "out"
    status, _, err = run(capsys, "convert", checkpoint, out, "--to", "onnx", "--quantize", "int8",
                         "--quantize-mode", "dynamic", "--calibration", images, "--templates", "none")
    assert status == 0, err
    (out / ".image.onnx.tmp-999999").write_bytes(b"half a graph")  # what a killed run leaves behind
    status, stdout, err = run(capsys, "convert", checkpoint, out, "--to", "onnx")
    assert status == 0, err
    first = stdout.splitlines()[0]
    assert "int8" not in first and first.endswith("MB; replaced the earlier export there)"), first
    assert sorted(p.name for p in out.iterdir()) == ["image.onnx", "onnx_export.json", "text.onnx"]
    assert load_export(out)[0].precision == "fp32"


@pytest.mark.parametrize("stage", ["quantize_export", "compare_precisions"])
def test_a_run_that_dies_before_int8_is_measured_leaves_no_loadable_folder(tmp_path, monkeypatch, stage):
    """The metadata of an int8 conversion says unfinished until its accuracy is written: a kill at
    either stage (here an exception where the kill would land) must not leave an export that loads."""
    import clipforge.export.accuracy
    import clipforge.export.quantize

    module = {"quantize_export": clipforge.export.quantize, "compare_precisions": clipforge.export.accuracy}[stage]

    def dies(*args, **kwargs):
        """Stands in for the stage, killed: what is on disk when it starts is what a kill leaves."""
        if stage == "compare_precisions":
            meta = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
            assert meta["precision"] == "int8"  # the int8 graphs are in, only their measurement is not
        raise KeyboardInterrupt

    monkeypatch.setattr(module, stage, dies)
    images = make_color_folder(tmp_path / "calib", CLASSES)
    with pytest.raises(KeyboardInterrupt):
        convert_to_onnx(tiny_model("tiny-vit"), tmp_path / "out", quantize="int8", mode="dynamic",
                        calibration=images, templates=None, progress=False)
    with pytest.raises(ValueError, match=r"onnx_export\.json: an unfinished export \(int8 quantisation"):
        clipforge.load(tmp_path / "out")
    monkeypatch.undo()  # a second run finishes the folder
    summary = convert_to_onnx(tiny_model("tiny-vit"), tmp_path / "out", quantize="int8", mode="dynamic",
                              calibration=images, templates=None, progress=False)
    assert summary["accuracy"]["templates"] == "none"  # bare class names, not "custom"
    assert summary["accuracy"]["image_cosine_mean"] >= 0.99
    meta = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
    assert "unfinished" not in meta and meta["quantization"]["accuracy"] == summary["accuracy"]
    assert clipforge.load(tmp_path / "out")[0].precision == "int8"


@pytest.mark.parametrize("case", ["unreadable-calibration", "calibration-file", "threads", "calibration-alone",
                                  "mode-alone", "templates-alone"])
def test_bad_calibration_images_and_arguments_fail_before_anything_is_written(capsys, tmp_path, case):
    checkpoint = clipforge.save(tiny_model("tiny-vit"), tmp_path / "ckpt")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "a.jpg").write_text("not a jpeg")
    (tmp_path / "fake" / "b.png").write_bytes(b"\x89PNG but cut short")
    good = make_color_folder(tmp_path / "calib", CLASSES)
    extra, message = {
        "unreadable-calibration": (["--quantize", "int8", "--calibration", tmp_path / "fake"],
                                   f"--calibration {tmp_path / 'fake'}: none of the 2 images could be read"),
        "threads": (["--threads", "0"], "--threads must be at least 1, got 0"),
        "calibration-file": (["--quantize", "int8", "--calibration", tmp_path / "fake" / "a.jpg"],
                             "a.jpg: is a file; expected a folder of images"),
        "calibration-alone": (["--calibration", good], "--calibration applies to --quantize int8 only"),
        "mode-alone": (["--quantize-mode", "dynamic"], "--quantize-mode applies to --quantize int8 only"),
        "templates-alone": (["--templates", "none"], "--templates applies to --quantize int8 only"),
    }[case]
    status, _, err = run(capsys, "convert", checkpoint, tmp_path / "out", "--to", "onnx", *extra)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before the export, not after it
    if case in ("mode-alone", "templates-alone"):
        status, _, err = run(capsys, "convert", checkpoint, tmp_path / "o.pt", "--to", "openai", *extra)
        assert status == 2 and "apply to --to onnx only" in err and not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("extra", [["--threads", "0"], ["--opset", "9"], ["--templates", "no-such-set"],
                                   ["--quantize-mode", "dynamic"]])
def test_bad_onnx_options_are_refused_before_the_source_is_read(capsys, tmp_path, extra):
    status, _, err = run(capsys, "convert", tmp_path / "no-such-checkpoint", tmp_path / "out", "--to", "onnx", *extra)
    assert status == 2 and extra[0] in err and "no-such-checkpoint" not in err, err  # the option, not the source


def test_the_calibration_sample_spreads_over_a_class_sorted_folder(tmp_path):
    from clipforge.export.calibration import image_batches, read_calibration_folder

    folder = make_color_folder(tmp_path / "calib", CLASSES)  # 3 classes of 3 images, sorted by class
    calibration = read_calibration_folder(folder)
    preprocess = clipforge.image_transform(32)
    (batch,) = image_batches(calibration.paths, preprocess, limit=3)  # (3, 3, 32, 32)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    rgb = (torch.from_numpy(batch) * std + mean).mean(dim=(2, 3))  # (3, 3) mean colour of each image
    dominant = {list(COLORS)[int(i)] for i in rgb.argmax(dim=1)}
    assert dominant == {"red", "green", "blue"}  # one of each class, not the first three (all blue)

    bad = []
    for i in range(2):
        bad.append(tmp_path / f"bad{i}.jpg")
        bad[-1].write_text("not an image")
    good = [write_tinted_image(tmp_path / f"good{i}.png", "red", i) for i in range(2)]
    batches = image_batches([str(p) for p in bad + good], preprocess, limit=2)  # the sampled two are unreadable
    assert [b.shape for b in batches] == [(2, 3, 32, 32)]


def test_half_precision_model_parity_is_against_its_float32_copy(tmp_path):
    from clipforge.export.pipeline import fp32_parity

    model = tiny_model("tiny-vit").half()
    folder = export_onnx(model, tmp_path / "out")
    parity = fp32_parity(model, folder, threads=1)
    assert parity["image_max_abs"] <= 1e-4 and parity["text_max_abs"] <= 1e-4, parity
    assert model.dtype == torch.float16  # the caller's model is left as it was


def test_an_export_checks_the_image_size_in_one_line_and_takes_an_empty_batch(tmp_path):
    model = tiny_model("tiny-rn")
    exported, preprocess = load_export(export_onnx(model, tmp_path / "out"), threads=1)
    size = model.config.vision.image_size
    with pytest.raises(ValueError, match=rf"^images must have shape \(N, 3, {size}, {size}\) for this export"):
        exported.encode_image(torch.zeros(1, 3, size * 2, size * 2))
    assert exported.encode_image(torch.zeros(0, 3, size, size)).shape == (0, model.config.embed_dim)


def test_help_names_the_onnx_output(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "ONNX" in listing.split(" convert ", 1)[1].split(" shards ", 1)[0]
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    dst = capsys.readouterr().out.split("  dst", 1)[1].split("\n\n", 1)[0]
    assert "onnx" in " ".join(dst.split())


KILLED_RUN = """
import os, signal, sys
import torch
import clipforge
import clipforge.export.accuracy
from clipforge.export import convert_to_onnx

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the int8 graphs are written, their measurement is not

clipforge.export.accuracy.compare_precisions = killed
torch.manual_seed(0)
convert_to_onnx(clipforge.create_model("tiny-vit").eval(), sys.argv[1], quantize="int8", mode="dynamic",
                calibration=sys.argv[2], templates=None, progress=False)
"""


def test_a_convert_killed_while_measuring_int8_leaves_a_folder_that_does_not_load(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    images = make_color_folder(tmp_path / "calib", CLASSES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "out"), str(images)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "out" / "image.int8.onnx").is_file()  # killed after quantising
    with pytest.raises(ValueError, match="an unfinished export"):
        clipforge.load(tmp_path / "out")


def test_graphs_that_do_not_match_pytorch_are_an_error_not_a_printed_number(tmp_path, monkeypatch):
    import clipforge.export.onnx as onnx_module

    forward = onnx_module.TextTower.forward
    monkeypatch.setattr(onnx_module.TextTower, "forward", lambda self, tokens: forward(self, tokens) * 1.01)
    with pytest.raises(ValueError, match=r"fp32 graphs differ from PyTorch by .* \(text\), above the .* tolerance"):
        convert_to_onnx(tiny_model("tiny-vit"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "onnx_export.json").exists()  # nothing loads as this export
    monkeypatch.undo()
    parity = convert_to_onnx(tiny_model("tiny-vit"), tmp_path / "out", progress=False)["parity"]
    assert max(parity["image_max_abs"], parity["text_max_abs"]) <= parity["tolerance"]
    assert 1e-4 <= parity["tolerance"] <= 1e-3  # 1e-4 per unit of the largest embedding entry


def test_a_graph_changed_after_export_is_refused_on_load(tmp_path):
    model = tiny_model("tiny-vit")
    first = export_onnx(model, tmp_path / "first")
    other_model = tiny_model("tiny-vit")
    with torch.no_grad():
        other_model.visual.proj.mul_(2.0)  # another image tower with the same graph shape
    second = export_onnx(other_model, tmp_path / "second")
    (first / "image.onnx").write_bytes((second / "image.onnx").read_bytes())  # swapped behind the metadata
    with pytest.raises(ValueError, match=r"first/image\.onnx: its SHA-256 is not the one onnx_export\.json recorded"):
        clipforge.load(first)
    assert clipforge.load(second)[0].precision == "fp32"  # an untouched export still loads


def test_a_calibration_folder_with_an_empty_class_says_why_it_has_no_top1(capsys, tmp_path):
    checkpoint = clipforge.save(tiny_model("tiny-vit"), tmp_path / "ckpt")
    images = make_color_folder(tmp_path / "calib", CLASSES)
    (images / "purple").mkdir()  # a class folder the user has not filled yet
    status, _, err = run(capsys, "convert", checkpoint, tmp_path / "out", "--to", "onnx", "--quantize", "int8",
                         "--quantize-mode", "dynamic", "--calibration", images, "--templates", "none")
    assert status == 0, err
    assert "its sub-folders are not read as classes" in err and "'purple'" in err, err
    meta = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
    assert "top1" not in json.dumps(meta["quantization"]["accuracy"])  # measured on images alone, as said


@pytest.mark.parametrize("to", ["onnx", "openai", "clipforge"])
def test_converting_from_an_export_folder_says_it_is_one(capsys, tmp_path, to):
    export = export_onnx(tiny_model("tiny-vit"), tmp_path / "export")
    status, _, err = run(capsys, "convert", export, tmp_path / "out.pt" if to == "openai" else tmp_path / "out",
                         "--to", to)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "export: is an ONNX export, which holds graphs, not PyTorch weights" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pt").exists()
    with pytest.raises(clipforge.checkpoints.CheckpointError, match="is an ONNX export"):
        clipforge.checkpoints.load_model(export)
