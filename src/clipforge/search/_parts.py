"""The embedding folder on disk: clip-retrieval's part files, clipforge's part markers and the manifest.

Layout of OUT (row ``i`` of the concatenated parts is metadata row ``i`` and FAISS id ``i``)::

    img_emb/img_emb_{N}.npy  text_emb/text_emb_{N}.npy   float16 (rows, dim), L2-normalised
    metadata/metadata_{N}.parquet                          image_path, caption[, captions, JSON fields]
    manifest.json                                          model, dim, counts, parts, skipped, complete
    .clipforge/run.json                                    what the parts were made with (resume check)
    .clipforge/inputs_{N}.parquet                          part N's inputs, in order: name, metadata row
                                                           (null: skipped), size, mtime_ns, digest
    .clipforge/part_{N}.json                               written last: part N is complete

The inputs' fingerprints (``_fingerprints``) tell a run again over the same SOURCE which complete
parts still hold what their inputs are now, and ``clipforge overlap --train-embeddings`` which rows
it may reuse. Version 1 folders (before 2) have no inputs files and name a shard sample
``shard.tar:key``; version 2 names it ``<shard>#<member>``.

Every file is written under a temporary name beside it and moved into place with ``os.replace``;
a part counts as done only once its marker exists, so a process killed mid-part leaves at most
files that the next run overwrites.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic_path

FORMAT = "clipforge-embeddings"
VERSION = 2  # 2: shard samples named <shard>#<member>, inputs fingerprinted (.clipforge/inputs_N.parquet)
STATE_DIR = ".clipforge"
EMBEDDING_FOLDERS = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}


def require_pyarrow():
    """``pyarrow`` (an optional dependency), or an ImportError saying how to get it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("embedding collections need pyarrow: pip install 'clipforge[search]'") from None
    return pyarrow


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (normal permissions)."""
    with atomic_path(path) as partial, open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())  # a part must be on disk before its completion marker


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def embedding_path(out: Path, modality: str, part: int) -> Path:
    """``OUT/img_emb/img_emb_{N}.npy`` or ``OUT/text_emb/text_emb_{N}.npy``."""
    folder, prefix = EMBEDDING_FOLDERS[modality]
    return out / folder / f"{prefix}_{part}.npy"


def metadata_path(out: Path, part: int) -> Path:
    """``OUT/metadata/metadata_{N}.parquet``."""
    return out / "metadata" / f"metadata_{part}.parquet"


def inputs_path(out: Path, part: int) -> Path:
    """``OUT/.clipforge/inputs_{N}.parquet``: part N's inputs and their fingerprints."""
    return out / STATE_DIR / f"inputs_{part}.parquet"


def marker_path(out: Path, part: int) -> Path:
    """``OUT/.clipforge/part_{N}.json``: present once part N is complete."""
    return out / STATE_DIR / f"part_{part}.json"


def _column(values: list):
    """A pyarrow array of ``values``: as inferred when one type fits, else each value as JSON text."""
    pa = require_pyarrow()
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def metadata_table(rows: list[dict], multi_caption: bool):
    """The parquet table of one part: ``image_path``, ``caption``, ``captions`` when asked, JSON fields."""
    pa = require_pyarrow()
    columns = {
        "image_path": pa.array([row["image_path"] for row in rows], type=pa.string()),
        "caption": pa.array([row["captions"][0] if row["captions"] else None for row in rows], type=pa.string()),
    }
    if multi_caption:
        columns["captions"] = pa.array([row["captions"] for row in rows], type=pa.list_(pa.string()))
    extra_names = []
    for row in rows:
        extra_names += [name for name in (row.get("meta") or {}) if name not in columns and name not in extra_names]
    for name in extra_names:
        columns[name] = _column([(row.get("meta") or {}).get(name) for row in rows])
    return pa.table(columns)


def write_part(out: Path, part: int, embeddings: dict[str, np.ndarray], rows: list[dict],
               skipped: list[dict], multi_caption: bool, rank: int = 0, inputs: list[dict] = (),
               shard: dict | None = None) -> None:
    """Write part ``part`` (each modality's ``(rows, dim)`` float16, the metadata, its ``inputs``:
    ``{"input", "row", "size", "mtime_ns", "digest"}`` in order), then its marker, which also records
    the torchrun ``rank`` that wrote it and the fingerprint of the ``shard`` it was read from."""
    pa = require_pyarrow()
    columns = {"input": pa.string(), "row": pa.int64(), "size": pa.int64(), "mtime_ns": pa.int64(),
               "digest": pa.string()}
    table = pa.table({name: pa.array([entry[name] for entry in inputs], type=kind) for name, kind in columns.items()})
    _write_parquet(inputs_path(out, part), table)
    for modality, array in embeddings.items():
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array, dtype=np.float16))
        write_atomic(embedding_path(out, modality, part), buffer.getvalue())
    _write_parquet(metadata_path(out, part), metadata_table(rows, multi_caption))
    marker = {"part": part, "rows": len(rows), "skipped": skipped, "rank": rank, "version": VERSION}
    if shard is not None:
        marker["shard"] = shard
    write_json(marker_path(out, part), marker)


def _write_parquet(path: Path, table) -> None:
    """``table`` as a parquet file at ``path``, moved into place whole."""
    pa = require_pyarrow()
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_inputs(out: Path, part: int) -> list[dict] | None:
    """Part ``part``'s inputs as written by :func:`write_part`; None when absent or unreadable."""
    pa = require_pyarrow()
    try:
        return pa.parquet.read_table(inputs_path(out, part)).to_pylist()
    except (OSError, ValueError, pa.ArrowException):
        return None


def remove_marker(out: Path, part: int) -> None:
    """Mark part ``part`` as not complete (its files are overwritten when it is done again)."""
    marker_path(out, part).unlink(missing_ok=True)


def read_marker(out: Path, part: int) -> dict | None:
    """Part ``part``'s marker, or None when the part is not complete."""
    try:
        return json.loads(marker_path(out, part).read_text())
    except (OSError, ValueError):
        return None


def check_run(out: Path, run: dict) -> None:
    """Record ``run`` in ``.clipforge/run.json``, or refuse when OUT holds parts of a different run.

    A folder of an older version is taken over (its parts, whose markers carry no ``version``, are
    embedded again); one of a newer version is refused."""
    path = out / STATE_DIR / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            if not isinstance(previous, dict):
                raise ValueError(previous)
        except ValueError:
            raise ValueError(f"{path}: not valid JSON (damaged); use a new output folder or delete this one") from None
        before = previous.get("version", 1)
        if not isinstance(before, int) or before > VERSION:
            raise ValueError(f"{out} was written by a newer clipforge embed (folder version {before!r}, this one "
                             f"writes {VERSION}); upgrade clipforge, use a new output folder or delete this one")
        changed = [name for name in run if name != "version" and previous.get(name) != run[name]]
        if changed:
            details = "; ".join(f"{name}: {previous.get(name)!r} before, {run[name]!r} now" for name in changed)
            raise ValueError(f"{out} holds embeddings made differently ({details}); "
                             "use a new output folder or delete this one")
        if before == run.get("version", 1):
            return
    write_json(path, run)


def write_manifest(out: Path, run: dict, num_parts: int, dim: int, modalities: list[str]) -> dict:
    """Write ``manifest.json`` from the part markers present; ``complete`` when every part is done."""
    markers = [read_marker(out, part) for part in range(num_parts)]
    done = [marker for marker in markers if marker is not None]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": run["model"],
        "modalities": modalities,
        "dim": dim,
        "count": sum(marker["rows"] for marker in done),
        "parts": [{"part": marker["part"], "rows": marker["rows"]} for marker in done],
        "skipped": [entry for marker in done for entry in marker["skipped"]],
        "complete": len(done) == num_parts,
        "source": run["source"],
        "precision": run["precision"],
    }
    write_json(out / "manifest.json", manifest)
    return manifest
