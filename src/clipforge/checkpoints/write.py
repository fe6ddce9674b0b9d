"""Writing CLIP weights: clipforge folders, OpenAI-format state dicts and Hugging Face folders.

Every file is written atomically with the usual permissions (:mod:`clipforge.files`): a failed
write leaves the previous file intact and no partial file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import atomic_path, write_text_atomic
from ..models import CLIP, ClipConfig
from ._files import FORMAT_VERSION, CheckpointError
from ._hf_files import preprocessor_config, tokenizer_files
from ._hf_keys import clip_to_hf_config, openai_to_hf


def _cpu_tensors(model: CLIP) -> dict[str, torch.Tensor]:
    if not isinstance(getattr(model, "config", None), ClipConfig):
        raise TypeError(f"expected a clipforge CLIP model with a .config, got {type(model).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _check_folder(folder: Path) -> None:
    """An output folder must be a folder (made when missing), not an existing file."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; expected a folder to write the model into")
    folder.mkdir(parents=True, exist_ok=True)


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
    ``.safetensors`` (with the :class:`ClipConfig` as metadata, read back by :func:`load`)."""
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
