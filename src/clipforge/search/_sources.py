"""What ``clipforge embed`` reads: an image folder, a caption listing or WebDataset shards, cut into parts.

A :class:`Source` knows how many parts the collection has and yields the :class:`Record` of each
input of part ``n`` in a fixed order, so a part can be (re)done on its own, by any rank, after any
kill. Files and listing rows are cut into parts of ``part_size`` rows; shards give one part each
(part ``n`` is shard ``n``), since a stream cannot be entered in its middle.

- A folder is walked recursively, image files (by extension) in sorted path order; a sibling
  ``name.txt`` is the image's caption (clip-retrieval's files layout).
- A ``.csv``/``.tsv``/``.jsonl`` listing is read by :func:`clipforge.data.captions.read_listing`,
  paths relative to ``image_root`` (default: the listing's folder); one record per row.
- Anything else is a shard pattern: a ``.tar`` path, a brace pattern, a folder of ``.tar`` files,
  or the ``pipe:`` and ``http(s)://`` URLs that webdataset opens. A sample is named by its image
  member, ``<shard>#<member>`` (``/data/cc3m-0000.tar#000017.jpg``: the shard's resolved path, or its
  URL), as ``clipforge overlap`` names it (:func:`clipforge.evaluate._tar_images.member_path`).
"""
from __future__ import annotations

import json
import os
import tarfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..data.captions import CAPTION_FILE_SUFFIXES, CAPTION_KEYS, is_image_name, read_listing
from ..data.webdataset import IMAGE_MEMBERS as SHARD_IMAGE_EXTENSIONS
from ..data.webdataset import expand_shards, iter_shard_samples, require_webdataset, shard_sizes
from ..evaluate._tar_images import member_path, shard_members
from . import _fingerprints

_REMOTE_PREFIXES = ("pipe:", "http://", "https://")


@dataclass
class Record:
    """One input before decoding: where its image is, its captions and the shard's JSON metadata."""

    key: str                     # the input's name in the skipped list
    image_path: str | None       # the metadata column: absolute file path or ``<shard>#<member>``
    image: str | bytes | None    # a file path to read, the encoded bytes, or None (then ``error``)
    captions: list[str] = field(default_factory=list)
    meta: dict | None = None     # a shard sample's JSON object, for extra metadata columns
    error: str | None = None
    mtime_ns: int | None = None  # a local shard sample's: its shard's modification time (fingerprint)


class Source:
    """A collection cut into parts; see the module docstring. Subclasses fill in the three methods."""

    description: str   # the SOURCE as it goes into the manifest
    num_parts: int
    has_captions: bool  # whether any input has a caption (the default modalities follow it)

    def records(self, part: int, rows: range | None = None) -> Iterator[Record]:
        """The inputs of ``part`` in their fixed order (only positions ``rows`` within it, if given)."""
        raise NotImplementedError

    def chunks(self, part: int, size: int) -> list[range | None]:
        """How ``part`` splits into pieces that decode independently: ranges of ``size`` inputs when
        the source has random access, else ``[None]`` (the whole part, read as one stream)."""
        return [None]

    def part_inputs(self, part: int) -> int | None:
        """How many inputs ``part`` holds (None when only reading it can tell)."""
        raise NotImplementedError

    def part_fingerprint(self, part: int) -> dict | None:
        """The fingerprint of the one file ``part`` is read from (a local shard), else None."""
        return None


class FileSource(Source):
    """Image files with their captions, known up front: a folder walk or a listing's rows."""

    def __init__(self, description: str, paths: list[str], captions: list[list[str]], part_size: int):
        self.description, self.paths, self.captions, self.part_size = description, paths, captions, part_size
        self.num_parts = -(-len(paths) // part_size)
        self.has_captions = any(captions)
        self.multi_caption = any(len(row) > 1 for row in captions)  # then every part gets a captions column

    def _range(self, part: int) -> range:
        return range(part * self.part_size, min(len(self.paths), (part + 1) * self.part_size))

    def part_inputs(self, part: int) -> int:
        return len(self._range(part))

    def chunks(self, part: int, size: int) -> list[range | None]:
        count = len(self._range(part))
        return [range(start, min(start + size, count)) for start in range(0, count, size)] or [None]

    def records(self, part: int, rows: range | None = None) -> Iterator[Record]:
        whole = self._range(part)
        for row in whole if rows is None else whole[rows.start:rows.stop]:
            path = self.paths[row]
            if not path:
                yield Record(key=f"row {row}", image_path=None, image=None, captions=self.captions[row],
                             error="no image path")
            else:
                yield Record(key=path, image_path=path, image=path, captions=self.captions[row])


def _folder_source(folder: Path, part_size: int) -> FileSource:
    """Every image file under ``folder`` (recursive, sorted), captioned by a sibling ``.txt`` if any."""
    paths = sorted(str(path) for path in folder.resolve().rglob("*") if is_image_name(path.name) and path.is_file())
    if not paths:
        raise FileNotFoundError(f"{folder}: no image files (by extension) in this folder or below")
    captions = []
    for path in paths:
        sidecar = Path(path).with_suffix(".txt")
        try:
            captions.append([sidecar.read_text(encoding="utf-8").strip()] if sidecar.is_file() else [])
        except (OSError, UnicodeDecodeError):
            captions.append([])
    return FileSource(str(folder.resolve()), paths, captions, part_size)


def _listing_source(listing_path: Path, image_root: str | os.PathLike | None, part_size: int) -> FileSource:
    """The rows of a caption listing, image paths made absolute under ``image_root``."""
    listing = read_listing(listing_path)
    if not listing.images:
        raise ValueError(f"{listing_path}: no rows, expected one (image, caption) row per image")
    root = Path(image_root).resolve() if image_root else listing_path.resolve().parent
    paths = [str(root / name) if name else "" for name in listing.images]
    return FileSource(str(listing_path.resolve()), paths, listing.captions, part_size)


class ShardSource(Source):
    """WebDataset tar shards, local or streamed: part ``n`` is shard ``n``."""

    def __init__(self, description: str, urls: list[str], caption_keys: tuple[str, ...]):
        self.description, self.urls, self.caption_keys = description, urls, caption_keys
        self.num_parts = len(urls)
        self.local = not urls[0].startswith(_REMOTE_PREFIXES)
        self.sizes = self._sizes() if self.local else None
        self.has_captions = self._first_has_caption()

    def _sizes(self) -> list[int] | None:
        """Samples per shard for the progress bar (tar headers only); None when a shard is damaged."""
        try:
            return shard_sizes(self.urls)
        except (OSError, tarfile.TarError, ValueError):
            return None  # the damaged shard is reported when its part is read

    def part_inputs(self, part: int) -> int | None:
        return self.sizes[part] if self.sizes is not None else None

    def part_fingerprint(self, part: int) -> dict | None:
        return _fingerprints.of_file(self.urls[part]) if self.local else None

    def _first_has_caption(self) -> bool:
        for record in self.records(0):
            return bool(record.captions)
        return False

    def records(self, part: int, rows: range | None = None) -> Iterator[Record]:
        """The shard's samples in file order; a damaged shard ends with one error record."""
        url = self.urls[part]
        names, mtime_ns = _member_names(url) if self.local else ({}, None)
        try:  # closed early (a consumer stopped): the pipe ends, the connection closes
            with closing(iter_shard_samples(url)) as samples:
                for sample in samples:
                    yield self._record(sample, url, names, mtime_ns)
        except Exception as err:  # a damaged or cut shard, a failed pipe or URL: the shard is damaged from here
            yield Record(key=f"{url} (after its last good sample)", image_path=None, image=None,
                         error=f"unreadable shard: {err}")

    def _record(self, sample: dict, url: str, names: dict, mtime_ns: int | None) -> Record:
        extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if ext in sample), None)
        image = None if extension is None else sample[extension]
        if extension is None:  # no member to name: the sample's key
            key = member_path(url, sample["__key__"])
        else:  # webdataset lower-cases the suffix; the header pass knows the member's own name
            key = member_path(url, names.get((sample["__key__"], extension), f"{sample['__key__']}.{extension}"))
        captions, meta = [], None
        try:
            if "json" in sample:
                meta = json.loads(sample["json"])
                meta = meta if isinstance(meta, dict) else None
            if "txt" in sample:
                captions = [sample["txt"].decode("utf-8")]
            elif meta is not None:
                value = next((meta[k] for k in self.caption_keys if k in meta), None)
                captions = [str(v) for v in value] if isinstance(value, list) else [value] if isinstance(value, str) else []
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return Record(key=key, image_path=key, image=None, error=f"unreadable caption or JSON: {err}")
        if image is None:
            members = ", ".join(k for k in sample if not k.startswith("__"))
            return Record(key=key, image_path=key, image=None, captions=captions, meta=meta,
                          error=f"no image (.{', .'.join(SHARD_IMAGE_EXTENSIONS)}); members: {members}")
        return Record(key=key, image_path=key, image=image, captions=captions, meta=meta, mtime_ns=mtime_ns)


def _member_names(path: str) -> tuple[dict[tuple[str, str], str], int | None]:
    """``({(sample key, lower-case suffix): member name}, the shard's mtime_ns)`` of a local shard, from
    its tar headers (webdataset's grouping); what a damaged or compressed shard lets be read."""
    base_plus_ext = require_webdataset().tariterators.base_plus_ext
    names, mtime_ns = {}, None
    try:
        mtime_ns = os.stat(path).st_mtime_ns
        for _, member in shard_members(Path(path)):
            key, suffix = base_plus_ext(member.name)
            if key is not None:
                names[(key, suffix.lower())] = member.name
    except (OSError, ValueError):
        pass  # the samples read name their members by key and suffix; the damage is reported by the read
    return names, mtime_ns


def _shard_urls(source: str) -> list[str]:
    """Shard URLs: remote ones brace-expanded as webdataset does, local ones checked to exist."""
    if source.startswith(_REMOTE_PREFIXES):
        return require_webdataset().shardlists.expand_urls(source)
    return [str(Path(path).resolve()) for path in expand_shards(source)]


def open_source(source: str | os.PathLike, part_size: int = 10000, image_root: str | os.PathLike | None = None,
                caption_keys: tuple[str, ...] = CAPTION_KEYS) -> Source:
    """The :class:`Source` for SOURCE: a folder of images, a listing file, or shards (module docstring).

    A folder that holds ``*.tar`` files is read as shards. ``caption_keys`` are the JSON fields a
    shard sample's caption is looked up under when it has no ``.txt``.
    """
    if part_size < 1:
        raise ValueError(f"part size must be at least 1 row, got {part_size}")
    text = str(source)
    path = Path(text).expanduser()
    if not text.startswith(_REMOTE_PREFIXES):
        if path.is_dir() and not any(path.glob("*.tar")):
            return _folder_source(path, part_size)
        if path.suffix.lower() in CAPTION_FILE_SUFFIXES:
            return _listing_source(path, image_root, part_size)
        if not path.exists() and "{" not in text:
            raise FileNotFoundError(f"{source}: no such file or folder (expected an image folder, a .csv/.tsv/.jsonl "
                                    "listing, or WebDataset shards)")
    remote = text.startswith(_REMOTE_PREFIXES)
    description = str(path.resolve()) if not remote and path.exists() else text  # a pattern stays a pattern
    return ShardSource(description, _shard_urls(text), caption_keys)
