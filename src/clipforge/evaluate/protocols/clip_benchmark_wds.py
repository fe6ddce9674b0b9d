"""CLIP_benchmark's webdataset layout for classification, read in place (no second copy)::

    root/classnames.txt                           one class name per line, in label order
    root/zeroshot_classification_templates.txt    one template per line, {c} for the class
    root/test/0.tar, 1.tar, ...                   samples: <key>.webp|png|jpg|jpeg + <key>.cls
    root/test/nshards.txt                         the number of shards (when present, all must be there)

Tar headers are read once to index where each image's bytes lie; images are then read straight
from the shards by offset. An image path is shown as ``<shard>#<member>``.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ...files import read_utf8
from .._tar_images import IMAGE_SUFFIXES, TarMemberImages, shard_members, split_member_name
from ._data import ProtocolData, require_folder

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"


def is_wds_folder(path: str | os.PathLike, split: str = "test") -> bool:
    """Whether ``path`` holds ``classnames.txt`` and ``<split>/*.tar``."""
    root = Path(path)
    return (root / CLASSNAMES).is_file() and (root / split).is_dir() and any((root / split).glob("*.tar"))


def _index_shard(shard: Path) -> list[tuple[str, tuple[int, int], int]]:
    """``[(path, (offset, size), label)]`` for the samples of one shard, in member order."""
    images, labels = {}, {}
    for archive, member in shard_members(shard):
        parts = split_member_name(member.name)
        if parts is None:
            continue
        key, suffix = parts
        if suffix in IMAGE_SUFFIXES:
            images[key] = (f"{shard}#{member.name}", (member.offset_data, member.size))
        elif suffix == "cls":
            labels[key] = _read_label(archive, member, shard)
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise ValueError(f"{shard}: {len(unlabelled)} images have no .cls label, e.g. {unlabelled[0]!r}")
    return [(images[key][0], images[key][1], labels[key]) for key in images]


def _read_label(archive: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> int:
    """The integer class in the ``.cls`` member ``member``."""
    data = archive.extractfile(member).read()
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not text.lstrip("-").isdigit():
        raise ValueError(f"{shard}#{member.name}: expected an integer class, got "
                         f"{data[:40] if text is None else text[:40]!r}")
    return int(text)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in read_utf8(path).splitlines() if line.strip()]


def _read_classnames(path: Path) -> list[str]:
    """One name per line, line ``i`` naming label ``i``: a blank line inside the list would shift
    every later label onto the wrong name, so it is refused (blank lines at the end are not)."""
    lines = [line.strip() for line in read_utf8(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, 1) if not line]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is blank; line i names class i-1, so a blank line would "
                         "shift the names of all later classes (remove it or name the class)")
    if not lines:
        raise ValueError(f"{path}: no class names")
    return lines


def _check_shard_count(root: Path, split: str, shards: list[Path]) -> None:
    """CLIP_benchmark reads ``<split>/0.tar`` ... ``<n-1>.tar`` for the n of ``nshards.txt``: a shard
    missing from them (an interrupted download) would score a part of the set as if it were all."""
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        return
    text = read_utf8(count_file).strip()
    if not text.isdigit():
        raise ValueError(f"{count_file}: expected the number of shards, got {text[:40]!r}")
    names = {shard.name for shard in shards}
    missing = [f"{i}.tar" for i in range(int(text)) if f"{i}.tar" not in names]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"{root / split}: nshards.txt lists {int(text)} shards (0.tar to {int(text) - 1}.tar) but "
                         f"{len(missing)} of them {'is' if len(missing) == 1 else 'are'} missing ({shown}); "
                         "is the download complete?")


def load_wds_classification(path: str | os.PathLike, split: str = "test") -> ProtocolData:
    """A CLIP_benchmark webdataset classification folder (module docstring), read in place."""
    root = Path(path)
    require_folder(root, f"a CLIP_benchmark webdataset folder ({CLASSNAMES}, {split}/*.tar)")
    if not (root / CLASSNAMES).is_file():
        raise ValueError(f"{root}: a CLIP_benchmark webdataset folder needs {CLASSNAMES}")
    shards = sorted((root / split).glob("*.tar"), key=lambda p: (len(p.stem), p.stem)) if (root / split).is_dir() else []
    if not shards:
        raise ValueError(f"{root}: no {split}/*.tar shards (CLIP_benchmark's webdataset layout)")
    _check_shard_count(root, split, shards)
    classnames = _read_classnames(root / CLASSNAMES)
    notes = []
    if (root / TEMPLATES).is_file():
        templates = _read_lines(root / TEMPLATES)
    else:
        templates = "imagenet"  # CLIP_benchmark's fallback too
        notes.append(f"no {TEMPLATES}: using the ImageNet templates")
    samples = [sample for shard in shards for sample in _index_shard(shard)]
    if not samples:
        raise ValueError(f"{root / split}: the shards hold no images")
    bad = sorted({label for _, _, label in samples if not 0 <= label < len(classnames)})
    if bad:
        raise ValueError(f"{root}: labels {bad[:5]} lie outside the {len(classnames)} classes of {CLASSNAMES}")
    locations = {image: location for image, location, _ in samples}
    shard_paths = [str(shard) for shard in shards]
    return ProtocolData(
        paths=[image for image, _, _ in samples], labels=[label for _, _, label in samples], classes=classnames,
        source=str(root), dataset=f"wds/{root.name}", wnids=list(classnames), prompt_classnames=classnames,
        templates=templates, label_hits=[[i] for i in range(len(classnames))], notes=notes,
        preprocess_wrapper=lambda preprocess: TarMemberImages(preprocess, locations, shard_paths),
    )
