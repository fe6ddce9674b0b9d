"""``clipforge convert --to onnx`` end to end, and an export folder as ``--model`` of classify and eval."""
from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("onnxruntime")

import torch  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import main  # noqa: E402

from _eval_helpers import make_color_folder, write_tinted_image  # noqa: E402
from _onnx_helpers import trained_demo_model  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

CLASSES = {"red": ["red"] * 3, "green": ["green"] * 3, "blue": ["blue"] * 3}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained demo-sized model saved as a clipforge folder, and the model itself."""
    model = trained_demo_model()
    return clipforge.save(model, tmp_path_factory.mktemp("ckpt") / "model"), model


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_convert_quantize_int8_reports_cosine_and_zero_shot_of_both(capsys, tmp_path, checkpoint, mode):
    images = make_color_folder(tmp_path / "calib", CLASSES)
    status, out, err = run(capsys, "convert", checkpoint[0], tmp_path / "out", "--to", "onnx", "--quantize", "int8",
                           "--quantize-mode", mode, "--calibration", images, "--templates", "none")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'out'} (onnx, opset 17: image.int8.onnx")
    assert lines[1].startswith("fp32 parity with PyTorch: image max abs")
    assert f"int8 ({mode}) vs fp32 on 9 images / 3 prompts" in lines[2]
    assert lines[3].startswith("zero-shot top-1 over 3 classes: fp32 ")
    meta = json.loads((tmp_path / "out" / "onnx_export.json").read_text())
    accuracy = meta["quantization"]["accuracy"]
    assert meta["graphs"] == meta["int8_graphs"] and meta["quantization"]["mode"] == mode
    assert accuracy["image_cosine_mean"] >= 0.99 and accuracy["text_cosine_mean"] >= 0.99
    assert meta["quantization"]["quantized_nodes"] == {"image": 4 * 4, "text": 2 * 4}  # q/k/v, out, fc, proj
    assert meta["quantization"]["kept_fp32"] == {"image": ["/visual/conv1/Conv", "/visual/MatMul"], "text": ["/MatMul"]}
    assert (tmp_path / "out" / "image.int8.onnx").stat().st_size < (tmp_path / "out" / "image.onnx").stat().st_size

    loaded, _ = clipforge.load(tmp_path / "out")  # int8 by default, measured against torch on real images
    assert loaded.precision == "int8"
    from clipforge.evaluate import encode_images
    paths = sorted(str(p) for p in images.rglob("*.*"))
    got = encode_images(loaded, paths, clipforge.image_transform(64), progress=False).features
    want = encode_images(checkpoint[1], paths, clipforge.image_transform(64), progress=False).features
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99
    assert (got - want).abs().max() > 1e-6  # not the fp32 graph under another name


def test_convert_onnx_bad_options_give_one_line_and_status_2(capsys, tmp_path, checkpoint):
    status, _, err = run(capsys, "convert", checkpoint[0], tmp_path / "out", "--to", "onnx", "--quantize", "int8")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "needs --calibration DIR" in err
    status, _, err = run(capsys, "convert", checkpoint[0], tmp_path / "out", "--to", "onnx", "--quantize", "int8",
                         "--calibration", tmp_path / "nowhere")
    assert status == 2 and "nowhere: no such folder" in err
    (tmp_path / "empty").mkdir()
    status, _, err = run(capsys, "convert", checkpoint[0], tmp_path / "out", "--to", "onnx", "--quantize", "int8",
                         "--calibration", tmp_path / "empty")
    assert status == 2 and "no images found" in err
    status, _, err = run(capsys, "convert", checkpoint[0], tmp_path / "o.pt", "--to", "openai", "--quantize", "int8")
    assert status == 2 and "apply to --to onnx only" in err
    assert not (tmp_path / "out" / "onnx_export.json").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint):
    """The checkpoint exported to fp32 ONNX (no quantisation)."""
    out = tmp_path_factory.mktemp("onnx") / "out"
    assert main(["convert", str(checkpoint[0]), str(out), "--to", "onnx"]) == 0
    return out


def test_classify_takes_an_export_folder_and_agrees_with_the_checkpoint(capsys, tmp_path, checkpoint, exported):
    picture = write_tinted_image(tmp_path / "one.jpg", "red")
    scores = {}
    for model in (checkpoint[0], exported):
        status, out, err = run(capsys, "classify", picture, "--labels", "dog,cat,bird", "--templates", "none",
                               "--model", model, "--json")
        assert status == 0, err
        scores[model] = {p["label"]: p["score"] for p in json.loads(out)[0]["predictions"]}
    assert scores[exported] == pytest.approx(scores[checkpoint[0]], abs=1e-4)


def test_eval_zeroshot_retrieval_and_linear_probe_take_an_export_folder(capsys, tmp_path, checkpoint, exported):
    train = make_color_folder(tmp_path / "train", CLASSES)
    test = make_color_folder(tmp_path / "test", {k: v[:1] for k, v in CLASSES.items()})
    rows = [["image", "caption"]]
    for i, color in enumerate(["red", "green", "blue"]):
        write_tinted_image(tmp_path / "img" / f"{i}.jpg", color, i)
        rows += [[f"img/{i}.jpg", f"a {color} photo"], [f"img/{i}.jpg", f"{color} things"]]
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    tasks = {"zeroshot": ["--data", train, "--templates", "none"], "retrieval": ["--data", tmp_path / "captions.csv"],
             "linear-probe": ["--train", train, "--test", test]}
    for task, argv in tasks.items():
        reports = []
        for model in (checkpoint[0], exported):
            status, out, err = run(capsys, "eval", task, *argv, "--model", model, "--workers", "0", "--no-cache",
                                   "--json")
            assert status == 0, err
            reports.append(json.loads(out))
        metrics = [r["metrics"] if "metrics" in r else {"accuracy": r["accuracy"]} for r in reports]
        assert metrics[1] == pytest.approx(metrics[0], abs=1e-4), task
