"""The model an export folder loads as: ``CLIP``'s inference API, run by onnxruntime.

``clipforge.load(folder)`` returns ``(OnnxCLIP, preprocess)`` for a folder holding
``onnx_export.json``, so every inference path that takes a CLIP (classify, eval zero-shot,
retrieval, linear probe) takes an export too. It is an ``nn.Module`` without parameters: ``eval``,
``train``, ``to`` and ``parameters`` behave as on any module, and its one buffer (the graphs'
digests) gives the evaluation feature cache a key that changes with the graphs.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip import pair_logits
from ..models.config import ClipConfig
from .onnx import META_NAME, file_digest, read_meta
from .session import create_session, resolve_threads


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`clipforge.export.export_onnx`."""
    return (Path(path) / META_NAME).is_file()


class OnnxCLIP(nn.Module):
    """``encode_image``, ``encode_text`` and ``forward`` of an exported CLIP, on onnxruntime sessions."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                 graphs: dict[str, str] | None = None, allow_unfinished: bool = False):
        super().__init__()
        self.folder = Path(folder)
        self.meta = read_meta(self.folder, allow_unfinished)  # an unfinished export only for convert's own checks
        self.config = ClipConfig.from_dict(self.meta["config"])
        self.context_length = int(self.meta["context_length"])
        self.vocab_size = self.config.text.vocab_size
        self.threads = resolve_threads(threads)
        self.graphs = dict(graphs or self.meta["graphs"])
        for name in self.graphs.values():
            _check_graph(self.folder, name, self.meta.get("digests", {}).get(name))
        self._image_session = create_session(self.folder / self.graphs["image"], self.threads, device)
        self._text_session = create_session(self.folder / self.graphs["text"], self.threads, device)
        self.register_buffer("logit_scale", torch.tensor(float(self.meta["logit_scale"])), persistent=True)
        key = "|".join(f"{tower}={name}:{self.meta.get('digests', {}).get(name, '')}"
                       for tower, name in sorted(self.graphs.items()))
        digest = hashlib.sha256(key.encode()).digest()
        self.register_buffer("graph_digest", torch.tensor(list(digest), dtype=torch.uint8), persistent=True)

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8``: which graphs this model runs."""
        return "int8" if "int8" in self.graphs["image"] else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """Inputs are fed as float32, as the graphs take them."""
        return torch.float32

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from pixels ``(N, 3, S, S)`` (``S`` the export's image size),
        on the input's device."""
        size = self.config.vision.image_size  # the graph's fixed input size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape (N, 3, {size}, {size}) for this export (its preprocess "
                             f"gives that), got {tuple(images.shape)}")
        if images.shape[0] == 0:  # a ResNet graph's attention pool cannot reshape an empty batch
            return torch.zeros(0, self.config.embed_dim, device=images.device)
        pixels = images.detach().float().cpu().contiguous().numpy()
        (features,) = self._image_session.run(None, {self.meta["inputs"]["image"]: pixels})
        features = torch.from_numpy(features).to(images.device)  # (N, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``, ``L <= context_length``."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must have shape (N, L) with L <= {self.context_length}, got {tuple(tokens.shape)}"
            )
        ids = tokens.detach().cpu().long().numpy()
        if ids.shape[0] > 0:
            ids = ids[:, : int(ids.argmax(axis=-1).max()) + 1]  # (N, L') up to the last end-of-text, as CLIP
        (features,) = self._text_session.run(None, {self.meta["inputs"]["text"]: np.ascontiguousarray(ids)})
        features = torch.from_numpy(features).to(tokens.device)  # (N, D)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: scaled cosine similarities, as ``CLIP.forward``."""
        return pair_logits(self, images, tokens)

    def extra_repr(self) -> str:
        return f"folder={str(self.folder)!r}, precision={self.precision}, threads={self.threads}"


def _check_graph(folder: Path, name: str, expected_digest: str | None) -> None:
    """Refuse a graph that is missing or whose bytes are not the ones the export recorded: the feature
    cache and the measured accuracy both trust the recorded digest (about 0.3 s for a ViT-B/32 graph)."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing graph listed in {folder / META_NAME}")
    if expected_digest is not None and file_digest(path) != expected_digest:
        raise ValueError(f"{path}: its SHA-256 is not the one {META_NAME} recorded (the graph was changed or "
                         f"replaced after export); export again with clipforge convert --to onnx")


def load_export(folder: str | os.PathLike, device: str | torch.device = "cpu",
                threads: int | None = None, precision: str | None = None,
                allow_unfinished: bool = False) -> tuple[OnnxCLIP, Callable]:
    """``(OnnxCLIP, preprocess)`` for an export folder, as :func:`clipforge.load` returns for a checkpoint.

    ``precision`` ``fp32`` or ``int8`` picks those graphs (default: the folder's ``graphs``, int8 when
    it was quantised). ``threads`` defaults to ``torch.get_num_threads()``. ``allow_unfinished`` lets
    the converter measure an export it has not finished writing (anyone else gets a ``ValueError``).
    """
    from ..transforms import image_transform

    meta = read_meta(folder, allow_unfinished)
    graphs = None
    if precision is not None:
        key = {"fp32": "fp32_graphs", "int8": "int8_graphs"}.get(precision)
        if key is None or key not in meta:
            raise ValueError(f"{folder}: no {precision} graphs; this export has "
                             f"{', '.join(k.split('_')[0] for k in ('fp32_graphs', 'int8_graphs') if k in meta)}")
        graphs = meta[key]
    model = OnnxCLIP(folder, threads, torch.device(device).type, graphs, allow_unfinished)
    return model.eval(), image_transform(model.config.vision.image_size)
