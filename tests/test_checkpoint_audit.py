"""Checkpoint loading audit: sharded HF folders, configs that contradict their weights, wrapped and
odd state dicts, zips that are not torch files, and models that outlive their (overwritten) files.

Every file here is real: random-init models saved in each layout, and the reduced-width
``transformers.CLIPModel`` fixtures with their reference embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge import checkpoints
from clipforge.checkpoints import CheckpointError

from _checkpoint_helpers import (FIXTURES, assert_matches_transformers, assert_same_weights, embeddings,
                                 sample_inputs, tiny_model)

VARIANT = "hf_tiny_gelu"
SRC = Path(clipforge.__file__).resolve().parents[1]  # the clipforge under test, for child processes


def sharded_hf_folder(folder: Path, writer: str = "safetensors") -> tuple[Path, dict[str, str]]:
    """The GELU fixture split into two shards with their index, as transformers writes big models."""
    folder.mkdir()
    shutil.copy(FIXTURES / VARIANT / "config.json", folder)
    tensors = load_file(FIXTURES / VARIANT / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        if writer == "safetensors":
            name = f"model-{number:05d}-of-00002.safetensors"
            save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{number:05d}-of-00002.bin"
            torch.save({k: tensors[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / ("model.safetensors.index.json" if writer == "safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, weight_map


@pytest.mark.parametrize("writer", ["safetensors", "bin"])
def test_sharded_hf_folder_gives_transformers_embeddings(tmp_path, writer):
    sharded_hf_folder(tmp_path / "hf", writer)
    assert checkpoints.load_state_dict_any(tmp_path / "hf")[1] == "hf"
    assert_matches_transformers(checkpoints.load_model(tmp_path / "hf"), VARIANT)


@pytest.mark.parametrize("index_text, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"metadata": {}}), "no \"weight_map\""),
    (json.dumps({"weight_map": []}), "no \"weight_map\""),
])
def test_broken_shard_index_is_one_clear_error(tmp_path, index_text, message):
    index, _ = sharded_hf_folder(tmp_path / "hf")
    index.write_text(index_text)
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoints.load_model(tmp_path / "hf")
    assert str(index) in str(err.value)


def test_index_listing_a_tensor_its_shard_lacks_is_refused(tmp_path):
    index, weight_map = sharded_hf_folder(tmp_path / "hf")
    first_shard = sorted(set(weight_map.values()))[0]
    index.write_text(json.dumps({"weight_map": {**weight_map, "text_model.extra.weight": first_shard}}))
    with pytest.raises(CheckpointError, match=r"missing 1: \['text_model.extra.weight'\]") as err:
        checkpoints.load_model(tmp_path / "hf")
    assert first_shard in str(err.value)


def test_shard_holding_tensors_its_index_does_not_list_is_refused(tmp_path):
    index, weight_map = sharded_hf_folder(tmp_path / "hf")
    dropped = sorted(weight_map)[-1]  # still in its shard, no longer in the index
    index.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != dropped}}))
    with pytest.raises(CheckpointError, match="not in the index 1") as err:
        checkpoints.load_model(tmp_path / "hf")
    assert dropped in str(err.value)


def test_shard_outside_the_folder_is_refused(tmp_path):
    index, weight_map = sharded_hf_folder(tmp_path / "hf")
    shutil.copytree(FIXTURES / VARIANT, tmp_path / "elsewhere")
    index.write_text(json.dumps({"weight_map": dict.fromkeys(weight_map, "../elsewhere/model.safetensors")}))
    with pytest.raises(CheckpointError, match="is not a file name"):
        checkpoints.load_state_dict_any(tmp_path / "hf")


@pytest.mark.parametrize("tower, field, value", [
    ("vision_config", "hidden_size", 768),
    ("vision_config", "num_hidden_layers", 12),
    ("vision_config", "intermediate_size", 3072),
    ("vision_config", "image_size", 224),
    ("vision_config", "patch_size", 32),
    ("text_config", "hidden_size", 512),
    ("text_config", "num_hidden_layers", 12),
    ("text_config", "vocab_size", 49408),
    ("text_config", "max_position_embeddings", 77),
    ("text_config", "eos_token_id", 5),
    (None, "projection_dim", 512),
])
def test_hf_config_that_contradicts_its_weights_is_refused(tmp_path, tower, field, value):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / VARIANT, folder)
    config = json.loads((folder / "config.json").read_text())
    (config[tower] if tower else config)[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{tower + '.' if tower else ''}{field} {value}") as err:
        checkpoints.load_model(folder)
    assert str(folder / "config.json") in str(err.value)


def test_hf_config_without_sizes_takes_them_from_the_weights(tmp_path):
    """Sizes a config leaves out are not contradictions; the tower sub-configs' projection_dim is unused."""
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / VARIANT, folder)
    config = json.loads((folder / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        for field in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            del config[tower][field]
    assert config["text_config"]["projection_dim"] != config["projection_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_matches_transformers(checkpoints.load_model(folder), VARIANT)


def test_hf_tower_config_that_is_not_an_object_is_named(tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / VARIANT, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_config": "clip_text_model"}))
    with pytest.raises(CheckpointError, match="text_config is a JSON str, expected an object"):
        checkpoints.load_model(folder)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_torch_compile_and_ddp_prefixes_are_stripped(tmp_path, prefix):
    model = tiny_model("tiny-rn")
    torch.save({"epoch": 2, "state_dict": {prefix + k: v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_2.pt")
    state_dict, _ = checkpoints.load_state_dict_any(tmp_path / "epoch_2.pt")
    assert_same_weights(model.state_dict(), state_dict)
    loaded = checkpoints.load_model(tmp_path / "epoch_2.pt", quick_gelu=True)
    inputs = sample_inputs(model)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float8_e4m3fn])
def test_weights_that_are_not_real_floats_are_refused_not_cast(tmp_path, dtype):
    state_dict = tiny_model("tiny-vit").state_dict()
    state_dict["visual.proj"] = (state_dict["visual.proj"] * 100).to(dtype)
    torch.save(state_dict, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=f"visual.proj {str(dtype).removeprefix('torch.')}") as err:
        checkpoints.load_model(tmp_path / "odd.pt")
    assert str(tmp_path / "odd.pt") in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_weights_load_as_their_fp32_values(tmp_path, dtype):
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_model("tiny-vit").state_dict().items()}
    torch.save(state_dict, tmp_path / "w.pt")
    loaded = checkpoints.load_model(tmp_path / "w.pt")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.visual.proj, state_dict["visual.proj"].float())


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({3: torch.zeros(1)}), r"keys \[3\] are not strings"),
    (lambda sd: sd.update({"visual.proj": sd["visual.proj"].to_sparse()}), "not dense tensors"),
    (lambda sd: sd.update({"visual.proj": torch.empty(64, 32, device="meta")}), "not dense tensors"),
])
def test_odd_state_dict_entries_are_one_clear_error(tmp_path, change, message):
    state_dict = tiny_model("tiny-vit").state_dict()
    change(state_dict)
    torch.save(state_dict, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=message) as err:
        checkpoints.load_model(tmp_path / "odd.pt")
    assert str(tmp_path / "odd.pt") in str(err.value)


@pytest.mark.parametrize("members", [["notes.txt"], ["images/cat.png", "labels.csv"], ["a.npy", "b.npy"]])
def test_zip_that_no_torch_writer_made_is_named_as_such(tmp_path, members):
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name in members:
            archive.writestr(name, b"data")
    with pytest.raises(CheckpointError, match="a zip archive, but not one torch.save or torch.jit.save wrote") as err:
        checkpoints.load_model(path)
    assert str(path) in str(err.value) and members[0] in str(err.value)


def test_bad_config_in_safetensors_metadata_names_the_metadata(tmp_path):
    state_dict = {k: v.contiguous() for k, v in tiny_model("tiny-vit").state_dict().items()}
    save_file(state_dict, tmp_path / "w.safetensors", metadata={"clipforge_config": "{not json"})
    with pytest.raises(CheckpointError, match="bad clipforge_config metadata"):
        checkpoints.load_model(tmp_path / "w.safetensors")


# Loads a checkpoint, overwrites its weights file in place (as `cp new old` does) and encodes again:
# a model still backed by a mapping of the file dies of SIGBUS, or reads the new bytes.
_OVERWRITE_SCRIPT = """
import sys, torch
from pathlib import Path
from clipforge import checkpoints
path, weights = Path(sys.argv[1]), Path(sys.argv[2])
model = checkpoints.load_model(path)
images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = model.encode_image(images)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(0)
        f.write(bytes(size))
    after = model.encode_image(images)
print("same" if torch.equal(before, after) else "changed")
"""


@pytest.mark.slow  # a child process per layout
@pytest.mark.parametrize("layout", ["clipforge", "openai_pt", "hf"])
def test_loaded_model_survives_its_file_being_overwritten_in_place(tmp_path, layout):
    model = tiny_model("tiny-vit")
    if layout == "clipforge":
        path = checkpoints.save(model, tmp_path / "m")
        weights = path / "model.safetensors"
    elif layout == "hf":
        path = checkpoints.export_hf(model, tmp_path / "m")
        weights = path / "model.safetensors"
    else:
        path = weights = checkpoints.export_openai(model, tmp_path / "w.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _OVERWRITE_SCRIPT, str(path), str(weights)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "same"


def open_clip_hub_folder(folder: Path, model, **vision_cfg) -> Path:
    """open_clip's Hub layout for ``model``: its config (no quick_gelu entry: exact GELU) and weights."""
    config = model.config
    folder.mkdir()
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, folder / "open_clip_model.safetensors")
    torch.save(state_dict, folder / "open_clip_pytorch_model.bin")
    model_cfg = {"embed_dim": config.embed_dim,
                 "vision_cfg": {"image_size": config.vision.image_size, "layers": config.vision.layers,
                                "width": config.vision.width, "patch_size": config.vision.patch_size,
                                "head_width": config.vision.width // config.vision.num_heads, **vision_cfg},
                 "text_cfg": {"context_length": config.text.context_length, "vocab_size": config.text.vocab_size,
                              "width": config.text.width, "heads": config.text.heads, "layers": config.text.layers}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder


def exact_gelu_model(text_heads: int = 4):
    """tiny-vit with exact GELU and a text head count OpenAI's width // 64 rule would not guess."""
    config = clipforge.get_config("tiny-vit")
    torch.manual_seed(3)
    return clipforge.CLIP(dataclasses.replace(config, quick_gelu=False,
                                              text=dataclasses.replace(config.text, heads=text_heads))).eval()


@pytest.mark.parametrize("target", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "."])
def test_open_clip_hub_files_take_activation_and_heads_from_their_config(tmp_path, recwarn, target):
    model = exact_gelu_model()
    folder = open_clip_hub_folder(tmp_path / "laion", model)
    loaded = checkpoints.load_model(folder / target)
    assert not loaded.config.quick_gelu and loaded.config.text.heads == 4
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]
    inputs = sample_inputs(model)
    for ours, theirs in zip(embeddings(model, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("setting, value", [("pool_type", "avg"), ("timm_model_name", "vit_base_patch16_224")])
def test_open_clip_settings_clipforge_does_not_build_are_refused(tmp_path, setting, value):
    folder = open_clip_hub_folder(tmp_path / "oc", exact_gelu_model(), **{setting: value})
    with pytest.raises(CheckpointError, match=f"vision_cfg.{setting} is {value!r}") as err:
        checkpoints.load_model(folder / "open_clip_model.safetensors")
    assert str(folder / "open_clip_config.json") in str(err.value)


@pytest.mark.parametrize("model, lost", [(exact_gelu_model(text_heads=2), "activation: exact GELU -> QuickGELU"),
                                         (exact_gelu_model(text_heads=4), "text heads: 4 -> 2")])
def test_export_openai_pt_warns_when_the_config_will_not_read_back(tmp_path, model, lost):
    with pytest.warns(UserWarning, match=lost):
        checkpoints.export_openai(model, tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .safetensors layout keeps the config: nothing lost, no warning
        path = checkpoints.export_openai(model, tmp_path / "w.safetensors")
        checkpoints.export_openai(tiny_model("tiny-rn"), tmp_path / "rn.pt")
    assert checkpoints.load_model(path).config == model.config


@pytest.mark.parametrize("writer", [checkpoints.save, checkpoints.export_hf])
def test_writing_into_an_onnx_export_folder_is_refused(tmp_path, writer):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "onnx_export.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds an ONNX export"):
        writer(tiny_model("tiny-vit"), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["onnx_export.json"]


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading must never open a network connection")

    monkeypatch.setattr("socket.socket.connect", refuse)
    monkeypatch.setattr("socket.create_connection", refuse)


@pytest.mark.parametrize("spelling", ["laion/tiny-clip", "hf-hub:laion/tiny-clip"])
def test_hub_id_is_read_from_the_local_hub_cache(tmp_path, monkeypatch, spelling):
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--laion--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    model = tiny_model("tiny-vit")
    checkpoints.export_hf(model, repo / "snapshots" / "0123abcd")
    checkpoints.export_hf(tiny_model("tiny-vit", seed=1), repo / "snapshots" / "older")  # not what main names
    assert_same_weights(model.state_dict(), checkpoints.load_model(spelling).state_dict())


def test_hub_id_missing_offline_says_where_it_looked_and_downloads_nothing(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="never downloads") as err:
        checkpoints.load_model("openai/clip-vit-base-patch32")
    assert "Hugging Face Hub id" in str(err.value) and str(tmp_path / "hub") in str(err.value)


@pytest.mark.parametrize("layout", ["nan_pt", "fp16_overflow_safetensors"])
def test_weights_holding_nan_or_inf_are_refused(tmp_path, layout):
    state_dict = tiny_model("tiny-vit").state_dict()
    if layout == "nan_pt":
        state_dict["visual.proj"][3, 4] = float("nan")
        path = tmp_path / "w.pt"
        torch.save(state_dict, path)
    else:  # 1e5 is past fp16's largest value (65504): the cast gives inf
        state_dict["transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = 1e5
        path = tmp_path / "w.safetensors"
        save_file({k: v.half().contiguous() for k, v in state_dict.items()}, path)
    with pytest.raises(CheckpointError, match="1 weights hold NaN or inf") as err:
        checkpoints.load_model(path)
    assert str(path) in str(err.value)
    assert ("visual.proj" if layout == "nan_pt" else "resblocks.1.mlp.c_fc.weight") in str(err.value)


def test_hf_tower_config_dict_overrides_the_tower_config_as_in_transformers(tmp_path):
    """Older HF configs carry both; transformers' CLIPConfig lets ``*_config_dict`` win."""
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / VARIANT, folder)
    config = json.loads((folder / "config.json").read_text())
    real = config["text_config"]
    config["text_config"] = {**real, "hidden_size": 512, "num_attention_heads": 8}  # stale defaults
    config["text_config_dict"] = {"hidden_size": real["hidden_size"], "num_attention_heads": real["num_attention_heads"]}
    (folder / "config.json").write_text(json.dumps(config))
    model = checkpoints.load_model(folder)
    assert model.config.text.heads == real["num_attention_heads"]
    assert_matches_transformers(model, VARIANT)
