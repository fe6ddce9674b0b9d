"""One place for the decisions every part of clipforge shares: device, precision, cache folder.

- :func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``,
  with one error for CUDA asked of a machine without it.
- :data:`PRECISIONS` and :func:`autocast` map a precision name (``fp32``, ``bf16``, ``fp16``) to
  the ``torch.autocast`` context that runs the encoders in it.
- :func:`cache_root` is the cache folder: ``$CLIPFORGE_CACHE``, default ``~/.cache/clipforge``.
  Released weights, evaluation features and the demo's sources all live below it.
- :func:`retain_freed_memory` keeps what a training step frees for the next one (glibc).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

import torch

CACHE_ENV = "CLIPFORGE_CACHE"
PRECISIONS: dict[str, "torch.dtype | None"] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# glibc's mallopt parameters (malloc.h) and the values that keep freed memory: blocks up to its
# largest mmap threshold come from the heap, and the heap's free top is never given back.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; larger blocks are still mapped afresh
_RETAINED_TRIM_THRESHOLD = 2**31 - 1


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


def retain_freed_memory() -> bool:
    """Keep the memory a training step frees for the next step instead of giving it back.

    glibc's malloc returns large freed blocks to the kernel, so every CPU training step
    page-faults its activations in again (ViT-B/32 at batch 32: 23,000-67,000 faults a step, the
    step 3-8% slower than without them). After this call blocks up to 32 MiB come from the heap
    and its free top is kept: the process holds its peak memory until it exits. Returns whether
    it applied (glibc on Linux); elsewhere it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _RETAINED_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _RETAINED_TRIM_THRESHOLD))
