"""A folder of images listed with captions in a CSV, TSV or JSONL file.

Each row names an image (relative to ``image_root``, which defaults to the caption file's folder,
or absolute) and its caption::

    image,caption                      {"image": "a.jpg", "caption": "a dog"}
    a.jpg,a dog on the grass           {"image": "b.jpg", "caption": ["a cat", "a kitten asleep"]}

:func:`read_listing` is the one reader of such listings, for training, evaluation and embedding.
Columns are found by name (:data:`IMAGE_KEYS`, :data:`CAPTION_KEYS`, any case) unless
``image_key`` / ``caption_key`` say otherwise; a CSV/TSV whose first cell is an image file name
has no header. Files may start with a UTF-8 byte-order mark. TSV files are read without quoting
(tabs separate fields, quotes are text). A JSONL caption may be a list: the image is still one
sample per epoch, with one of its captions drawn per epoch from (seed, epoch) - so an image never
meets itself as a negative in a batch, and over epochs every caption is used.

Rows are stored packed in numpy buffers rather than Python lists, so forked data-loader workers
share them instead of copying them page by page as reference counts change.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samples import RawSample

IMAGE_KEYS = ("image", "filepath", "file_path", "image_path", "path", "filename", "file_name", "file", "img")
CAPTION_KEYS = ("caption", "title", "text", "sentence", "raw")
CAPTION_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class ListingError(ValueError):
    """A caption listing that cannot be read: the message names the file (and line) and what was expected."""


@dataclass
class Listing:
    """The rows of a caption listing: ``images[i]`` (as written in the file) has ``captions[i]``."""

    images: list[str]
    captions: list[list[str]]  # one or more captions per row; a JSONL list gives several
    source: str


class PackedStrings:
    """An immutable list of strings kept in one byte buffer plus offsets."""

    def __init__(self, items: list[str]):
        encoded = [item.encode("utf-8") for item in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:stop].tobytes().decode("utf-8")


def is_image_name(name: str | os.PathLike) -> bool:
    """Whether a file name has one of the image extensions clipforge reads (contents are checked on decode)."""
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def _pick_column(path: Path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to read ``what`` from: ``wanted`` if given, else the first candidate present (any case)."""
    by_lower = {column.lower(): column for column in reversed(columns)}
    for name in [wanted] if wanted else candidates:
        column = name if name in columns else by_lower.get(name.lower())
        if column is not None:
            return column
    looked = repr(wanted) if wanted else ", ".join(map(repr, candidates))
    raise ListingError(f"{path}: no {what} column: looked for {looked}, found {', '.join(map(repr, columns))}; "
                       f"name it with data.{what}_key (clipforge train --set data.{what}_key=NAME)")


def _as_captions(value, where: str = "") -> list[str]:
    """A cell or JSON value as a list of captions: a list stays a list, None is no caption; a
    number, object or boolean is refused (``where`` names the line), not trained on as text."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    wrong = next((item for item in items if item is not None and not isinstance(item, str)), None)
    if wrong is not None:
        raise ListingError(f"{where}: a caption must be text or a list of texts, got {json.dumps(wrong)}")
    return [item for item in items if item is not None]


def _open_text(path: Path):
    """The file as text: UTF-8 with or without a byte-order mark."""
    return open(path, newline="", encoding="utf-8-sig")


def _read_delimited(path: Path, image_key: str | None, caption_key: str | None) -> Listing:
    """A CSV or TSV file: a header row naming the columns, or (image, caption) rows without one.

    A first row is taken as data only when its first cell is an image file name; otherwise it must
    name the columns. TSV is read without quoting (tabs separate fields, quotes are text).
    """
    tsv = path.suffix.lower() == ".tsv"
    with _open_text(path) as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(file)
        rows = [(number, row) for number, row in enumerate(reader, 1) if any(cell.strip() for cell in row)]
    if not rows:
        raise ListingError(f"{path}: empty file, expected a header row naming the image and caption columns")
    first = [cell.strip() for cell in rows[0][1]]
    if not image_key and not caption_key and first and is_image_name(first[0]):
        image_column, caption_column, data = 0, 1, rows  # no header: (image, caption) rows
    else:
        image_column = first.index(_pick_column(path, first, image_key, IMAGE_KEYS, "image"))
        caption_column = first.index(_pick_column(path, first, caption_key, CAPTION_KEYS, "caption"))
        data = rows[1:]
    images, captions = [], []
    columns = 2 if data is rows else len(first)
    for number, row in data:
        if len(row) <= image_column:
            raise ListingError(f"{path}:{number}: expected an image path in column {image_column + 1}, got {row}")
        if len(row) > columns and any(cell.strip() for cell in row[columns:]):
            raise ListingError(f"{path}:{number}: {len(row)} fields where the listing has {columns} columns; "
                               "quote a caption that holds the delimiter")
        images.append(row[image_column].strip())
        captions.append(_as_captions(row[caption_column] if len(row) > caption_column else None))
    return Listing(images, captions, str(path))


def _read_jsonl(path: Path, image_key: str | None, caption_key: str | None) -> Listing:
    """A JSON-lines file of objects; a caption may be a list of strings (or a ``captions`` list)."""
    images, captions = [], []
    with _open_text(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ListingError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ListingError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            image_column = _pick_column(path, list(row), image_key, IMAGE_KEYS, "image")
            if caption_key is None and "captions" in row:
                caption_column = "captions"
            else:
                caption_column = _pick_column(path, list(row), caption_key, CAPTION_KEYS, "caption")
            image = row.get(image_column)
            if image is not None and not isinstance(image, str):
                raise ListingError(f"{path}:{number}: {image_column} must be an image path, got {json.dumps(image)}")
            images.append((image or "").strip())
            captions.append(_as_captions(row.get(caption_column), f"{path}:{number}"))
    return Listing(images, captions, str(path))


def read_listing(path: str | os.PathLike, image_key: str | None = None, caption_key: str | None = None) -> Listing:
    """The rows of a CSV, TSV or JSONL image-caption listing, for training, evaluation and embedding alike.

    Columns are found by name (case-insensitive; the first of :data:`IMAGE_KEYS` and of
    :data:`CAPTION_KEYS` present) unless ``image_key`` / ``caption_key`` name them. Raises
    ``FileNotFoundError`` for a missing file and :class:`ListingError` (a ``ValueError``) for an
    unknown suffix, a file that is not UTF-8, missing columns or a malformed row, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, expected a caption file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {what} (.csv, .tsv or .jsonl of image, caption rows)")
    suffix = path.suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise ListingError(f"{path}: unknown caption file type {suffix!r}, expected .csv, .tsv or .jsonl")
    read = _read_jsonl if suffix == ".jsonl" else _read_delimited
    try:
        return read(path, image_key, caption_key)
    except UnicodeDecodeError as err:
        raise ListingError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


class CaptionDataset:
    """Image-caption pairs listed in a CSV, TSV or JSONL file; random access by index.

    Raises, before any training work, FileNotFoundError for a missing caption file or image
    folder (or when none of the first listed images exists there) and ValueError for an unknown
    file type, missing columns or a file with no rows. Unreadable images and empty captions are
    not errors here: the loader skips and counts them.
    """

    sequential = False  # random access: the loader shuffles samples globally, not in blocks

    def __init__(self, caption_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 image_key: str | None = None, caption_key: str | None = None):
        self.caption_file = Path(caption_file)
        if self.caption_file.is_dir():
            raise ValueError(f"{self.caption_file}: is a folder; expected a caption file (.csv, .tsv or .jsonl)")
        if not self.caption_file.is_file():
            raise FileNotFoundError(f"caption file not found: {self.caption_file}")
        self.image_root = Path(image_root) if image_root is not None else self.caption_file.parent
        if self.image_root.is_file():
            raise ValueError(f"{self.image_root}: is a file; expected the folder the listed images are under")
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root}")
        listing = read_listing(self.caption_file, image_key, caption_key)
        if not listing.images:
            raise ValueError(f"{self.caption_file}: no rows, expected one (image, caption) row per sample")
        self._check_images_exist(listing.images[:5])
        self.images = PackedStrings(listing.images)
        # Several captions are stored as their JSON text and flagged, so one string buffer holds both kinds.
        self.multi = np.array([len(c) > 1 for c in listing.captions], dtype=bool)
        self.captions = PackedStrings([json.dumps(c) if len(c) > 1 else (c[0] if c else "") for c in listing.captions])

    def _check_images_exist(self, first_images: list[str]) -> None:
        """Fail early when image_root is wrong: at least one of the first rows must exist."""
        if not any(name and (self.image_root / name).is_file() for name in first_images):
            raise FileNotFoundError(
                f"none of the first {len(first_images)} images listed in {self.caption_file} exists under "
                f"{self.image_root} (e.g. {self.image_root / first_images[0]}); say where they are with --set data.image_root=DIR (train) or SRC_DIR (shards)"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"CaptionDataset({str(self.caption_file)!r}, {len(self)} samples)"

    def read(self, index: int) -> RawSample:
        """The raw sample at row ``index`` (file order): image bytes and its caption(s)."""
        name = self.images[index]
        captions = json.loads(self.captions[index]) if self.multi[index] else [self.captions[index]]
        if not name:
            return RawSample(key=f"row {index}", image=None, captions=captions, error="no image path")
        try:
            data = (self.image_root / name).read_bytes()
        except OSError as err:
            return RawSample(key=name, image=None, captions=captions, error=f"cannot read image file: {err.strerror or err}")
        return RawSample(key=name, image=data, captions=captions)

    def epoch_view(self, epoch: int, seed: int) -> "CaptionEpoch":
        """This epoch's order: a permutation of all rows drawn from (seed, epoch)."""
        return CaptionEpoch(self, np.random.default_rng([seed, epoch]).permutation(len(self)))


class CaptionEpoch:
    """One epoch of a CaptionDataset: epoch position -> row through a fixed permutation."""

    def __init__(self, dataset: CaptionDataset, order: np.ndarray):
        self.dataset = dataset
        self.order = order  # (N,) row index at each epoch position

    def __len__(self) -> int:
        return len(self.order)

    def read(self, start: int, stop: int) -> list[RawSample]:
        """Raw samples at epoch positions start..stop-1."""
        return [self.dataset.read(int(row)) for row in self.order[start:stop]]
