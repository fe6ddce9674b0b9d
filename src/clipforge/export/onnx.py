"""Export a :class:`~clipforge.CLIP` to two ONNX graphs (image and text tower) plus ``onnx_export.json``.

The folder written by :func:`export_onnx`::

    image.onnx          images (N, 3, S, S) float32 -> image_embeddings (N, D), not normalised
    text.onnx           tokens (N, L) int64, any L <= context_length -> text_embeddings (N, D)
    onnx_export.json    preprocessing, context length, logit scale, config, fingerprints, graphs

Batch and text length are dynamic axes: the text graph sizes its causal mask and positional slice
from the input, so the runtime (:mod:`.onnx_model`) trims each batch to its last end-of-text
token exactly as ``CLIP.encode_text`` does, and gets the same embeddings.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path, write_text_atomic
from ..models import CLIP
from ..transforms import OPENAI_MEAN, OPENAI_STD
from .session import require_onnx

META_NAME = "onnx_export.json"  # its presence marks an export folder for clipforge.load
FORMAT_VERSION = 1
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
IMAGE_INPUT, IMAGE_OUTPUT = "images", "image_embeddings"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "text_embeddings"


class ImageTower(nn.Module):
    """``CLIP.encode_image`` as a module of its own, for export."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)  # (N, D)


class TextTower(nn.Module):
    """``CLIP.encode_text`` without the batch trimming (the runtime trims before the graph)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        eot_positions = tokens.argmax(dim=-1)  # (N,) the end-of-text id is the largest id
        x = model.token_embedding(tokens)  # (N, L, width)
        x = x + model.positional_embedding[: tokens.shape[1]]
        x = model.ln_final(model.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0]), eot_positions]  # (N, width)
        return pooled @ model.text_projection  # (N, D)


def _export_graph(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                  input_axes: dict[int, str], opset: int) -> None:
    with atomic_path(path) as temporary, warnings.catch_warnings():  # the exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(temporary), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: input_axes, output_name: {0: "batch"}})


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_meta(folder: Path, meta: dict) -> Path:
    """Write ``onnx_export.json`` atomically (it is written last: its presence means the folder is whole)."""
    return write_text_atomic(folder / META_NAME, json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | os.PathLike, allow_unfinished: bool = False) -> dict:
    """The parsed ``onnx_export.json`` of an export folder; ``ValueError`` naming the file when bad.

    An export still being quantised (or killed while it was) carries ``unfinished``; it is refused
    unless ``allow_unfinished`` (the quantiser's own reads), so it never loads as a whole export.
    """
    path = Path(folder) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable export metadata ({err})") from None
    if meta.get("format") != "clipforge-onnx" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: expected clipforge-onnx metadata of format_version <= {FORMAT_VERSION}, "
                         f"got {meta.get('format')!r} version {meta.get('format_version')!r}")
    if meta.get("unfinished") and not allow_unfinished:
        raise ValueError(f"{path}: an unfinished export ({meta['unfinished']} did not complete, or the run was "
                         f"killed); run clipforge convert again")
    return meta


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset the export cannot target, in one line."""
    if not 14 <= opset <= 21:
        raise ValueError(f"--opset must be between 14 and 21 (scaled dot-product attention needs 14), got {opset}")


# Every name an export writes (and the hidden temporaries of files.atomic_path): the only entries an
# existing output folder may hold, so that an export never lands in (and shadows) a checkpoint folder.
EXPORT_FILES = (META_NAME, "image.onnx", "text.onnx", "image.int8.onnx", "text.int8.onnx")


def _is_export_file(name: str) -> bool:
    """Whether ``name`` is one an export writes, or ``files.atomic_path``'s temporary of one (``.NAME.tmp-PID``)."""
    return name in EXPORT_FILES or any(name.startswith(f".{ours}.tmp-") for ours in EXPORT_FILES)


def _prepare_folder(folder: Path) -> None:
    """Make ``folder`` (or check that an existing one holds only an earlier export's files), then remove
    those files, metadata first, so that nothing of the earlier export survives beside the new one."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; expected an output folder for the ONNX export")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not _is_export_file(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(f"{folder}: holds {shown}, not an ONNX export; expected a new or empty output "
                             f"folder (or an earlier export's, which is replaced)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_NAME).unlink(missing_ok=True)  # a half-rewritten folder must not look whole
    for path in folder.iterdir():  # an earlier export's int8 graphs do not match the new fp32 ones; a killed
        if _is_export_file(path.name) and path.is_file():  # run's temporaries are of no use either
            path.unlink(missing_ok=True)


def export_onnx(model: CLIP, folder: str | os.PathLike, opset: int = DEFAULT_OPSET,
                unfinished: str | None = None) -> Path:
    """Write ``model``'s towers as fp32 ONNX graphs and their metadata to ``folder``; returns ``folder``.

    ``folder`` must be new, empty or an earlier export (which is replaced). ``unfinished`` (say
    ``"int8 quantisation"``) marks the metadata as not yet loadable, for a caller with more to write.
    """
    from ..evaluate import model_fingerprint

    require_onnx()
    check_opset(opset)
    folder = Path(folder)
    _prepare_folder(folder)
    if model.dtype != torch.float32 or model.text_projection.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # export fp32 on the CPU, leave the caller's model be
    was_training = model.training
    model.eval()
    config = model.config
    size = config.vision.image_size
    images = torch.zeros(2, 3, size, size)
    tokens = torch.zeros(2, min(8, config.text.context_length), dtype=torch.long)
    tokens[:, -1] = config.text.vocab_size - 1  # an end-of-text id, so pooling reads a real position
    with torch.no_grad():
        _export_graph(ImageTower(model).eval(), images, folder / "image.onnx", IMAGE_INPUT, IMAGE_OUTPUT,
                      {0: "batch"}, opset)
        _export_graph(TextTower(model).eval(), tokens, folder / "text.onnx", TEXT_INPUT, TEXT_OUTPUT,
                      {0: "batch", 1: "length"}, opset)
    model.train(was_training)
    logit_scale = float(model.logit_scale.detach())
    meta = {
        "format": "clipforge-onnx", "format_version": FORMAT_VERSION, "opset": opset, "precision": "fp32",
        "graphs": {"image": "image.onnx", "text": "text.onnx"},
        "fp32_graphs": {"image": "image.onnx", "text": "text.onnx"},
        "digests": {name: file_digest(folder / name) for name in ("image.onnx", "text.onnx")},
        "inputs": {"image": IMAGE_INPUT, "text": TEXT_INPUT},
        "outputs": {"image": IMAGE_OUTPUT, "text": TEXT_OUTPUT},
        "preprocess": {"image_size": size, "resize": "shortest side, bicubic", "crop": "center",
                       "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
        "context_length": config.text.context_length,
        "logit_scale": logit_scale,  # log-parameterised, as CLIP.logit_scale; logits use its exp
        "logit_scale_exp": math.exp(logit_scale),
        "source_fingerprint": model_fingerprint(model),
        "config": config.to_dict(),
    }
    if unfinished:
        meta["unfinished"] = unfinished
    write_meta(folder, meta)
    return folder
