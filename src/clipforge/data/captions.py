"""A folder of images listed with captions in a CSV, TSV or JSONL file.

Each row names an image (relative to ``image_root``, which defaults to the caption file's folder,
or absolute) and its caption::

    image,caption                      {"image": "a.jpg", "caption": "a dog"}
    a.jpg,a dog on the grass           {"image": "b.jpg", "caption": ["a cat", "a kitten asleep"]}

Columns are found by name: the image column is the first of ``image``, ``filepath``,
``file_name``, ``path`` present and the caption column the first of ``caption``, ``title``,
``text``, unless ``image_key`` / ``caption_key`` say otherwise. TSV files are read without quoting
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
from pathlib import Path

import numpy as np

from .samples import RawSample

IMAGE_KEYS = ("image", "filepath", "file_name", "path")
CAPTION_KEYS = ("caption", "title", "text")
CAPTION_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")


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


def _pick_column(path: Path, columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to read ``what`` from: ``wanted`` if given, else the first candidate present."""
    names = [wanted] if wanted else list(candidates)
    for name in names:
        if name in columns:
            return name
    option = "image_key" if what == "image" else "caption_key"
    raise ValueError(
        f"{path}: no {what} column: looked for {', '.join(map(repr, names))}, found {', '.join(map(repr, columns))}; "
        f"pass {option}= to name it"
    )


def _read_delimited(path: Path, image_key: str | None, caption_key: str | None) -> tuple[list[str], list]:
    """(image paths, captions) from a CSV or TSV file with a header row."""
    tsv = path.suffix.lower() == ".tsv"
    with open(path, newline="", encoding="utf-8-sig") as f:
        if tsv:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file, expected a header row naming the image and caption columns")
        columns = [c.strip() for c in reader.fieldnames]
        reader.fieldnames = columns
        image_column = _pick_column(path, columns, image_key, IMAGE_KEYS, "image")
        caption_column = _pick_column(path, columns, caption_key, CAPTION_KEYS, "caption")
        images, captions = [], []
        for row in reader:
            images.append((row.get(image_column) or "").strip())
            captions.append(row.get(caption_column) or "")
    return images, captions


def _read_jsonl(path: Path, image_key: str | None, caption_key: str | None) -> tuple[list[str], list]:
    """(image paths, captions) from a JSON-lines file; a caption may be a list of strings."""
    images, captions = [], []
    image_column = caption_column = None
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line, got {type(row).__name__}")
            if image_column is None:  # columns are named by the first row
                image_column = _pick_column(path, list(row), image_key, IMAGE_KEYS, "image")
                caption_column = _pick_column(path, list(row), caption_key, CAPTION_KEYS, "caption")
            images.append(str(row.get(image_column) or "").strip())
            captions.append(row.get(caption_column))
    return images, captions


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
        if not self.caption_file.is_file():
            raise FileNotFoundError(f"caption file not found: {self.caption_file}")
        suffix = self.caption_file.suffix.lower()
        if suffix not in CAPTION_FILE_SUFFIXES:
            raise ValueError(f"{self.caption_file}: unknown caption file type {suffix!r}, expected .csv, .tsv or .jsonl")
        self.image_root = Path(image_root) if image_root is not None else self.caption_file.parent
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root}")
        read = _read_jsonl if suffix == ".jsonl" else _read_delimited
        images, captions = read(self.caption_file, image_key, caption_key)
        if not images:
            raise ValueError(f"{self.caption_file}: no rows, expected one (image, caption) row per sample")
        self._check_images_exist(images[:5])
        self.images = PackedStrings(images)
        # A list caption is stored as its JSON text and flagged, so one string buffer holds both kinds.
        self.multi = np.array([isinstance(c, list) for c in captions], dtype=bool)
        self.captions = PackedStrings([json.dumps(c) if isinstance(c, list) else str(c or "") for c in captions])

    def _check_images_exist(self, first_images: list[str]) -> None:
        """Fail early when image_root is wrong: at least one of the first rows must exist."""
        if not any(name and (self.image_root / name).is_file() for name in first_images):
            raise FileNotFoundError(
                f"none of the first {len(first_images)} images listed in {self.caption_file} exists under "
                f"{self.image_root} (e.g. {self.image_root / first_images[0]}); pass image_root= to say where they are"
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

    def read(self, start: int, stop: int) -> list[RawSample]:
        """Raw samples at epoch positions start..stop-1."""
        return [self.dataset.read(int(row)) for row in self.order[start:stop]]
