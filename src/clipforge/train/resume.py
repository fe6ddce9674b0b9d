"""Training checkpoints that survive a kill at any instant, and resuming from them.

A checkpoint is a folder ``run_dir/checkpoints/step_00000100/`` holding

- ``model.safetensors`` and ``config.json``: the weights and the model config (a clipforge model
  folder, so evaluation can load it directly);
- ``state.pt``: everything else needed to continue exactly, as plain tensors and dicts that load
  with ``torch.load(weights_only=True)``: optimizer, scheduler, loss scaler, the loss's own
  parameters, RNG states of every process, step, epoch, the sample offset inside the epoch, and
  the resolved training config.

The folder is written under a temporary name and renamed into place (``os.replace``), so a
reader sees either the whole checkpoint or none of it; ``step_*`` folders are always complete.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ..checkpoints import CheckpointError, load_model
from ..files import DiskFullError, is_disk_full, normal_permissions
from ..checkpoints import save as save_model_folder
from .log import METRICS_FILE

_STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's ``step_*`` checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """The checkpoint folder named by ``resume``: ``"latest"`` or a path; raises if there is none."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            metrics = Path(run_dir) / METRICS_FILE
            if metrics.is_file() and metrics.stat().st_size:
                raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}: the run there "
                                        "stopped before saving its first one; start it again with --overwrite "
                                        "instead of --resume")
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return found[-1]
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = checkpoint_dir(run_dir) / resume
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume checkpoint {resume!r} not found: expected {path / STATE_FILE}")
    return path


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states as plain tensors/tuples."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_stream_seed(seed: int, rank: int, step: int) -> int:
    """The seed of process ``rank``'s random streams when a run resumes at ``step`` on another world size.

    The checkpoint holds one state per process of the run that wrote it; on another number of
    processes they cannot be handed out one each, so each process derives its own from the run's
    seed, its rank and the step: reproducible, and distinct per rank (patch-dropout masks must
    differ between the images in the same slot on different processes).
    """
    return int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1)[0])


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write checkpoint ``step_{step}`` atomically, then delete all but the newest ``keep`` (0: none).

    Only checkpoints up to ``step`` count and go: one past it belongs to another history (a resume
    from an earlier step sets those aside first), so it never displaces this run's own.
    ``model`` is the plain (not compiled, not wrapped) CLIP model; ``state`` is what
    :func:`load_checkpoint` gives back (see the module docstring).
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    temporary = folder / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        normal_permissions(temporary, folder=True)
        save_model_folder(model, temporary)  # model.safetensors + config.json, what clipforge.load reads
        with open(temporary / STATE_FILE, "wb") as file:  # a file object: a full disk surfaces as OSError
            torch.save(state, file)  # inside a temporary folder: atomic with it
        for file in temporary.iterdir():
            _fsync(file)
    except BaseException as err:  # a full disk, a kill signal: leave no half-written folder behind
        shutil.rmtree(temporary, ignore_errors=True)
        if is_disk_full(err):
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise DiskFullError(f"no space left on the device writing checkpoint {final}; {kept}. "
                                "Free some space, then resume with --resume latest") from None
        raise
    if final.exists():  # the same step saved again after a resume: swap, then drop the old one
        stale = folder / f".stale_{final.name}_{os.getpid()}"
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, final)
    _fsync(folder)
    if keep > 0:
        this_history = [path for path in list_checkpoints(run_dir) if int(path.name.rsplit("_", 1)[1]) <= step]
        for old in this_history[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights of checkpoint folder ``path`` into ``model``; return its training state.

    The weights are read by :func:`clipforge.load_model`, with its format checks and errors.
    """
    model.load_state_dict(load_model(path).state_dict())
    return read_training_state(path)


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The ``state.pt`` of checkpoint folder ``path``, read as data; one-line errors for a bad file."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing; a checkpoint folder holds {WEIGHTS_FILE}, config.json "
                              f"and {STATE_FILE}")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle: never suggest weights_only=False
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{state_file}: unreadable training state ({first[:200]}); the file is truncated "
                              "or not a clipforge checkpoint: resume from an earlier step_* folder") from None


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or folder) to disk so a rename never exposes unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)
