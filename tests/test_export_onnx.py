"""ONNX export: fp32 graphs match PyTorch, the text graph keeps exact trimming, an export loads as a CLIP."""
from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import clipforge  # noqa: E402
from clipforge.export import export_onnx, load_export  # noqa: E402
from clipforge.export.session import MissingOnnxError  # noqa: E402

from _checkpoint_helpers import sample_inputs, tiny_model  # noqa: E402
from _onnx_helpers import trained_demo_model  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

PARITY = 1e-4  # max abs difference of fp32 embeddings, ONNX Runtime vs PyTorch


def assert_parity(model, folder):
    """Images and texts of several lengths (with padding past the end-of-text) embed as in PyTorch."""
    exported, _ = load_export(folder, threads=1)
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        assert (exported.encode_image(images) - model.encode_image(images)).abs().max() <= PARITY
        assert (exported.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= PARITY
        logits, logits_t = exported(images, tokens)
        expected, _ = model(images, tokens)
    assert torch.allclose(logits, expected, atol=1e-3) and torch.equal(logits_t, logits.t())


@pytest.mark.slow  # ViT-B/32 took 11 s here once, 2 min when the 2 shared cores were busy
@pytest.mark.parametrize("name", ["ViT-B/32", "RN50"])
def test_full_size_random_weight_models_export_with_fp32_parity(tmp_path, name):
    from clipforge.evaluate import model_fingerprint

    model = tiny_model(name)
    before = model_fingerprint(model)
    folder = export_onnx(model, tmp_path / "out")
    assert not model.training and model_fingerprint(model) == before  # export leaves BatchNorm statistics be
    assert_parity(model, folder)


def test_trained_demo_sized_model_exports_with_fp32_parity(tmp_path):
    model = trained_demo_model()
    assert abs(float(model.logit_scale.detach()) - np.log(1 / 0.07)) > 1e-3  # training moved the weights
    folder = export_onnx(model, tmp_path / "out")
    assert_parity(model, folder)
    meta = json.loads((folder / "onnx_export.json").read_text())
    assert meta["context_length"] == 24 and meta["preprocess"]["image_size"] == 64
    assert meta["logit_scale"] == pytest.approx(float(model.logit_scale.detach()))
    assert clipforge.ClipConfig.from_dict(meta["config"]) == model.config
    from clipforge.evaluate import model_fingerprint
    assert meta["source_fingerprint"] == model_fingerprint(model)


def test_text_graph_takes_any_length_up_to_the_context_and_matches_the_trimmed_batch(tmp_path):
    from clipforge.export.session import create_session

    model = tiny_model("tiny-vit")
    folder = export_onnx(model, tmp_path / "out")
    session = create_session(folder / "text.onnx", threads=1)
    tokens = clipforge.tokenize(["a dog", "a photo of a cat on a mat", "x"], context_length=model.context_length)
    last = int(tokens.argmax(-1).max()) + 1  # the batch's trimmed length
    with torch.no_grad():
        expected = model.encode_text(tokens).numpy()
    for length in (last, last + 3, model.context_length):
        (got,) = session.run(None, {"tokens": tokens[:, :length].numpy()})
        assert np.abs(got - expected).max() <= PARITY, length
    exported, _ = load_export(folder)
    with pytest.raises(ValueError, match="L <= "):
        exported.encode_text(torch.zeros(1, model.context_length + 1, dtype=torch.long))


def test_load_of_an_export_folder_gives_the_clip_api_and_follows_torch_threads(tmp_path):
    model = tiny_model("tiny-rn")
    folder = export_onnx(model, tmp_path / "out")
    loaded, preprocess = clipforge.load(folder)
    assert type(loaded).__name__ == "OnnxCLIP" and loaded.config == model.config
    assert repr(preprocess) == repr(clipforge.image_transform(model.config.vision.image_size))
    assert loaded.eval() is loaded and loaded.to("cpu") is loaded and list(loaded.parameters()) == []
    assert float(loaded.logit_scale) == pytest.approx(float(model.logit_scale.detach()))
    assert loaded.context_length == model.context_length
    assert loaded.threads == torch.get_num_threads()
    assert load_export(folder, threads=1)[0]._image_session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="no int8 graphs"):
        load_export(folder, precision="int8")


def test_missing_onnxruntime_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    folder = export_onnx(tiny_model("tiny-vit"), tmp_path / "out")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(MissingOnnxError, match=r"pip install 'clipforge\[onnx\]'"):
        clipforge.load(folder)


def test_exporting_over_a_file_or_with_a_bad_opset_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        export_onnx(tiny_model(), tmp_path / "file")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny_model(), tmp_path / "out", opset=9)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_resnet_int8_graphs_stay_close_to_fp32(tmp_path, mode):
    from clipforge.export import quantize_export

    model = tiny_model("tiny-rn")
    folder = export_onnx(model, tmp_path / "out")
    images, tokens = sample_inputs(model)
    calibration = torch.randn(8, *images.shape[1:], generator=torch.Generator().manual_seed(1))
    entry = quantize_export(folder, mode, [calibration[:4].numpy(), calibration[4:].numpy()],
                            [tokens[:, :12].numpy()])
    assert entry["quantized_nodes"]["image"] > 10  # the ResNet's convolutions, not only the attention pool
    assert entry["kept_fp32"] == {"image": ["/visual/conv1/Conv", "/visual/attnpool/c_proj/Gemm"], "text": ["/MatMul"]}
    int8, _ = load_export(folder, threads=1)
    assert int8.precision == "int8"
    with torch.no_grad():
        for got, want in ((int8.encode_image(images), model.encode_image(images)),
                          (int8.encode_text(tokens), model.encode_text(tokens))):
            assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99
            assert (got - want).abs().max() > 1e-6  # really int8
