"""ImageNet-1k validation: 1,000 wnid folders, or the flat folder of 50,000 files plus ground truth.

Class i is the i-th wnid in sorted order (torchvision's and every released checkpoint's order).
The flat layout (``ILSVRC2012_val_00000001.JPEG`` ...) needs one of these ground-truth files, looked
for in the folder, its parent, and an ``ILSVRC2012_devkit_t12/data`` folder beside either:

- the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012 id per line, in file
  order) together with the devkit's ``meta.mat`` (id -> wnid; read with scipy, which
  ``clipforge[eval]`` brings through scikit-learn);
- the same file holding one wnid per line instead of ids (no ``meta.mat`` needed);
- Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the wnid first).
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from ...data.captions import is_image_name
from ...files import read_utf8
from ._data import ProtocolData, describe, imagenet_names, require_folder, wnid_table

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
META = "meta.mat"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")
_WNID = re.compile(r"n\d{8}")


def _raise(error: OSError) -> None:  # os.walk's onerror: an unlistable folder is an error, not empty
    raise error


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, hidden files left out.

    A folder that cannot be listed (no permission) raises its ``OSError``, naming it, rather than
    passing for an empty one.
    """
    return sorted(str(Path(dirpath) / name) for dirpath, _, names in os.walk(folder, onerror=_raise)
                  for name in names if is_image_name(name) and not name.startswith("."))


def read_wnid_folders(root: Path, wnids: tuple[str, ...], dataset: str) -> tuple[list[str], list[int]]:
    """``(paths, labels)`` of a folder holding exactly the class folders ``wnids`` (label = position)."""
    require_folder(root, f"the {dataset} images")
    found = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing, unknown = set(wnids) - found, found - set(wnids)
    if missing or unknown:
        parts = [f"{len(missing)} missing: {describe(missing)}"] if missing else []
        parts += [f"{len(unknown)} unknown: {describe(unknown)}"] if unknown else []
        raise ValueError(f"{root}: {dataset} expects {len(wnids)} class folders named by wnid, found "
                         f"{len(found)} ({'; '.join(parts)})")
    paths, labels, empty = [], [], []
    for label, wnid in enumerate(wnids):
        files = list_images(root / wnid)
        empty += [] if files else [wnid]
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"{root}: {len(empty)} {dataset} class folder(s) hold no images: {describe(empty)}")
    return paths, labels


def imagenet_data(paths: list[str], labels: list[int], root: Path, dataset: str,
                  wnids: tuple[str, ...], notes: list[str] | None = None) -> ProtocolData:
    """A ProtocolData over a subset ``wnids`` of ImageNet-1k's classes, scored by the 1,000 names."""
    all_wnids = wnid_table("imagenet")
    index = {wnid: i for i, wnid in enumerate(all_wnids)}
    names = imagenet_names()
    return ProtocolData(
        paths=paths, labels=labels, classes=[names[index[w]] for w in wnids], source=str(root),
        dataset=dataset, wnids=list(wnids), prompt_classnames=names, templates="imagenet",
        label_hits=[[index[w]] for w in wnids], notes=notes or [],
    )


def _search_dirs(root: Path) -> list[Path]:
    places = [root, root.parent]
    return places + [place / "ILSVRC2012_devkit_t12" / "data" for place in places]


def _find(root: Path, name: str) -> Path | None:
    return next((place / name for place in _search_dirs(root) if (place / name).is_file()), None)


def _ids_to_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012 id -> wnid of the 1,000 leaf synsets in the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"{meta}: reading the devkit's meta.mat needs scipy (pip install 'clipforge[eval]'); "
                         f"or give {GROUND_TRUTH} with one wnid per line, or Kaggle's {KAGGLE_SOLUTION}") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True).get("synsets")
    except Exception as error:  # scipy raises MatReadError, ValueError, TypeError... on a damaged file
        if isinstance(error, OSError) and error.errno is not None:
            raise  # unreadable (permission, a folder): the command names the file
        raise ValueError(f"{meta}: not a readable MATLAB file ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None
    needed = ("ILSVRC2012_ID", "WNID", "num_children")
    if not set(needed) <= set(getattr(getattr(synsets, "dtype", None), "names", None) or ()):
        raise ValueError(f"{meta}: expected the devkit's meta.mat: a 'synsets' struct array with the fields "
                         f"{', '.join(needed)}")
    try:
        table = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets.reshape(-1)
                 if int(row["num_children"]) == 0}
    except (TypeError, ValueError) as error:
        raise ValueError(f"{meta}: a synset is not (ILSVRC2012_ID number, WNID, num_children number): "
                         f"{error}") from None
    if not table:
        raise ValueError(f"{meta}: 'synsets' holds no leaf classes (num_children 0); expected the devkit's 1,000")
    return table


def _read_kaggle(path: Path) -> dict[int, str]:
    """Image number -> wnid from Kaggle's ``LOC_val_solution.csv`` (the first word of each prediction)."""
    reader = csv.DictReader(io.StringIO(read_utf8(path).lstrip("\ufeff")))
    if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{path}: expected Kaggle's header ImageId,PredictionString, found "
                         f"{','.join(reader.fieldnames or ()) or 'no header'}")
    truth = {}
    for row in reader:
        match = _VAL_NAME.search(row["ImageId"] or "")
        if match is None:
            continue
        words = (row["PredictionString"] or "").split()
        if not words:
            raise ValueError(f"{path}: line {reader.line_num}: {row['ImageId']} has no label; expected a "
                             "PredictionString starting with its wnid (n01440764 x y w h ...)")
        truth[int(match.group(1))] = words[0]
    return truth


def _ground_truth(root: Path) -> tuple[dict[int, str], str]:
    """Image number (the 8 digits of the file name) -> wnid, and the file(s) it came from."""
    kaggle = _find(root, KAGGLE_SOLUTION)
    if kaggle:
        return _read_kaggle(kaggle), str(kaggle)
    truth = _find(root, GROUND_TRUTH)
    if truth is None:
        searched = ", ".join(str(place) for place in _search_dirs(root))
        raise ValueError(f"{root}: flat ImageNet validation folder without ground truth; expected {GROUND_TRUTH} "
                         f"(+ {META}) or {KAGGLE_SOLUTION} in {searched}; or pass 1,000 wnid folders")
    lines = [line.strip() for line in read_utf8(truth).splitlines() if line.strip()]
    if all(_WNID.fullmatch(line) for line in lines):
        return {number: wnid for number, wnid in enumerate(lines, 1)}, str(truth)
    meta = _find(root, META)
    if meta is None:
        raise ValueError(f"{truth}: holds ILSVRC2012 ids, which need the devkit's {META} beside it "
                         "(or write one wnid per line instead)")
    id_to_wnid = _ids_to_wnids(meta)
    for number, line in enumerate(lines, 1):
        if not (line.isdigit() and int(line) in id_to_wnid):
            raise ValueError(f"{truth}: entry {number} is {line!r}, neither a wnid nor an ILSVRC2012 id of {meta} "
                             f"({min(id_to_wnid)}..{max(id_to_wnid)})")
    return {number: id_to_wnid[int(line)] for number, line in enumerate(lines, 1)}, f"{truth} + {meta}"


def _load_flat(root: Path, files: list[str]) -> ProtocolData:
    truth, source = _ground_truth(root)
    wnids = wnid_table("imagenet")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    unknown = sorted(set(truth.values()) - set(index))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} wnids not in ImageNet-1k: {describe(unknown)}")
    paths, labels, unlabelled = [], [], []
    for path in files:
        match = _VAL_NAME.search(Path(path).name)
        if match is None or int(match.group(1)) not in truth:
            unlabelled.append(Path(path).name)
            continue
        paths.append(path)
        labels.append(index[truth[int(match.group(1))]])
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} images have no ground truth in {source}: {describe(unlabelled)}")
    return imagenet_data(paths, labels, root, "imagenet", wnids, [f"labels from {source}"])


def load_imagenet(path: str | os.PathLike) -> ProtocolData:
    """ImageNet-1k validation: 1,000 wnid folders or the flat folder with ground truth (module doc)."""
    root = Path(path)
    require_folder(root, "the ImageNet validation images")
    loose = [str(p) for p in sorted(root.iterdir()) if p.is_file() and is_image_name(p.name)]
    if loose and not any(p.is_dir() and _WNID.fullmatch(p.name) for p in root.iterdir()):
        return _load_flat(root, loose)
    paths, labels = read_wnid_folders(root, wnid_table("imagenet"), "imagenet")
    return imagenet_data(paths, labels, root, "imagenet", wnid_table("imagenet"))
