"""Evaluation data listings: labelled images for classification, image-caption pairs for retrieval.

Only paths and labels are read here; decoding happens in ``features.py`` (where an unreadable file
is skipped and reported). Every check that can fail is made up front, so a bad listing stops with
one message naming the file before any model runs.

Classification: an image folder (one sub-folder per class) or a CSV/TSV of ``path,label``.
Retrieval: CSV/TSV or JSONL of (image, caption) rows, several rows per image allowed; a JSON list of
such objects; COCO captions JSON (``images`` + ``annotations``); or a Karpathy-split JSON
(``images[].sentences``, filtered to one split).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..files import why_missing
from ..data.captions import CAPTION_FILE_SUFFIXES, CAPTION_KEYS, IMAGE_KEYS, is_image_name, read_listing

LABEL_KEYS = ("label", "class", "classname", "class_name", "category", "target")


@dataclass
class ClassificationData:
    """Labelled images: ``paths[i]`` has class ``classes[labels[i]]``."""

    paths: list[str]
    labels: list[int]
    classes: list[str]  # folder names or CSV labels, sorted; label i is classes[i]
    source: str


@dataclass
class RetrievalData:
    """Images and captions: caption j describes image ``text_to_image[j]``."""

    image_paths: list[str]
    texts: list[str]
    text_to_image: list[int]
    source: str
    notes: list[str] = field(default_factory=list)  # what was dropped while reading, for the report


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the file name has an image extension (contents are checked when decoded)."""
    return is_image_name(path)


def is_hidden_name(name: str) -> bool:
    """Names that are never a class or an image: dot-files and folders (``.git``, AppleDouble
    ``._x.jpg``) and macOS archives' ``__MACOSX`` resource folders."""
    return name.startswith(".") or name == "__MACOSX"


def load_image_folder(root: str | os.PathLike) -> ClassificationData:
    """One sub-folder per class (sorted by name), images found recursively inside each; hidden
    folders and files (:func:`is_hidden_name`) are skipped at every level."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name))
    if not class_dirs:
        loose = sum(1 for p in root.iterdir() if is_image_file(p))
        hint = f" ({loose} images lie directly in it)" if loose else ""
        raise ValueError(f"{root}: no class sub-folders{hint}; expected one sub-folder of images per class")
    paths, labels, empty = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = []
        for dirpath, dirnames, names in os.walk(class_dir):
            dirnames[:] = [name for name in dirnames if not is_hidden_name(name)]  # not walked
            files += [str(Path(dirpath) / name) for name in names
                      if is_image_file(name) and not is_hidden_name(name)]
        files.sort()
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [label] * len(files)
    if empty:
        shown = ", ".join(repr(name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(f"{root}: {len(empty)} class folder(s) hold no images: {shown}")
    return ClassificationData(paths, labels, [d.name for d in class_dirs], str(root))


def _pick(header: list[str], keys: tuple[str, ...]) -> int | None:
    lowered = [name.strip().lower() for name in header]
    for key in keys:
        if key in lowered:
            return lowered.index(key)
    return None


def _read_table(path: Path, value_keys: tuple[str, ...]) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """``(header or None, [(line number, row)])`` of a CSV/TSV, blank rows dropped.

    The first row is a header when it names an image column or a ``value_keys`` column.
    """
    # A TSV is read without quoting, as caption listings are: a label such as `"big dog` or `12" ruler`
    # is text, not the start of a quoted field that would swallow the rows after it.
    tsv = path.suffix.lower() == ".tsv"
    options = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else dict(delimiter=",")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = [(n, row) for n, row in enumerate(csv.reader(file, **options), 1) if any(row)]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path}: empty file")
    first = rows[0][1]
    if _pick(first, IMAGE_KEYS) is not None or _pick(first, value_keys) is not None:
        return first, rows[1:]
    if not is_image_name(first[0].strip()):  # `foo,bar`: a header naming no known column, not a data row
        raise ValueError(f"{path}: first row {first} names no image column ({', '.join(IMAGE_KEYS)}) and no "
                         f"label column ({', '.join(value_keys)}), and is not a data row (its first cell is not "
                         "an image file name)")
    return None, rows


def _resolve(image_root: Path, name: str) -> str:
    return name if os.path.isabs(name) else str(image_root / name)


def _check_exist(paths: list[str], listing: Path, image_root: Path, remedy: str) -> None:
    """Raise ``FileNotFoundError`` naming the listing, how many images are missing, and ``remedy``."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{listing}: {len(missing)} of {len(set(paths))} listed images are missing under {image_root}, "
            f"e.g. {missing[0]!r}; {remedy}")


def load_labels_csv(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> ClassificationData:
    """A CSV/TSV of ``path,label`` (header optional); relative paths are under ``image_root``. A TSV is
    read without quoting (quotes are part of the text); an image may not be listed under two labels."""
    path = Path(path)
    image_root = Path(image_root) if image_root else path.parent
    header, rows = _read_table(path, LABEL_KEYS)
    image_col, label_col = (0, 1) if header is None else (_pick(header, IMAGE_KEYS), _pick(header, LABEL_KEYS))
    if image_col is None or label_col is None:
        raise ValueError(f"{path}: header {header} needs an image column ({', '.join(IMAGE_KEYS)}) "
                         f"and a label column ({', '.join(LABEL_KEYS)})")
    names, raw_labels = [], []
    first_seen: dict[str, tuple[int, str]] = {}  # image -> (line, label) where it was first listed
    for line, row in rows:
        if len(row) <= max(image_col, label_col) or not row[image_col].strip() or not row[label_col].strip():
            raise ValueError(f"{path}:{line}: expected an image path and a label, got {row}")
        image, label = _resolve(image_root, row[image_col].strip()), row[label_col].strip()
        earlier_line, earlier_label = first_seen.setdefault(os.path.normpath(os.path.abspath(image)), (line, label))
        if earlier_label != label:  # the image would be scored wrong under one of its rows, whatever the model
            raise ValueError(f"{path}:{line}: {row[image_col].strip()!r} is labelled {label!r} here but "
                             f"{earlier_label!r} on line {earlier_line}; classification takes one label per image")
        names.append(image)
        raw_labels.append(label)
    if not names:
        raise ValueError(f"{path}: no rows after the header")
    # Classification has no --skip-missing: a class's missing images would silently shift its recall.
    _check_exist(names, path, image_root, "pass the image folder (--images) or remove their rows")
    classes = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(classes)}
    return ClassificationData(names, [index[label] for label in raw_labels], classes, str(path))


def load_classification_data(path: str | os.PathLike, image_root: str | os.PathLike | None = None
                             ) -> ClassificationData:
    """An image folder, or a CSV/TSV listing of ``path,label``.

    ``clipforge.evaluate.load_classification_data`` also takes ``dataset=`` (a standard set's
    protocol, see :mod:`clipforge.evaluate.protocols`) and calls this one without it.
    """
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {why_missing(path)}")
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"{path}: expected an image folder or a .csv/.tsv of path,label")
    return load_labels_csv(path, image_root)


def _text(value, path: Path, where: str, what: str) -> str:
    """``value`` when it is a string; otherwise a ``ValueError`` naming the file, the entry and the field
    (``str()`` of a number or null would make captions such as "None")."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: {what} must be a string, got {json.dumps(value)[:60]}")
    return value


def _pairs_from_records(records: list[dict], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number} is not an object")
        image_key = next((k for k in IMAGE_KEYS if k in record), None)
        if image_key is None:
            raise ValueError(f"{path}: record {number} has no image field ({', '.join(IMAGE_KEYS)})")
        captions = record.get("captions")
        if captions is None:
            caption_key = next((k for k in CAPTION_KEYS if k in record), None)
            if caption_key is None:
                raise ValueError(f"{path}: record {number} has no caption field "
                                 f"({', '.join(CAPTION_KEYS)} or captions)")
            value = record[caption_key]
            captions = value if isinstance(value, list) else [value]
        elif not isinstance(captions, list):
            captions = [captions]  # refused below unless a string
        image = _text(record[image_key], path, f"record {number}", f"{image_key!r} (an image path)")
        pairs += [(image, _text(caption, path, f"record {number}", "a caption")) for caption in captions]
    return pairs


def _pairs_from_karpathy(images: list, path: Path, split: str | None) -> list[tuple[str, str]]:
    """Karpathy split: ``images[] {filepath?, filename, split, sentences[] {raw}}``, filtered to ``split``."""
    for number, image in enumerate(images, 1):
        if not isinstance(image, dict) or not isinstance(image.get("sentences"), list) or "filename" not in image:
            found = sorted(image) if isinstance(image, dict) else type(image).__name__
            raise ValueError(f"{path}: images entry {number} needs 'filename' and a 'sentences' list (Karpathy "
                             f"split), got {found}")
    if split:
        splits = sorted({str(image.get("split", "")) for image in images})
        images = [image for image in images if image.get("split") == split]
        if not images:
            raise ValueError(f"{path}: no images in split {split!r}; splits present: {splits}")
    pairs = []
    for image in images:
        where = f"image {image['filename']!r}"
        name = str(Path(_text(image.get("filepath", ""), path, where, "'filepath'"))
                   / _text(image["filename"], path, where, "'filename'"))
        for sentence in image["sentences"]:
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise ValueError(f"{path}: {where}: each sentence needs a 'raw' caption, got {json.dumps(sentence)[:60]}")
            pairs.append((name, _text(sentence["raw"], path, where, "a sentence's 'raw'")))
    return pairs


def _pairs_from_json(data, path: Path, split: str | None) -> list[tuple[str, str]]:
    if isinstance(data, list):
        return _pairs_from_records(data, path)
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
        return _pairs_from_coco(data, path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy split
        return _pairs_from_karpathy(data["images"], path, split)
    raise ValueError(f"{path}: unrecognised JSON; expected a list of {{image, caption}} objects, "
                     "COCO captions (images + annotations) or a Karpathy split (images[].sentences)")


def _pairs_from_coco(data: dict, path: Path) -> list[tuple[str, str]]:
    """COCO captions: ``images[] {id, file_name}`` and ``annotations[] {image_id, caption}``."""
    files = {}
    for number, image in enumerate(data["images"], 1):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            found = sorted(image) if isinstance(image, dict) else type(image).__name__
            raise ValueError(f"{path}: images entry {number} needs 'id' and 'file_name' (COCO captions), got {found}")
        files[image["id"]] = image["file_name"]
    pairs = []
    for number, annotation in enumerate(data["annotations"], 1):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            found = sorted(annotation) if isinstance(annotation, dict) else type(annotation).__name__
            raise ValueError(f"{path}: annotations entry {number} needs 'image_id' and 'caption' (COCO captions), "
                             f"got {found}")
        if annotation["image_id"] in files:
            caption = _text(annotation["caption"], path, f"annotations entry {number}", "'caption'")
            pairs.append((_text(files[annotation["image_id"]], path, f"image {annotation['image_id']!r}",
                                "'file_name'"), caption))
    return pairs


def _read_caption_pairs(path: Path, split: str | None) -> list[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix in CAPTION_FILE_SUFFIXES:  # the one listing reader, shared with training and embedding
        listing = read_listing(path)
        pairs = []
        for image, captions in zip(listing.images, listing.captions):
            if not image:
                raise ValueError(f"{path}: a row has captions {captions} but no image path")
            # A row whose caption is null has none: counted with the blank captions, not dropped unseen.
            pairs += [(image, caption) for caption in captions] or [(image, "")]
        return pairs
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        return _pairs_from_json(data, path, split)
    raise ValueError(f"{path}: expected captions as .csv, .tsv, .jsonl or .json")


def load_retrieval_data(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                        split: str | None = "test", skip_missing: bool = False) -> RetrievalData:
    """Image-caption pairs grouped by image; relative image paths are under ``image_root``.

    ``split`` selects a Karpathy split (ignored by the other formats). A missing image raises
    ``FileNotFoundError`` unless ``skip_missing``, which drops it with its captions and notes it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; retrieval --data takes a captions file "
                         "(.csv/.tsv/.jsonl of image,caption rows, COCO captions or Karpathy split JSON)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {why_missing(path)}")
    image_root = Path(image_root) if image_root else path.parent
    pairs = _read_caption_pairs(path, split)
    notes = []
    blank = sum(1 for _, caption in pairs if not caption.strip())
    if blank:
        notes.append(f"dropped {blank} blank captions")
    pairs = [(_resolve(image_root, image), caption.strip()) for image, caption in pairs if caption.strip()]
    if not pairs:
        raise ValueError(f"{path}: no (image, caption) pairs")
    if skip_missing:
        missing = {image for image, _ in pairs if not os.path.isfile(image)}
        if missing:
            notes.append(f"dropped {len(missing)} missing images, e.g. {sorted(missing)[0]!r}")
            pairs = [pair for pair in pairs if pair[0] not in missing]
        if not pairs:
            raise FileNotFoundError(f"{path}: none of the listed images exist under {image_root}")
    else:
        _check_exist([image for image, _ in pairs], path, image_root,
                     "pass the image folder (--images) or drop them (--skip-missing)")
    # One image however its rows spell it (img/a.jpg, img/../img/a.jpg, /abs/img/a.jpg): two entries for
    # one file would tie in every ranking and turn half of its captions into misses.
    image_index: dict[str, int] = {}  # normalised absolute path -> image number
    image_paths: list[str] = []  # as first listed
    for image, _ in pairs:
        if image_index.setdefault(os.path.normpath(os.path.abspath(image)), len(image_paths)) == len(image_paths):
            image_paths.append(image)
    return RetrievalData(
        image_paths=image_paths,
        texts=[caption for _, caption in pairs],
        text_to_image=[image_index[os.path.normpath(os.path.abspath(image))] for image, _ in pairs],
        source=str(path),
        notes=notes,
    )
