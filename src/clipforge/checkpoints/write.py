"""Writing CLIP weights: clipforge folders, OpenAI-format state dicts and Hugging Face folders.

Every file is written atomically with the usual permissions (:mod:`clipforge.files`): a failed
write leaves the previous file intact and no partial file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_path, write_text_atomic
from ..models import CLIP, ClipConfig
from ._files import FORMAT_VERSION, CheckpointError
from ._hf_files import preprocessor_config, tokenizer_files
from ._hf_keys import clip_to_hf_config, openai_to_hf
from .architecture import infer_config

_ONNX_META = "onnx_export.json"  # marks an ONNX export folder, which clipforge.load reads first


def _cpu_tensors(model: CLIP) -> dict[str, torch.Tensor]:
    if not isinstance(getattr(model, "config", None), ClipConfig):
        raise TypeError(f"expected a clipforge CLIP model with a .config, got {type(model).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _check_folder(folder: Path) -> None:
    """An output folder must be a folder (made when missing), not an existing file, and not an ONNX
    export: :func:`clipforge.load` would go on reading the old graphs instead of these weights."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; expected a folder to write the model into")
    if (folder / _ONNX_META).is_file():
        raise CheckpointError(f"{folder}: holds an ONNX export ({_ONNX_META}), which clipforge.load reads instead "
                              "of any weights beside it; expected an empty folder or one holding a checkpoint")
    folder.mkdir(parents=True, exist_ok=True)


def _warn_lost_config(model: CLIP, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Warn when a weights-only file cannot give back ``model``'s config: loading it infers the
    architecture from shapes and assumes QuickGELU, as for OpenAI's releases."""
    config = model.config
    inferred = dataclasses.replace(infer_config(tensors, source=str(path)), init_logit_scale=config.init_logit_scale)
    if inferred == config:
        return
    gelu = {True: "QuickGELU", False: "exact GELU"}
    changes = [f"{what}: {ours} -> {theirs}" for what, ours, theirs in (
        ("activation", gelu[config.quick_gelu], gelu[inferred.quick_gelu]),
        ("text heads", config.text.heads, inferred.text.heads),
        ("vision heads", config.vision.num_heads, inferred.vision.num_heads)) if ours != theirs]
    warnings.warn(f"{path}: an OpenAI-format {path.suffix} file holds weights only, and loading it infers a "
                  f"different config ({', '.join(changes) or 'other settings'}); write a .safetensors file, which "
                  "keeps the config, or pass quick_gelu= / config= to clipforge.load", stacklevel=3)


def save(model: CLIP, folder: str | os.PathLike) -> Path:
    """Write ``model`` to ``folder`` as ``model.safetensors`` + ``config.json`` (its :class:`ClipConfig`)."""
    folder = Path(folder)
    tensors = _cpu_tensors(model)
    _check_folder(folder)
    with atomic_path(folder / "model.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    meta = {"format": "clipforge", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    write_text_atomic(folder / "config.json", json.dumps(meta, indent=2) + "\n")
    return folder


def export_openai(model: CLIP, path: str | os.PathLike) -> Path:
    """Write an OpenAI-format state dict: ``.pt``/``.pth`` (``torch.save`` of a dict of tensors) or
    ``.safetensors`` (with the :class:`ClipConfig` as metadata, read back by :func:`load`).

    A ``.pt`` keeps no config: a ``UserWarning`` says when loading it would infer a different one
    (exact GELU read back as QuickGELU, head counts other than a preset's or ``width // 64``)."""
    path = Path(path)
    tensors = _cpu_tensors(model)
    if path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
        raise CheckpointError(f"{path}: expected a .pt, .pth, .bin or .safetensors file name")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a file name ending in {path.suffix}")
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            save_file(tensors, str(temporary),
                      metadata={"format": "pt", "clipforge_config": json.dumps(model.config.to_dict())})
        else:
            torch.save(tensors, temporary)
    if path.suffix != ".safetensors":
        _warn_lost_config(model, tensors, path)
    return path


def export_hf(model: CLIP, folder: str | os.PathLike) -> Path:
    """Write a Hugging Face CLIP folder that ``transformers.CLIPModel``, ``CLIPProcessor`` and the
    zero-shot pipeline load: ``config.json`` + ``model.safetensors``, the tokenizer's files and
    ``preprocessor_config.json``. ViT models only."""
    folder = Path(folder)
    tensors = _cpu_tensors(model)
    try:
        hf_config = clip_to_hf_config(model.config, model.dtype)
    except ValueError as err:
        raise CheckpointError(f"cannot export to {folder}: {err}") from None
    hf_tensors = {k: v.clone() for k, v in openai_to_hf(tensors).items()}  # q/k/v must not share storage
    _check_folder(folder)
    with atomic_path(folder / "model.safetensors") as temporary:
        save_file(hf_tensors, str(temporary), metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(hf_config, indent=2) + "\n")
    for name, text in tokenizer_files(model.config.text.context_length).items():
        write_text_atomic(folder / name, text)
    write_text_atomic(folder / "preprocessor_config.json", preprocessor_config(model.config.vision.image_size))
    return folder
