"""Image embeddings that a ``clipforge embed`` folder already holds, for reuse by another command.

``clipforge overlap --train-embeddings DIR`` compares evaluation images against a training
collection; when that collection was embedded for search, its vectors need not be computed again.
They are reused only when the folder was made by the same model (fingerprint) at the same
precision, and only for files not modified since their part was written; the rest are returned to
be embedded afresh.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..evaluate.overlap import absolute_image_path
from . import _parts


def read_embedding_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a ``clipforge embed`` folder holding image embeddings; ValueError naming the folder otherwise."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: no readable manifest.json ({type(error).__name__}); "
                         "expected a folder written by clipforge embed") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _parts.FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{folder}: manifest.json is not a clipforge embed manifest (format {found!r})")
    if "image" not in manifest.get("modalities", []):
        raise ValueError(f"{folder}: holds no image embeddings (modalities: "
                         f"{', '.join(manifest.get('modalities', [])) or 'none'})")
    return manifest


def stored_image_embeddings(folder: str | os.PathLike, manifest: dict, paths: list[str], fingerprint: str,
                            precision: str) -> tuple[Iterator[tuple[list[str], torch.Tensor]], list[str], dict]:
    """``(blocks, rest, summary)`` for the images ``paths``: ``blocks`` yields, one part at a time,
    ``(paths, (n, D) float32 embeddings)`` of those the folder holds unchanged; ``rest`` are the paths
    still to embed; ``summary`` counts reused, embedded, changed and missing images (and says why
    nothing was reused when the model or precision differ)."""
    summary = {"folder": str(Path(folder).resolve()), "reused": 0, "embedded": len(paths), "changed": 0,
               "not_in_folder": len(paths), "not_reused_because": None}
    made_by = manifest.get("model", {}).get("fingerprint")
    if made_by != fingerprint or manifest.get("precision") != precision:
        summary["not_reused_because"] = (f"made by another model (fingerprint {made_by}, this one {fingerprint})"
                                         if made_by != fingerprint else
                                         f"made at precision {manifest.get('precision')}, this run is {precision}")
        return iter(()), list(paths), summary
    pq = _parts.require_pyarrow().parquet
    wanted = {absolute_image_path(path): path for path in paths}
    taken, changed, out = set(), 0, Path(folder)
    plan = []  # (the part's embedding file, its rows to read, their paths as given, the part's row count)
    for part in sorted(int(entry["part"]) for entry in manifest.get("parts", [])):
        array_path = _parts.embedding_path(out, "image", part)
        try:
            written = array_path.stat().st_mtime_ns
            names = pq.read_table(_parts.metadata_path(out, part), columns=["image_path"]).column(0).to_pylist()
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{folder}: part {part} is unreadable ({error}); embed it again") from None
        rows, kept = [], []
        for row, name in enumerate(names):
            key = absolute_image_path(name) if name else None
            if key not in wanted or key in taken:
                continue
            try:
                fresh = os.stat(key).st_mtime_ns <= written  # else the file changed after it was embedded
            except OSError:
                fresh = False
            changed += not fresh
            if fresh:
                taken.add(key)
                rows.append(row)
                kept.append(wanted[key])
        if rows:
            plan.append((array_path, rows, kept, len(names)))

    def blocks():
        for array_path, rows, kept, count in plan:
            array = np.load(array_path, mmap_mode="r", allow_pickle=False)
            if array.ndim != 2 or len(array) != count:
                raise ValueError(f"{array_path}: {array.shape} embeddings for {count} metadata rows; embed again")
            yield kept, torch.from_numpy(np.asarray(array[rows], dtype=np.float32))  # (n, D)

    rest = [path for key, path in wanted.items() if key not in taken]
    summary.update(reused=len(taken), embedded=len(rest), changed=changed, not_in_folder=len(rest) - changed)
    return blocks(), rest, summary
