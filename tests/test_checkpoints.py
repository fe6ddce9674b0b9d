"""Loading and saving CLIP checkpoints: config inference, round trips, sources, clear errors."""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

import clipforge
from clipforge import checkpoints
from clipforge.checkpoints import CheckpointError

from _checkpoint_helpers import assert_same_weights, embeddings, sample_inputs, tiny_model

OPENAI_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OPENAI_NAMES)
def test_infer_config_recovers_each_openai_architecture_from_shapes(name):
    with torch.device("meta"):
        state_dict = clipforge.create_model(name).state_dict()
    inferred = checkpoints.infer_config(state_dict, match_presets=False)  # OpenAI's build_model rule alone
    assert inferred == clipforge.get_config(name)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_infer_config_takes_head_counts_from_a_preset_with_the_same_shapes(name):
    state_dict = tiny_model(name).state_dict()
    assert checkpoints.infer_config(state_dict) == clipforge.get_config(name)
    by_rule = checkpoints.infer_config(state_dict, match_presets=False)
    assert by_rule.text.heads == 1  # width 64 // 64: what OpenAI's rule alone would say


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_save_then_load_gives_identical_tensors_config_and_embeddings(tmp_path, name):
    model = tiny_model(name)
    model.logit_scale.data.fill_(3.0)
    checkpoints.save(model, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["format"] == "clipforge" and meta["format_version"] == checkpoints.FORMAT_VERSION
    loaded = checkpoints.load_model(tmp_path / "saved")
    assert loaded.config == model.config
    assert_same_weights(model.state_dict(), loaded.state_dict())
    inputs = sample_inputs(model)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_export_openai_then_load_gives_identical_tensors(tmp_path, name, suffix):
    model = tiny_model(name)
    path = checkpoints.export_openai(model, tmp_path / f"weights{suffix}")
    if suffix == ".pt":  # a plain dict of tensors, readable by anything that reads OpenAI state dicts
        plain = torch.load(path, weights_only=True)
        assert type(plain) is dict and list(plain) == list(model.state_dict())
    state_dict, kind = checkpoints.load_state_dict_any(path)
    assert kind == "openai"
    assert_same_weights(model.state_dict(), state_dict)
    loaded = checkpoints.load_model(path)
    assert loaded.config == model.config
    inputs = sample_inputs(model)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


def test_fp16_openai_state_dict_loads_as_fp32_model(tmp_path):
    model = tiny_model("tiny-vit")
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    loaded = checkpoints.load_model(tmp_path / "half.pt")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.visual.proj, half["visual.proj"].float())


def test_open_clip_training_checkpoint_with_module_prefix_loads(tmp_path):
    model = tiny_model("tiny-rn")
    wrapped = {"epoch": 3, "name": "2024_01_01-model_tiny-quickgelu-lr_0.001",
               "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": {}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    state_dict, kind = checkpoints.load_state_dict_any(tmp_path / "epoch_3.pt")
    assert kind == "open_clip"
    assert_same_weights(model.state_dict(), state_dict)
    loaded = checkpoints.load_model(tmp_path / "epoch_3.pt")  # "quickgelu" in the run name: no warning
    assert loaded.config.quick_gelu


def test_open_clip_checkpoint_without_activation_hint_warns_and_accepts_override(tmp_path):
    model = tiny_model("tiny-vit")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    with pytest.warns(UserWarning, match="QuickGELU"):
        assert checkpoints.load_model(tmp_path / "epoch_1.pt").config.quick_gelu
    exact = checkpoints.load_model(tmp_path / "epoch_1.pt", quick_gelu=False)
    assert not exact.config.quick_gelu
    assert isinstance(exact.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_explicit_config_overrides_inferred_head_count(tmp_path):
    model = tiny_model("tiny-vit")
    checkpoints.export_openai(model, tmp_path / "w.pt")
    one_head = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, heads=1))
    assert checkpoints.load_model(tmp_path / "w.pt", config=one_head).transformer.resblocks[0].attn.heads == 1


def test_load_returns_model_and_preprocess_for_its_image_size(tmp_path):
    from PIL import Image

    checkpoints.save(tiny_model("tiny-vit"), tmp_path / "m")
    model, preprocess = checkpoints.load(tmp_path / "m")
    assert not model.training
    assert preprocess(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_load_refuses_jit_true(tmp_path):
    with pytest.raises(ValueError, match="never runs"):
        checkpoints.load(tmp_path / "anything.pt", jit=True)


def test_name_is_looked_up_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    monkeypatch.setitem(checkpoints.OPENAI_URLS, "tiny-vit", "https://example.invalid/abc/tiny-vit.pt")
    model = tiny_model("tiny-vit")
    checkpoints.export_openai(model, tmp_path / "tiny-vit.pt")
    assert_same_weights(model.state_dict(), checkpoints.load_model("tiny-vit").state_dict())


def test_missing_released_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_model("ViT-L/14@336px")
    message = str(err.value)
    assert str(tmp_path / "ViT-L-14-336px.pt") in message and "https://openaipublic.azureedge.net" in message


def test_unknown_name_and_preset_without_weights_are_clear_errors():
    with pytest.raises(CheckpointError, match="not a released model name"):
        checkpoints.load_model("ViT-Z/99")
    with pytest.raises(CheckpointError, match="create_model"):
        checkpoints.load_model("tiny-vit")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("writer", ["pt", "safetensors", "folder"])
def test_truncated_files_name_the_file(tmp_path, writer):
    model = tiny_model("tiny-vit")
    if writer == "folder":
        path = checkpoints.save(model, tmp_path / "m")
        _truncate(path / "model.safetensors")
    else:
        path = _truncate(checkpoints.export_openai(model, tmp_path / f"w.{writer}"))
    with pytest.raises(CheckpointError, match="truncated or damaged") as err:
        checkpoints.load_model(path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content, what", [
    (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(100), "JPEG image"),
    (b"", "empty file"),
    (b"hello, this is text\n", "starting with"),
])
def test_files_that_are_not_checkpoints_are_named_with_what_was_expected(tmp_path, content, what):
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what) as err:
        checkpoints.load_model(path)
    assert str(path) in str(err.value) and "expected a CLIP checkpoint" in str(err.value)


def test_unknown_architecture_is_reported_with_the_keys_found(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown architecture.*encoder.weight"):
        checkpoints.load_model(tmp_path / "other.pt")


def test_mismatched_keys_and_shapes_are_listed_with_shapes(tmp_path):
    state_dict = tiny_model("tiny-vit").state_dict()
    del state_dict["visual.ln_post.bias"]
    state_dict["visual.extra_weight"] = torch.zeros(5, 3)
    state_dict["transformer.resblocks.0.mlp.c_proj.bias"] = torch.zeros(65)
    torch.save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_model(tmp_path / "bad.pt")
    message = str(err.value)
    assert str(tmp_path / "bad.pt") in message
    assert "missing (1): visual.ln_post.bias (64,)" in message
    assert "unexpected (1): visual.extra_weight (5, 3)" in message
    assert "transformer.resblocks.0.mlp.c_proj.bias: file (65,) vs model (64,)" in message


def test_non_tensor_entries_and_bad_folders_are_clear_errors(tmp_path):
    torch.save({"visual.proj": [1, 2, 3]}, tmp_path / "lists.pt")
    with pytest.raises(CheckpointError, match="not tensors"):
        checkpoints.load_model(tmp_path / "lists.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoints.load_model(tmp_path / "empty")
    folder = checkpoints.save(tiny_model("tiny-vit"), tmp_path / "future")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="newer"):
        checkpoints.load_model(folder)


def test_safetensors_header_is_sniffed_not_the_file_name(tmp_path):
    path = checkpoints.export_openai(tiny_model("tiny-rn"), tmp_path / "w.safetensors")
    renamed = path.rename(tmp_path / "weights.bin")
    (header_len,) = struct.unpack("<Q", renamed.read_bytes()[:8])
    assert header_len > 0
    assert checkpoints.load_state_dict_any(renamed)[1] == "openai"
