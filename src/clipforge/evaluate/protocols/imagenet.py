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
import os
import re
from pathlib import Path

from ...data.captions import is_image_name
from ._data import ProtocolData, describe, imagenet_names, wnid_table

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
META = "meta.mat"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")
_WNID = re.compile(r"n\d{8}")


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, hidden files left out."""
    return sorted(str(Path(dirpath) / name) for dirpath, _, names in os.walk(folder)
                  for name in names if is_image_name(name) and not name.startswith("."))


def read_wnid_folders(root: Path, wnids: tuple[str, ...], dataset: str) -> tuple[list[str], list[int]]:
    """``(paths, labels)`` of a folder holding exactly the class folders ``wnids`` (label = position)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the {dataset} images)")
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
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"{meta}: reading the devkit's meta.mat needs scipy (pip install 'clipforge[eval]'); "
                         f"or give {GROUND_TRUTH} with one wnid per line, or Kaggle's {KAGGLE_SOLUTION}") from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0}


def _ground_truth(root: Path) -> tuple[dict[int, str], str]:
    """Image number (the 8 digits of the file name) -> wnid, and the file(s) it came from."""
    kaggle = _find(root, KAGGLE_SOLUTION)
    if kaggle:
        with open(kaggle, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        return {int(_VAL_NAME.search(row["ImageId"]).group(1)): row["PredictionString"].split()[0]
                for row in rows if _VAL_NAME.search(row.get("ImageId", ""))}, str(kaggle)
    truth = _find(root, GROUND_TRUTH)
    if truth is None:
        searched = ", ".join(str(place) for place in _search_dirs(root))
        raise ValueError(f"{root}: flat ImageNet validation folder without ground truth; expected {GROUND_TRUTH} "
                         f"(+ {META}) or {KAGGLE_SOLUTION} in {searched}; or pass 1,000 wnid folders")
    lines = [line.strip() for line in truth.read_text(encoding="utf-8").splitlines() if line.strip()]
    if all(_WNID.fullmatch(line) for line in lines):
        return {number: wnid for number, wnid in enumerate(lines, 1)}, str(truth)
    meta = _find(root, META)
    if meta is None:
        raise ValueError(f"{truth}: holds ILSVRC2012 ids, which need the devkit's {META} beside it "
                         "(or write one wnid per line instead)")
    id_to_wnid = _ids_to_wnids(meta)
    try:
        return {number: id_to_wnid[int(line)] for number, line in enumerate(lines, 1)}, f"{truth} + {meta}"
    except (KeyError, ValueError) as error:
        raise ValueError(f"{truth}: line holds {error}, not an ILSVRC2012 id (1..1000) of {meta}") from None


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
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the ImageNet validation images)")
    loose = [str(p) for p in sorted(root.iterdir()) if p.is_file() and is_image_name(p.name)]
    if loose and not any(p.is_dir() and _WNID.fullmatch(p.name) for p in root.iterdir()):
        return _load_flat(root, loose)
    paths, labels = read_wnid_folders(root, wnid_table("imagenet"), "imagenet")
    return imagenet_data(paths, labels, root, "imagenet", wnid_table("imagenet"))
