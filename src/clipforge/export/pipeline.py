"""``clipforge convert --to onnx`` as one library call: export, check parity, quantise, measure."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import CLIP
from .onnx import DEFAULT_OPSET, export_onnx, read_meta, write_meta


def fp32_parity(model: CLIP, folder: str | os.PathLike, threads: int | None = None, seed: int = 0) -> dict:
    """Max abs difference of the fp32 graphs' embeddings to PyTorch's on random images and real prompts."""
    from ..tokenizer import tokenize
    from .onnx_model import load_export

    exported, _ = load_export(folder, threads=threads, precision="fp32")
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = tokenize(["a photo of a cat.", "a diagram"], context_length=model.context_length, truncate=True)
    with torch.no_grad():
        image_diff = (exported.encode_image(images) - model.encode_image(images)).abs().max()
        text_diff = (exported.encode_text(tokens) - model.encode_text(tokens)).abs().max()
    return {"image_max_abs": float(image_diff), "text_max_abs": float(text_diff)}


def convert_to_onnx(model: CLIP, folder: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: str | None = None,
                    mode: str = "static", calibration: str | os.PathLike | None = None, templates="imagenet",
                    threads: int | None = None, progress: bool = True) -> dict:
    """Export ``model`` to ``folder``; with ``quantize="int8"`` also write int8 graphs calibrated on the
    images in ``calibration`` and measure their cost there. Returns a summary (also kept in the metadata)."""
    from .calibration import image_batches, read_calibration_folder, token_batches
    from .quantize import quantize_export
    from .accuracy import compare_precisions
    from ..transforms import image_transform

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, got {quantize!r}")
    calibration_set = None
    if quantize:
        if calibration is None:
            raise ValueError("--quantize int8 needs --calibration DIR: images to calibrate on and to measure "
                             "the int8 embeddings' cosine to fp32 (and zero-shot top-1 when DIR has class folders)")
        calibration_set = read_calibration_folder(calibration)  # a bad folder fails before the export
    folder = Path(export_onnx(model, folder, opset))
    summary = {"folder": str(folder), "parity": fp32_parity(model, folder, threads)}
    if calibration_set is not None:
        preprocess = image_transform(model.config.vision.image_size)
        images = image_batches(calibration_set.paths, preprocess) if mode == "static" else None
        tokens = token_batches(calibration_set.prompts, model.context_length) if mode == "static" else None
        summary["quantization"] = quantize_export(folder, mode, images, tokens)
        summary["accuracy"] = compare_precisions(folder, calibration_set, templates, threads=threads,
                                                 progress=progress)
        meta = read_meta(folder)
        meta["quantization"]["accuracy"] = summary["accuracy"]
        write_meta(folder, meta)
    sizes = {path.name: path.stat().st_size for path in sorted(folder.glob("*.onnx"))}
    summary["sizes_mb"] = {name: round(size / 2**20, 1) for name, size in sizes.items()}
    return summary
