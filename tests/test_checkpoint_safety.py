"""Loading never runs code from a file: crafted pickles are refused and their payload never runs.

Each payload would create a marker file (``os.system("touch ...")``) when unpickled; a positive
control proves it does with plain ``pickle.loads``, then every loader must refuse it with a clear
error and leave no marker behind.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch

from clipforge import checkpoints
from clipforge.checkpoints import CheckpointError

from _checkpoint_helpers import tiny_model


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def evil_state_dict(marker) -> dict:
    # The payload comes first so it is the first thing a loader meets.
    return {"logit_scale": Payload(marker), "visual.proj": torch.zeros(2, 2)}


def write_plain_pickle(path, marker):
    path.write_bytes(pickle.dumps(evil_state_dict(marker), protocol=2))


def write_torch_zip(path, marker):
    torch.save(evil_state_dict(marker), path)


def write_legacy_torch(path, marker):
    torch.save(evil_state_dict(marker), path, _use_new_zipfile_serialization=False)


def write_open_clip_wrapper(path, marker):
    torch.save({"epoch": 1, "state_dict": tiny_model().state_dict(), "name": Payload(marker)}, path)


def write_hf_folder(path, marker):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    torch.save({"text_model.embeddings.token_embedding.weight": Payload(marker)}, path / "pytorch_model.bin")


def write_torchscript_like(path, marker):
    """A zip laid out like ``torch.jit.save`` output whose data.pkl calls os.system."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Payload(marker), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__/model.py", "def forward(self): pass\n")
        archive.writestr("evil/version", "3\n")


def write_torchscript_module_state(path, marker):
    """A plausible module tree: a ``__torch__`` module object hiding the payload in its state."""
    payload = pickle.dumps(Payload(marker), protocol=2)[2:-1]  # without PROTO and STOP
    data = (b"\x80\x02" + b"c__torch__.model\nCLIP\n" + b")\x81"  # PROTO, GLOBAL, EMPTY_TUPLE, NEWOBJ
            + b"}(" + b"X" + struct.pack("<I", 6) + b"weight" + payload  # EMPTY_DICT, MARK, 'weight': payload
            + b"ub.")  # SETITEMS, BUILD (the module's __setstate__), STOP
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", data)
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__/model.py", "")


WRITERS = [write_plain_pickle, write_torch_zip, write_legacy_torch, write_open_clip_wrapper, write_hf_folder,
           write_torchscript_like, write_torchscript_module_state]


def test_payload_really_runs_under_plain_pickle(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_payload_hidden_in_module_state_runs_under_a_permissive_unpickler(tmp_path):
    class Permissive(pickle.Unpickler):  # what an unpickler that only stubs __torch__ classes would do
        def find_class(self, module, name):
            return type(name, (), {}) if module.startswith("__torch__") else super().find_class(module, name)

    marker = tmp_path / "ran"
    write_torchscript_module_state(tmp_path / "evil.pt", marker)
    with zipfile.ZipFile(tmp_path / "evil.pt") as archive:
        Permissive(io.BytesIO(archive.read("evil/data.pkl"))).load()
    assert marker.exists()


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__.removeprefix("write_"))
def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path, writer):
    marker = tmp_path / "ran"
    path = tmp_path / ("evil_folder" if writer is write_hf_folder else "evil.pt")
    writer(path, marker)
    for read in (checkpoints.load_model, checkpoints.load_state_dict_any):
        with pytest.raises(CheckpointError, match="refused") as err:
            read(path)
        assert str(path) in str(err.value)
        assert "system" in str(err.value)  # names what the file asked for
    assert not marker.exists()
