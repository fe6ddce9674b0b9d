"""onnxruntime sessions: the one place that imports onnxruntime and picks threads and providers."""
from __future__ import annotations

import os

INSTALL_HINT = "pip install 'clipforge[onnx]'"


class MissingOnnxError(ImportError, ValueError):
    """onnx or onnxruntime is not installed; a ValueError too, so the CLI prints it as one line."""


def require_onnxruntime():
    """The ``onnxruntime`` module, or a :class:`MissingOnnxError` naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingOnnxError(f"ONNX export folders need onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def require_onnx():
    """The ``onnx`` module, or a :class:`MissingOnnxError` naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise MissingOnnxError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def resolve_threads(threads: int | None) -> int:
    """``threads`` when given, else torch's intra-op thread count (which follows ``OMP_NUM_THREADS``)."""
    if threads is None:
        import torch

        return torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def create_session(path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
    """An ``InferenceSession`` for the graph at ``path`` on ``threads`` intra-op threads.

    ``device`` ``cuda`` uses onnxruntime's CUDA provider when this onnxruntime build has it, else
    the CPU (embeddings come back on the caller's device either way).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)
