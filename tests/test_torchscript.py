"""OpenAI's TorchScript ``.pt`` archives are read as data: every tensor, never their code.

The archives here are made the way OpenAI made theirs: ``torch.jit.trace`` of a model with
OpenAI's module names (clipforge's), weights converted to fp16 as OpenAI's ``convert_weights``
does, then ``torch.jit.save``.
"""
from __future__ import annotations

import warnings
import zipfile

import pytest
import torch
from torch import nn

from clipforge import checkpoints
from clipforge.checkpoints._torchscript import read_torchscript_state_dict
from clipforge.checkpoints import CheckpointError
from clipforge.models.layers import Attention

from _checkpoint_helpers import assert_same_weights, embeddings, sample_inputs, tiny_model

pytestmark = pytest.mark.slow  # full training steps and traced models: left out of -m 'not slow'

# OpenAI's archives carry these sizes as tensors too; load drops them.
OPENAI_EXTRAS = {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}


def openai_fp16(model: nn.Module) -> nn.Module:
    """OpenAI's ``convert_weights``: convs, linears, attention and projections to fp16; norms and
    embeddings stay fp32."""
    for module in model.modules():
        params = []
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            params = ["weight", "bias"]
        elif isinstance(module, Attention):
            params = ["in_proj_weight", "in_proj_bias"]
        params += [name for name in ("text_projection", "proj") if hasattr(module, name)]
        for name in params:
            param = getattr(module, name)
            if param is not None:
                param.data = param.data.half()
    return model


def make_archive(path, name: str, fp16: bool, with_extras: bool) -> dict[str, torch.Tensor]:
    """Trace and save a tiny model; returns the state dict the archive should hold."""
    model = tiny_model(name, seed=1)
    if fp16:
        openai_fp16(model)
    if with_extras:
        for key, value in OPENAI_EXTRAS.items():
            if hasattr(model, key):
                delattr(model, key)
            model.register_buffer(key, torch.tensor(value))
    model.trim_text = False  # a traced graph needs fixed shapes
    images, tokens = sample_inputs(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        # Small inputs and no re-run check keep this fast; the weights stored do not depend on them.
        traced = torch.jit.trace(model, (images[:1], tokens[:1, :16]), check_trace=False)
        torch.jit.save(traced, str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


CASES = [("tiny-vit", True, True), ("tiny-vit", False, False), ("tiny-rn", True, False), ("tiny-rn", False, True)]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript")
    made = {}
    for name, fp16, extras in CASES:
        path = folder / f"{name}-{'fp16' if fp16 else 'fp32'}.pt"
        made[(name, fp16)] = (path, make_archive(path, name, fp16, extras))
    return made


@pytest.mark.parametrize("name, fp16, extras", CASES)
def test_archive_tensors_equal_the_traced_models_exactly(archives, name, fp16, extras):
    path, expected = archives[(name, fp16)]
    assert any("/code/" in n for n in zipfile.ZipFile(path).namelist())  # a real TorchScript archive
    state_dict = read_torchscript_state_dict(path)
    assert_same_weights(expected, state_dict)
    assert any(v.dtype == torch.float16 for v in state_dict.values()) == fp16
    assert ("input_resolution" in state_dict) == extras


@pytest.mark.parametrize("name, fp16, extras", CASES)
def test_loading_an_archive_gives_the_original_fp32_embeddings(archives, monkeypatch, name, fp16, extras):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must never be called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    path, expected = archives[(name, fp16)]
    state_dict, kind = checkpoints.load_state_dict_any(path)
    assert kind == "openai_torchscript"
    loaded = checkpoints.load_model(path)
    assert loaded.dtype == torch.float32 and loaded.config == tiny_model(name).config
    reference = tiny_model(name, seed=1)  # same init as the archive, before the fp16 cast
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in expected.items()
                               if k not in OPENAI_EXTRAS})
    inputs = sample_inputs(reference)
    for ours, theirs in zip(embeddings(reference, inputs), embeddings(loaded, inputs)):
        assert torch.equal(ours, theirs)


def test_truncated_archive_is_a_clear_error(archives, tmp_path):
    path, _ = archives[("tiny-vit", True)]
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged") as err:
        checkpoints.load_model(broken)
    assert str(broken) in str(err.value)


def test_archive_with_a_short_storage_is_refused(archives, tmp_path):
    path, _ = archives[("tiny-rn", False)]
    damaged = tmp_path / "short.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info.filename, data[:-4] if info.filename.endswith("/data/3") else data)
    with pytest.raises(CheckpointError, match="truncated"):
        read_torchscript_state_dict(damaged)
