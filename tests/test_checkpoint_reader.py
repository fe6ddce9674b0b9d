"""clipforge's own ``.safetensors`` reader (plain reads into owned memory, no memory map): the same
tensors as the safetensors library reads, for every dtype, and one clear error for a damaged file."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints._files import read_safetensors


def _every_dtype() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=generator)
    return {"f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(), "f64": floats.double(),
            "i64": torch.arange(-6, 6).reshape(3, 4), "i8": torch.arange(-4, 4, dtype=torch.int8),
            "u8": torch.arange(8, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "f8": floats.to(torch.float8_e4m3fn)}


def test_reads_every_dtype_as_the_safetensors_library_does(tmp_path: Path):
    path = tmp_path / "all.safetensors"
    save_file(_every_dtype(), str(path), metadata={"note": "x"})
    ours, reference = read_safetensors(path), load_file(str(path))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)) if tensor.dim() else \
            torch.equal(ours[name], tensor), name


def _damaged(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("header, data, detail", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "inside the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "12 bytes for shape [4]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "do not follow"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16, "do not follow"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "Q4"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "do not follow"),
])
def test_a_damaged_file_is_one_error_naming_it(tmp_path: Path, header, data, detail):
    path = _damaged(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as refused:
        read_safetensors(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: truncated or damaged safetensors file") and detail in message
    assert "\n" not in message


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or damaged safetensors file"):
        read_safetensors(path)
