"""Read the tensors of a TorchScript archive (OpenAI's released ``.pt`` files) as data.

An archive made by ``torch.jit.save`` is a zip::

    <name>/data.pkl          pickled module tree: __torch__.* objects whose state holds tensors
    <name>/data/<key>        raw bytes of each storage
    <name>/code/...          TorchScript source: never read, never run
    <name>/byteorder         "little" or "big" (absent in old archives: little)

``data.pkl`` is unpickled by a restricted unpickler that knows exactly one function (tensor
rebuild), ``OrderedDict`` and the storage types; every ``__torch__.*`` class becomes an inert
placeholder that only records its state; anything else is refused before it can run. Storages are
read from the zip by key. ``torch.jit.load`` is never called.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ._files import SAFE_LOADING, CheckpointError

# Storage class names in data.pkl -> element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ScriptObject:
    """Stands in for a ``__torch__.*`` module: keeps the pickled state, has no behaviour."""

    type_name = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Data-only replacement for ``torch._utils._rebuild_tensor_v2``: a strided view of the storage."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor record without a storage: {type(storage).__name__}")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))
    except RuntimeError as err:
        raise pickle.UnpicklingError(f"tensor of size {tuple(size)} does not fit its storage: {err}") from None


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` allowing only tensor records, OrderedDict and inert module placeholders."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.big_endian = archive, prefix, big_endian
        self.storages: dict[str, torch.Tensor] = {}
        self.placeholder_types: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module.startswith("__torch__.") or module == "__torch__":
            qualified = f"{module}.{name}"
            if qualified not in self.placeholder_types:
                self.placeholder_types[qualified] = type(name, (ScriptObject,), {"type_name": qualified})
            return self.placeholder_types[qualified]
        raise pickle.UnpicklingError(f"data.pkl asks for {module}.{name}, which is not a tensor or module record")

    def persistent_load(self, record: Any) -> torch.Tensor:
        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {record!r:.80}")
        _, dtype, key, _location, numel = record
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"malformed storage record {record!r:.80}")
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, dtype, numel)
        return self.storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        member = f"{self.prefix}data/{key}"
        itemsize = torch.empty((), dtype=dtype).element_size()
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {member} is missing from the archive") from None
        if info.file_size != numel * itemsize:
            raise pickle.UnpicklingError(
                f"storage {member} has {info.file_size} bytes, expected {numel} x {itemsize} (truncated?)"
            )
        raw = bytearray(self.archive.read(member))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
        if self.big_endian and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(-1).reshape(-1)  # (numel * itemsize,) little-endian
        return flat.view(dtype)  # (numel,)


def _archive_prefix(names: list[str], path: Path) -> str:
    pickles = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: expected one <name>/data.pkl in a TorchScript archive, found {pickles}")
    return pickles[0][: -len("data.pkl")]


def _flatten(obj: ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Parameters and buffers of the module tree, with dotted names as ``state_dict`` gives them."""
    state = obj.state if isinstance(getattr(obj, "state", None), dict) else {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            _flatten(value, f"{prefix}{name}.", out)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the TorchScript archive at ``path``, keyed by dotted module path.

    Reads data only (see the module docstring); raises :class:`CheckpointError` for anything that is
    not a plain module tree of tensors, naming the file and what it asked for.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = _archive_prefix(names, path)
            order = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
            unpickler = _ArchiveUnpickler(archive.read(prefix + "data.pkl"), archive, prefix, order == "big")
            root = unpickler.load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused TorchScript archive: {err}; {SAFE_LOADING}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: truncated or damaged TorchScript archive ({type(err).__name__}: {err})") from None
    if not isinstance(root, ScriptObject):
        raise CheckpointError(f"{path}: data.pkl holds {type(root).__name__}, expected a TorchScript module")
    state_dict: dict[str, torch.Tensor] = {}
    _flatten(root, "", state_dict)
    if not state_dict:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return state_dict
