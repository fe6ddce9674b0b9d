"""Image embeddings that a ``clipforge embed`` folder already holds, for reuse by another command.

``clipforge overlap --train-embeddings DIR`` compares evaluation images against a training
collection; when that collection was embedded for search, its vectors need not be computed again.
They are reused only when the folder was made by the same model (fingerprint) at the same
precision, and only for images whose content is what was embedded (size and digest, see
``_fingerprints``; a restored modification time does not hide an edit); the rest are returned to be
embedded afresh. Images match by name: absolute paths, and ``<shard>#<member>`` for shard members
(the form both commands write). Folders written before version 2 have no fingerprints and name
shard samples ``shard.tar:key``: their rows are matched under that name too and reused while the
file (or shard) is not newer than the part, as before; embed such a folder again for the content check.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..evaluate._tar_images import shard_images, split_member_path
from ..evaluate.overlap import absolute_image_path
from . import _fingerprints, _parts


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
    if not isinstance(manifest.get("version", 1), int) or not 1 <= manifest.get("version", 1) <= _parts.VERSION:
        raise ValueError(f"{folder}: manifest.json has version {manifest.get('version')!r}; this clipforge reads "
                         f"versions 1 to {_parts.VERSION} (upgrade clipforge, or embed the folder again)")
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
    legacy = manifest.get("version", 1) < 2
    aliases = _legacy_names(wanted) if legacy else {}
    current = _CurrentInputs()
    taken, stale, out = set(), set(), Path(folder)
    plan = []  # (the part's embedding file, its rows to read, their paths as given, the part's row count)
    for part in _part_numbers(manifest, folder):
        array_path = _parts.embedding_path(out, "image", part)
        try:
            written = array_path.stat().st_mtime_ns
            names = pq.read_table(_parts.metadata_path(out, part), columns=["image_path"]).column(0).to_pylist()
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{folder}: part {part} is unreadable ({error}); embed it again") from None
        recorded = {} if legacy else _recorded_rows(out, part, folder)
        candidates = []  # (row, key) of the wanted images this part holds
        for row, name in enumerate(names):
            key = aliases.get(name) or (absolute_image_path(name) if name else None)
            if key in wanted and key not in taken:
                candidates.append((row, key))
        if legacy:
            fresh = [current.legacy_fresh(key, written) for _, key in candidates]
        else:
            fresh = current.unchanged([(recorded.get(row), key) for row, key in candidates])
        rows, kept = [], []
        for (row, key), is_fresh in zip(candidates, fresh):
            if not is_fresh:
                stale.add(key)
            elif key not in taken:
                taken.add(key)
                rows.append(row)
                kept.append(wanted[key])
        if rows:
            plan.append((array_path, rows, kept, len(names)))

    def blocks():
        for array_path, rows, kept, count in plan:
            try:
                array = np.load(array_path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"{array_path}: unreadable ({error}); embed the folder again") from None
            if array.ndim != 2 or len(array) != count:
                raise ValueError(f"{array_path}: {array.shape} embeddings for {count} metadata rows; embed again")
            yield kept, torch.from_numpy(np.asarray(array[rows], dtype=np.float32))  # (n, D)

    rest = [path for key, path in wanted.items() if key not in taken]
    changed = len(stale - taken)
    summary.update(reused=len(taken), embedded=len(rest), changed=changed, not_in_folder=len(rest) - changed)
    return blocks(), rest, summary


def _part_numbers(manifest: dict, folder) -> list[int]:
    """The complete parts the manifest lists, in order; ValueError naming the folder when it is damaged."""
    try:
        return sorted(int(entry["part"]) for entry in manifest.get("parts", []))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{folder}: manifest.json lists its parts in an unknown form; "
                         "embed the folder again") from None


def _recorded_rows(out: Path, part: int, folder) -> dict[int, dict]:
    """``{metadata row: fingerprint when embedded}`` of a part (version 2 folders)."""
    inputs = _parts.read_inputs(out, part)
    if inputs is None:
        raise ValueError(f"{folder}: part {part} has no readable {_parts.inputs_path(Path(''), part)}; embed it again")
    return {entry["row"]: _fingerprints.from_row(entry)
            for entry in inputs if entry["row"] is not None and entry["digest"] is not None}


def _legacy_names(wanted: dict[str, str]) -> dict[str, str]:
    """``{"shard.tar:key": resolved member path}`` for the shard members in ``wanted``: how version 1
    folders named a sample (the shard's file name and the webdataset key), where that is unambiguous."""
    aliases: dict[str, str | None] = {}
    for key in wanted:
        shard = _shard_of(key)
        if shard is None:
            continue
        member = key[len(shard) + 1:]
        stem = member.split("/")[-1].split(".", 1)[0]
        sample = "/".join(member.split("/")[:-1] + [stem])  # webdataset's key: up to the name's first dot
        alias = f"{os.path.basename(shard)}:{sample}"
        aliases[alias] = None if alias in aliases else key  # two shards of one file name: ambiguous
    return {alias: key for alias, key in aliases.items() if key is not None}


class _CurrentInputs:
    """What the wanted images hold now: files read directly, shard members by offset (each shard's
    headers indexed once)."""

    def __init__(self):
        self.shards: dict[str, tuple[dict, int] | None] = {}  # shard -> (member locations, mtime_ns)

    def _shard(self, shard: str) -> tuple[dict, int] | None:
        if shard not in self.shards:
            try:
                mtime_ns = os.stat(shard).st_mtime_ns
                self.shards[shard] = (shard_images([Path(shard)]).locations, mtime_ns)
            except (OSError, ValueError):  # gone or damaged since: nothing in it is reused
                self.shards[shard] = None
        return self.shards[shard]

    def fingerprint(self, key: str) -> dict | None:
        shard = _shard_of(key)
        if shard is None:
            return _fingerprints.of_file(key)
        index = self._shard(shard)
        if index is None or key not in index[0]:
            return None
        offset, size = index[0][key]
        try:
            return _fingerprints.of_range(shard, offset, size, index[1])
        except OSError:
            return None

    def unchanged(self, pairs: list[tuple[dict | None, str]]) -> list[bool]:
        """For each ``(recorded fingerprint, key)``: whether the image holds what was embedded."""
        for shard in {_shard_of(key) for _, key in pairs} - {None}:
            self._shard(shard)  # indexed here, not in the reading threads
        now = _fingerprints.map_threads(self.fingerprint, [key for _, key in pairs])
        return [recorded is not None and _fingerprints.unchanged(recorded, current)
                for (recorded, _), current in zip(pairs, now)]

    def legacy_fresh(self, key: str, written_ns: int) -> bool:
        """Version 1's rule: the file (a member: its shard) was not modified after its part was written."""
        try:
            return os.stat(_shard_of(key) or key).st_mtime_ns <= written_ns
        except OSError:
            return False


def _shard_of(key: str) -> str | None:
    """The shard of a member path ``<shard>.tar#<member>``; None for a file."""
    parts = split_member_path(key)
    return None if parts is None else parts[0]
