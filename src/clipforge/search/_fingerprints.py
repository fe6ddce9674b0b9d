"""Fingerprints of embedded inputs: whether a file (or a shard member) still holds what was embedded.

A modification time alone cannot tell: a copy with ``cp -p``, a restore from a backup or ``touch -d``
puts the old time back on new content. A fingerprint is the size, ``mtime_ns`` and a digest of the
content: all of it for an input of up to ``2 * SAMPLE`` bytes (most images), else its first and last
``SAMPLE`` bytes. An input is unchanged when its size and digest are the same and, for a larger one
(whose middle the digest does not cover), its modification time too. At most ``2 * SAMPLE`` bytes of
each input are read to check it.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

SAMPLE = 64 * 1024
_THREADS = 8  # checking is reading small ranges of many files: I/O bound


def _digest(head: bytes, tail: bytes, size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def of_bytes(data: bytes, mtime_ns: int | None) -> dict:
    """The fingerprint of the content ``data``, read from a file whose ``mtime_ns`` was taken before."""
    size = len(data)
    head, tail = (data, b"") if size <= 2 * SAMPLE else (data[:SAMPLE], data[-SAMPLE:])
    return {"size": size, "mtime_ns": mtime_ns, "digest": _digest(head, tail, size)}


def of_range(path: str | os.PathLike, offset: int, size: int, mtime_ns: int | None) -> dict:
    """The fingerprint of ``size`` bytes at ``offset`` of ``path`` (a shard member, or a whole file)."""
    with open(path, "rb") as file:
        file.seek(offset)
        if size <= 2 * SAMPLE:
            head, tail = file.read(size), b""
        else:
            head = file.read(SAMPLE)
            file.seek(offset + size - SAMPLE)
            tail = file.read(SAMPLE)
    if len(head) + len(tail) != min(size, 2 * SAMPLE):  # cut short since it was measured
        return {"size": -1, "mtime_ns": mtime_ns, "digest": ""}
    return {"size": size, "mtime_ns": mtime_ns, "digest": _digest(head, tail, size)}


def of_file(path: str | os.PathLike) -> dict | None:
    """The fingerprint of the file ``path`` now, or None when it cannot be read."""
    try:
        stat = os.stat(path)
        return of_range(path, 0, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None


def from_row(row: dict) -> dict | None:
    """The fingerprint an inputs row (``.clipforge/inputs_N.parquet``) holds; None for an input that
    could not be read when it was embedded."""
    return None if row["digest"] is None else {key: row[key] for key in ("size", "mtime_ns", "digest")}


def unchanged(recorded: dict | None, current: dict | None) -> bool:
    """Whether ``current`` is the content ``recorded`` was taken of (both None: still unreadable)."""
    if recorded is None or current is None:
        return recorded is None and current is None
    if recorded["size"] != current["size"] or recorded["digest"] != current["digest"]:
        return False
    return recorded["size"] <= 2 * SAMPLE or recorded["mtime_ns"] == current["mtime_ns"]


def map_threads(function: Callable, items: list) -> list:
    """``[function(item) for item in items]``, by a few threads when there are many (reading is I/O bound)."""
    if len(items) < 2 * _THREADS:
        return [function(item) for item in items]
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(function, items))


def of_files(paths: Iterable[str | os.PathLike | None]) -> list[dict | None]:
    """:func:`of_file` of each path (None for None)."""
    return map_threads(lambda path: None if path is None else of_file(path), list(paths))
