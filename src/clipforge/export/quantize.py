"""int8 quantisation of an export folder's graphs with onnxruntime, keeping the fp32 ones beside them.

Only the weight matrix multiplies (and convolutions) inside the towers are quantised; the patch
embedding / first ResNet convolution and the final projection into the joint space stay fp32, as do
LayerNorms, softmax and the attention products of two activations (``MatMulConstBOnly``). The
first and last layers are one matmul each, so keeping them costs no measurable time, and it
gave the highest cosine of the policies compared in benchmarks/results_onnx.md.

``static`` calibrates activation ranges on the user's images (and prompts made from their class
names); ``dynamic`` computes activation ranges per batch at run time and needs no calibration.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..files import atomic_path
from .onnx import file_digest, read_meta, write_meta
from .session import require_onnx, require_onnxruntime

MODES = ("static", "dynamic")
# Nodes of the exported graphs kept in fp32 (names as torch.onnx gives them, see .onnx's towers).
KEEP_FP32 = {
    "image": ("/visual/conv1/Conv", "/visual/MatMul", "/visual/attnpool/c_proj/Gemm"),
    "text": ("/MatMul",),
}


def _weight_nodes(model, keep: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(to_quantize, kept)``: the MatMul / Gemm / Conv nodes whose second input is a weight, split by
    whether their name is in ``keep``."""
    weights = {init.name for init in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    keep = set(keep)
    candidates = [node.name for node in model.graph.node
                  if node.op_type in ("MatMul", "Gemm", "Conv")
                  and len(node.input) > 1 and (node.input[1] in weights or node.input[1] in constants)]
    return [name for name in candidates if name not in keep], [name for name in candidates if name in keep]


class _Feeds:
    """An onnxruntime ``CalibrationDataReader`` over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._iterator: Iterator | None = None

    def get_next(self):
        if self._iterator is None:
            self._iterator = iter(self.feeds)
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = None


def _quantize_graph(src: Path, dst: Path, keep: Iterable[str], mode: str,
                    feeds: list[dict] | None) -> tuple[list[str], list[str]]:
    onnx = require_onnx()
    require_onnxruntime()
    from onnxruntime import quantization  # a submodule the package does not import itself
    nodes, kept = _weight_nodes(onnx.load(str(src), load_external_data=False), keep)
    common = dict(nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                  per_channel=True, reduce_range=False, weight_type=quantization.QuantType.QInt8)
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing" notes go to the root logger
    try:
        with atomic_path(dst) as partial:
            if mode == "dynamic":
                quantization.quantize_dynamic(str(src), str(partial), **common,
                                              extra_options={"MatMulConstBOnly": True})
            else:
                if not feeds:
                    raise ValueError("static quantisation needs calibration inputs: pass --calibration DIR")
                quantization.quantize_static(
                    str(src), str(partial), _Feeds(feeds), quant_format=quantization.QuantFormat.QDQ,
                    activation_type=quantization.QuantType.QUInt8,
                    calibrate_method=quantization.CalibrationMethod.MinMax,
                    extra_options={"MatMulConstBOnly": True}, **common,
                )
    finally:
        root_logger.setLevel(level)
    return nodes, kept


def quantize_export(folder: str | os.PathLike, mode: str = "static", image_batches: list[np.ndarray] | None = None,
                    token_batches: list[np.ndarray] | None = None,
                    keep_fp32: dict[str, Iterable[str]] | None = None) -> dict:
    """Write ``image.int8.onnx`` and ``text.int8.onnx`` next to an export's fp32 graphs and make them its default.

    ``image_batches`` (N, 3, S, S) float32 and ``token_batches`` (N, L) int64 calibrate ``static``
    mode; ``dynamic`` ignores them. ``keep_fp32`` maps ``image``/``text`` to node names left in
    fp32 (default :data:`KEEP_FP32`). Returns the ``quantization`` entry written to the metadata.
    """
    if mode not in MODES:
        raise ValueError(f"quantisation mode must be one of {', '.join(MODES)}, got {mode!r}")
    folder = Path(folder)
    meta = read_meta(folder, allow_unfinished=True)  # convert_to_onnx quantises before it marks the export whole
    fp32 = meta["fp32_graphs"]
    int8 = {"image": "image.int8.onnx", "text": "text.int8.onnx"}
    feeds = {"image": [{meta["inputs"]["image"]: batch} for batch in image_batches or []],
             "text": [{meta["inputs"]["text"]: batch} for batch in token_batches or []]}
    keep_fp32 = KEEP_FP32 if keep_fp32 is None else keep_fp32
    quantized = {tower: _quantize_graph(folder / fp32[tower], folder / int8[tower], keep_fp32[tower], mode,
                                        feeds[tower]) for tower in ("image", "text")}
    entry = {"mode": mode, "weights": "int8 per channel", "activations": "uint8" if mode == "static" else "dynamic",
             "kept_fp32": {tower: kept for tower, (_, kept) in quantized.items()},
             "quantized_nodes": {tower: len(nodes) for tower, (nodes, _) in quantized.items()},
             "calibration_batches": {tower: len(feeds[tower]) for tower in feeds} if mode == "static" else None}
    meta.update(graphs=int8, int8_graphs=int8, precision="int8", quantization=entry)
    meta["digests"].update({name: file_digest(folder / name) for name in int8.values()})
    write_meta(folder, meta)
    return entry
