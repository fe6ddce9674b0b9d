"""Reading checkpoint files safely: what kind of file is this, and its tensors, without running code.

Plain and zip-format ``torch.save`` files go through ``torch.load(weights_only=True)``, which
refuses any pickle that asks for something other than tensors and containers. TorchScript
archives are read by :mod:`clipforge.checkpoints._torchscript`; ``.safetensors`` files hold no code at all.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SAFE_LOADING = "clipforge never runs code from a checkpoint file"
FORMAT_VERSION = 1  # of clipforge's own folder layout (config.json "format_version")

# First bytes of files people pass by mistake, for a friendlier error.
_IMAGE_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                b"RIFF": "a RIFF (WebP/WAV) file", b"BM": "a BMP image"}
_EXPECTED = "a CLIP checkpoint (TorchScript .pt archive, torch.save file, .safetensors, or a folder)"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what was expected."""


def sniff(path: Path) -> str:
    """The kind of checkpoint file at ``path``: torchscript, torch_zip, pickle, safetensors or folder."""
    if path.is_dir():
        return "folder"
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{path}: truncated or damaged zip archive ({err}); expected {_EXPECTED}") from None
        # torch.load itself treats a zip with constants.pkl as TorchScript; so do we (and never pass it on).
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch_zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2: legacy torch.save, or a plain pickle
        return "pickle"
    what = next((name for magic, name in _IMAGE_MAGIC.items() if head.startswith(magic)), None)
    found = what or ("an empty file" if not head else f"a file starting with {head[:8]!r}")
    raise CheckpointError(f"{path}: this is {found}; expected {_EXPECTED}")


def torch_load_safely(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into one clear :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's wording varies by version ("Unsupported global: GLOBAL os.system", "unsupported GLOBAL ...").
        refused = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: its pickle asks for {refused.group(1)}, which is code, not a tensor; "
                f"{SAFE_LOADING}. Expected a state dict of tensors."
            ) from None
        reason = next((line.strip() for line in str(err).splitlines() if "nsupported" in line), _first_line(err))
        raise CheckpointError(f"{path}: refused or unreadable pickle ({reason}); expected a state dict of tensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: truncated or damaged torch file ({_first_line(err)}); expected {_EXPECTED}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (CPU)."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "missing"
        raise CheckpointError(f"{path}: {what}; expected the model's weights ({path.name}) there")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or damaged safetensors file ({_first_line(err)})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a ``.safetensors`` header (empty if none)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return header.get("__metadata__") or {}


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """``(state_dict, kind, run_name)`` from what ``torch.load`` returned.

    Accepts a bare state dict (OpenAI format) or open_clip's training checkpoint
    ``{"state_dict": ..., "name": ...}``, with or without DistributedDataParallel's ``module.`` prefix.
    """
    kind, run_name = "openai", None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        kind = "open_clip"
        run_name = obj.get("name") if isinstance(obj.get("name"), str) else None
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, expected a non-empty state dict of tensors")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        kind = "open_clip"
        obj = {k[len("module."):]: v for k, v in obj.items()}
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries {not_tensors[:5]} are not tensors; expected a state dict of tensors "
            f"(or open_clip's {{'state_dict': ...}})"
        )
    return dict(obj), kind, run_name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
