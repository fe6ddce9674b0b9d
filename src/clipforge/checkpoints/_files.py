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

SAFE_LOADING = "clipforge never runs code from a checkpoint file"
FORMAT_VERSION = 1  # of clipforge's own folder layout (config.json "format_version")

# First bytes of files people pass by mistake, for a friendlier error.
_IMAGE_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                b"RIFF": "a RIFF (WebP/WAV) file", b"BM": "a BMP image"}
# Key prefixes of wrapped models, stripped when every key has them, in this order:
# DistributedDataParallel's, then torch.compile's (``module._orig_mod.`` when both wrapped the model).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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
        if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
            raise CheckpointError(f"{path}: a zip archive, but not one torch.save or torch.jit.save wrote (no "
                                  f"<name>/data.pkl; it holds {names[:3]}); expected {_EXPECTED}")
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
    """``torch.load(weights_only=True)`` with its failures turned into one clear :class:`CheckpointError`.

    The tensors are read into memory, not memory-mapped: a map would count the file's pages beside
    the model's copy, and a tensor viewing it would crash (SIGBUS) once the file is overwritten.
    """
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


# safetensors' dtype names (its format spec) as torch dtypes.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (CPU), each read into memory of its own.

    Plain reads, not a memory map: a map would count the file's pages in the process's memory beside
    the model's copy (ViT-B/32: 1.4 GiB peak instead of 0.8), and a tensor left viewing it would
    crash the process (SIGBUS) once the file is overwritten in place. Anything the header does not
    describe exactly (offsets outside the data, sizes that do not match shapes) is refused.
    """
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "missing"
        raise CheckpointError(f"{path}: {what}; expected the model's weights ({path.name}) there")
    try:
        with open(path, "rb") as file:
            return _read_safetensors_tensors(file, path.stat().st_size)
    except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: truncated or damaged safetensors file ({_first_line(err)})") from None


def _read_safetensors_header(file, size: int) -> tuple[dict, int]:
    """``(header, offset of the data)`` of an open ``.safetensors`` file of ``size`` bytes."""
    (header_len,) = struct.unpack("<Q", file.read(8))
    if not 2 <= header_len <= size - 8:
        raise ValueError(f"header of {header_len} bytes in a file of {size}")
    header = json.loads(file.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + header_len


def _read_safetensors_tensors(file, size: int) -> dict[str, torch.Tensor]:
    """The tensors of an open ``.safetensors`` file of ``size`` bytes; ``ValueError`` on a bad layout."""
    header, start = _read_safetensors_header(file, size)
    tensors, end_of_last = {}, 0
    entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
    for name, entry in sorted(entries, key=lambda item: item[1]["data_offsets"][0]):  # in file order
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if not (all(isinstance(d, int) and d >= 0 for d in shape) and begin == end_of_last <= end <= size - start):
            raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not follow the previous tensor "
                             f"(at {end_of_last}) inside the {size - start} data bytes")
        tensor = torch.empty(shape, dtype=dtype)  # owned memory; filled straight from the file
        if tensor.numel() * tensor.element_size() != end - begin:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        if end > begin:
            file.seek(start + begin)
            into = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # (bytes,) of the tensor
            if file.readinto(into) != end - begin:
                raise ValueError(f"tensor {name!r}: the file ends inside its data")
        tensors[name], end_of_last = tensor, end
    return tensors


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a ``.safetensors`` header (empty if none)."""
    with open(path, "rb") as file:
        header, _ = _read_safetensors_header(file, path.stat().st_size)
    return header.get("__metadata__") or {}


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """``(state_dict, kind, run_name)`` from what ``torch.load`` returned.

    Accepts a bare state dict (OpenAI format) or open_clip's training checkpoint
    ``{"state_dict": ..., "name": ...}``, with or without DistributedDataParallel's ``module.`` and
    torch.compile's ``_orig_mod.`` prefixes. Keys must be strings and values dense tensors.
    """
    kind, run_name = "openai", None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        kind = "open_clip"
        run_name = obj.get("name") if isinstance(obj.get("name"), str) else None
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, expected a non-empty state dict of tensors")
    not_names = [k for k in obj if not isinstance(k, str)]
    if not_names:
        raise CheckpointError(f"{path}: keys {not_names[:5]} are not strings; expected a state dict of tensors "
                              "keyed by parameter name")
    for prefix in _WRAPPER_PREFIXES:  # DistributedDataParallel's, torch.compile's: both may be there
        if all(k.startswith(prefix) for k in obj):
            kind = "open_clip" if prefix == "module." else kind
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries {not_tensors[:5]} are not tensors; expected a state dict of tensors "
            f"(or open_clip's {{'state_dict': ...}})"
        )
    not_dense = [f"{k} ({v.layout}, {v.device.type})" for k, v in obj.items()
                 if v.layout != torch.strided or v.device.type == "meta"]
    if not_dense:
        raise CheckpointError(f"{path}: entries {not_dense[:5]} are not dense tensors holding data; expected a "
                              "state dict of ordinary (strided) tensors")
    return dict(obj), kind, run_name


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_sharded(index: Path, read_shard) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face sharded checkpoint: ``index`` (``*.index.json``) maps each
    tensor name to a shard file in its folder, read with ``read_shard(path) -> dict``.

    Every shard must hold exactly the tensors the index lists for it: a tensor missing from its
    shard, or one the index does not list, is an error naming the shard, never silently skipped.
    """
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index}: not valid JSON ({err}); expected a Hugging Face shard index") from None
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError(f"{index}: no \"weight_map\" object of tensor name -> shard file; expected a "
                              "Hugging Face shard index")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
    if outside:
        raise CheckpointError(f"{index}: shard {outside[0]!r} is not a file name; expected shards beside the "
                              f"index in {index.parent}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        found = read_shard(index.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        missing, unlisted = sorted(listed - set(found)), sorted(set(found) - listed)
        if missing or unlisted:
            raise CheckpointError(
                f"{index.parent / shard}: does not hold what {index.name} lists for it "
                f"(missing {len(missing)}: {missing[:3]}; not in the index {len(unlisted)}: {unlisted[:3]})"
            )
        tensors.update(found)
    return tensors
