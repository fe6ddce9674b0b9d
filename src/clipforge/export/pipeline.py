"""``clipforge convert --to onnx`` as one library call: export, check parity, quantise, measure."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

from ..models import CLIP
from .onnx import DEFAULT_OPSET, META_NAME, check_opset, export_onnx, read_meta, write_meta

PARITY_TOLERANCE = 1e-4  # max abs difference of fp32 graphs to PyTorch, per unit of the largest embedding entry


def fp32_parity(model: CLIP, folder: str | os.PathLike, threads: int | None = None, seed: int = 0) -> dict:
    """Max abs difference of the fp32 graphs' embeddings to PyTorch's on random images and real prompts.

    The reference is ``model`` in float32 on the CPU, as it was exported (a half-precision model
    is compared through its float32 copy, not its own rounding)."""
    from ..tokenizer import tokenize
    from .onnx_model import load_export

    if model.dtype != torch.float32 or model.text_projection.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()
    exported, _ = load_export(folder, threads=threads, precision="fp32", allow_unfinished=True)
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = tokenize(["a photo of a cat.", "a diagram"], context_length=model.context_length, truncate=True)
    with torch.no_grad():
        want_image, want_text = model.encode_image(images), model.encode_text(tokens)  # (2, D) each
        image_diff = (exported.encode_image(images) - want_image).abs().max()
        text_diff = (exported.encode_text(tokens) - want_text).abs().max()
    scale = max(1.0, float(want_image.abs().max()), float(want_text.abs().max()))
    return {"image_max_abs": float(image_diff), "text_max_abs": float(text_diff), "tolerance": PARITY_TOLERANCE * scale}


def check_convert_settings(opset: int = DEFAULT_OPSET, quantize: str | None = None, mode: str = "static",
                           calibration: str | os.PathLike | None = None, threads: int | None = None) -> None:
    """Refuse, in one line, settings of :func:`convert_to_onnx` that are bad or would do nothing
    (checked before anything is loaded or written)."""
    from .quantize import MODES

    check_opset(opset)
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, got {quantize!r}")
    if mode not in MODES:
        raise ValueError(f"--quantize-mode must be one of {', '.join(MODES)}, got {mode!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if quantize and calibration is None:
        raise ValueError("--quantize int8 needs --calibration DIR: images to calibrate on and to measure "
                         "the int8 embeddings' cosine to fp32 (and zero-shot top-1 when DIR has class folders)")
    if calibration is not None and not quantize:
        raise ValueError("--calibration applies to --quantize int8 only (it calibrates and measures the int8 graphs)")


def convert_to_onnx(model: CLIP, folder: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: str | None = None,
                    mode: str = "static", calibration: str | os.PathLike | None = None, templates="imagenet",
                    threads: int | None = None, progress: bool = True) -> dict:
    """Export ``model`` to ``folder``; with ``quantize="int8"`` also write int8 graphs calibrated on the
    images in ``calibration`` and measure their cost there. Returns a summary (also kept in the metadata).

    Every argument (and the calibration images) is checked before anything is written; until the
    int8 graphs are written and measured the folder's metadata is marked unfinished, so a failed or
    killed run never leaves a folder that loads. ``progress`` prints each stage to stderr."""
    from .calibration import image_batches, read_calibration_folder, token_batches
    from .quantize import quantize_export
    from .accuracy import compare_precisions
    from ..transforms import image_transform

    log = (lambda text: print(f"convert: {text}", file=sys.stderr, flush=True)) if progress else (lambda text: None)
    check_convert_settings(opset, quantize, mode, calibration, threads)
    calibration_set = images = tokens = None
    if quantize:
        calibration_set = read_calibration_folder(calibration)  # a bad folder fails before the export
        if calibration_set.note:  # said whether or not progress is on: the report will lack what the user expects
            print(f"convert: note: --calibration {calibration_set.source}: {calibration_set.note}",
                  file=sys.stderr, flush=True)
        if mode == "static":
            log(f"reading calibration images of {calibration_set.source}")
            preprocess = image_transform(model.config.vision.image_size)
            images = image_batches(calibration_set.paths, preprocess, source=calibration_set.source)
            tokens = token_batches(calibration_set.prompts, model.context_length)
    log(f"exporting the image and text towers to {folder} (opset {opset})")
    folder = Path(export_onnx(model, folder, opset, unfinished="int8 quantisation" if quantize else None))
    summary = {"folder": str(folder), "parity": fp32_parity(model, folder, threads)}
    parity = summary["parity"]
    if max(parity["image_max_abs"], parity["text_max_abs"]) > parity["tolerance"]:
        (folder / META_NAME).unlink(missing_ok=True)  # graphs that compute something else must not load
        raise ValueError(f"{folder}: the exported fp32 graphs differ from PyTorch by {parity['image_max_abs']:.2e} "
                         f"(image) / {parity['text_max_abs']:.2e} (text), above the {parity['tolerance']:.1e} "
                         f"tolerance; {META_NAME} removed so the folder does not load (please report this model)")
    if calibration_set is not None:
        batches = f" on {sum(len(b) for b in images)} images" if images else ""
        log(f"quantising to int8 ({mode}{batches})")
        summary["quantization"] = quantize_export(folder, mode, images, tokens)
        log(f"measuring int8 against fp32 on {len(calibration_set.paths)} images of {calibration_set.source}")
        summary["accuracy"] = compare_precisions(folder, calibration_set, templates, threads=threads,
                                                 progress=progress)
        meta = read_meta(folder, allow_unfinished=True)
        meta["quantization"]["accuracy"] = summary["accuracy"]
        meta.pop("unfinished", None)
        write_meta(folder, meta)  # last: from here on the folder loads
    meta = read_meta(folder)
    names = sorted({*meta["fp32_graphs"].values(), *meta.get("int8_graphs", {}).values()})  # this export's graphs
    summary["sizes_mb"] = {name: round((folder / name).stat().st_size / 2**20, 1) for name in names}
    return summary
