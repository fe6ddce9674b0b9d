"""One place for the decisions every part of clipforge shares: device, precision, cache folder.

- :func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``,
  with one error for CUDA asked of a machine without it.
- :data:`PRECISIONS` and :func:`autocast` map a precision name (``fp32``, ``bf16``, ``fp16``) to
  the ``torch.autocast`` context that runs the encoders in it.
- :func:`cache_root` is the cache folder: ``$CLIPFORGE_CACHE``, default ``~/.cache/clipforge``.
  Released weights, evaluation features and the demo's sources all live below it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

CACHE_ENV = "CLIPFORGE_CACHE"
PRECISIONS: dict[str, "torch.dtype | None"] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_root() -> Path:
    """The cache folder: ``$CLIPFORGE_CACHE`` when set, else ``~/.cache/clipforge``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clipforge").expanduser()


def resolve_device(requested: "str | torch.device" = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` means this process's GPU when CUDA is available, else the CPU.

    ``cpu``, ``cuda`` and ``cuda:N`` are taken as they are; ``cuda`` on a machine without CUDA, a
    GPU index past the visible count and any other name raise ``ValueError`` with one line saying
    what was expected. ``local_rank`` picks the GPU of ``auto``/``cuda`` (torchrun's LOCAL_RANK):
    each process of a node needs a GPU of its own, since NCCL refuses two ranks on one device.
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    name = str(requested).strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for but CUDA is not available on this machine; "
                         "use --device cpu (device='cpu')")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if index:
        if int(index) >= gpus:
            raise ValueError(f"device {requested!r}: only {gpus} CUDA device(s) are visible")
        return torch.device("cuda", int(index))
    if local_rank >= gpus:
        raise ValueError(f"LOCAL_RANK={local_rank} needs a GPU of its own but {gpus} CUDA device(s) are visible: "
                         f"start at most {gpus} process(es) per node (torchrun --nproc_per_node={gpus}), "
                         "or run on the CPU with device=cpu")
    return torch.device("cuda", local_rank)


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of fp32, bf16, fp16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of ``precision`` (None for fp32)."""
    check_precision(precision)
    return PRECISIONS[precision]


def autocast(device: "torch.device | str", precision: "str | torch.dtype | None"):
    """The ``torch.autocast`` context for ``precision`` on ``device``; a no-op context for fp32.

    ``precision`` is a name (``fp32``/``bf16``/``fp16``) or already a dtype (None: fp32).
    """
    dtype = autocast_dtype(precision) if isinstance(precision, str) else precision
    if dtype is None:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def log_progress(progress: bool, message: str) -> None:
    """Print a progress line to stderr (flushed) when ``progress`` is on; results go to stdout."""
    if progress:
        print(message, file=sys.stderr, flush=True)
