"""Hugging Face CLIP folders: clipforge gives transformers' embeddings, and exports that transformers reads.

The fixtures are reduced-width random ``transformers.CLIPModel`` folders with their inputs and
outputs, made by ``tests/fixtures/make_hf_fixtures.py`` (QuickGELU and exact-GELU variants).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from clipforge import checkpoints
from clipforge.checkpoints import CheckpointError

from _checkpoint_helpers import (FIXTURES, HF_TOLERANCE as TOLERANCE, assert_matches_transformers,
                                 assert_same_weights, embeddings, sample_inputs, tiny_model)

VARIANTS = ["hf_tiny_quickgelu", "hf_tiny_gelu"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_folder_loads_with_transformers_embeddings(variant):
    model = checkpoints.load_model(FIXTURES / variant)
    hf_config = json.loads((FIXTURES / variant / "config.json").read_text())
    assert model.config.quick_gelu == (hf_config["text_config"]["hidden_act"] == "quick_gelu")
    assert model.config.text.heads == hf_config["text_config"]["num_attention_heads"]
    assert model.config.vision.num_heads == hf_config["vision_config"]["num_attention_heads"]
    assert_matches_transformers(model, variant)


def test_hf_folder_with_pytorch_model_bin_loads_the_same(tmp_path):
    variant = VARIANTS[1]
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(FIXTURES / variant / "config.json", folder)
    torch.save(load_file(FIXTURES / variant / "model.safetensors"), folder / "pytorch_model.bin")
    assert checkpoints.load_state_dict_any(folder)[1] == "hf"
    assert_matches_transformers(checkpoints.load_model(folder), variant)


def test_bare_hf_weights_file_is_recognised_and_renamed():
    state_dict, kind = checkpoints.load_state_dict_any(FIXTURES / VARIANTS[0] / "model.safetensors")
    assert kind == "hf"
    assert state_dict["visual.proj"].shape == (64, 32)  # (width, embed): transposed back from HF
    assert state_dict["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 64, 64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_hf_of_a_loaded_hf_model_reproduces_its_tensors(tmp_path, variant):
    model = checkpoints.load_model(FIXTURES / variant)
    checkpoints.export_hf(model, tmp_path / "again")
    original = load_file(FIXTURES / variant / "model.safetensors")
    exported = load_file(tmp_path / "again" / "model.safetensors")
    original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
    assert_same_weights(original, exported)


def test_export_hf_then_load_gives_identical_weights_and_embeddings(tmp_path):
    model = tiny_model("tiny-vit")
    checkpoints.export_hf(model, tmp_path / "hf")
    loaded = checkpoints.load_model(tmp_path / "hf")
    assert loaded.config.vision == model.config.vision and loaded.config.text == model.config.text
    assert_same_weights(model.state_dict(), loaded.state_dict())
    inputs = sample_inputs(model)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


def test_export_hf_refuses_resnet_models(tmp_path):
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        checkpoints.export_hf(tiny_model("tiny-rn"), tmp_path / "hf")


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
])
def test_hf_settings_clipforge_cannot_represent_are_clear_errors(tmp_path, change, message):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / VARIANTS[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoints.load_model(folder)
    assert str(folder / "config.json") in str(err.value)


def test_hf_folder_for_another_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="expected 'clip'"):
        checkpoints.load_model(tmp_path)


@pytest.mark.slow
def test_transformers_loads_export_hf_with_the_same_embeddings(tmp_path):
    """Live check against transformers; skipped where it is not installed (the main venv)."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model("tiny-vit")
    checkpoints.export_hf(model, tmp_path / "hf")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = sample_inputs(model)  # CLIP's start (49406) and end (49407) ids

    def features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        hf_image = features(hf_model.get_image_features(pixel_values=images))
        hf_text = features(hf_model.get_text_features(input_ids=tokens))
    image_features, text_features = embeddings(model, (images, tokens))
    assert (image_features - hf_image).abs().max() <= TOLERANCE
    assert (text_features - hf_text).abs().max() <= TOLERANCE
