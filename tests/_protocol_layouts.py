"""Standard evaluation-set layouts built from the demo's real images (copied, re-encoded as JPEG
where the release uses JPEG), for the protocol, suite and overlap tests."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipforge.runtime import cache_root


def demo_images() -> list[Path]:
    """The demo's prepared 64 px images (training sources then Fluent 3D), or skip when absent."""
    root = cache_root() / "demo" / "data-64px"
    images = sorted((root / "images").glob("*/*.png"))
    if len(images) < 1000:
        pytest.skip(f"demo images not prepared under {root}; run: clipforge demo --prepare-only")
    return images


def wnid_table(name: str) -> list[str]:
    """A shipped wnid list, read the way the package does."""
    from clipforge.evaluate.protocols._data import wnid_table as table

    return list(table(name))


def copy_image(source: Path, target: Path, jpeg: bool = False) -> Path:
    """``source`` copied to ``target`` (as a JPEG re-encode when ``jpeg``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if jpeg:
        Image.open(source).convert("RGB").save(target, format="JPEG", quality=90)
    else:
        shutil.copyfile(source, target)
    return target


def make_class_folders(root: Path, folders: list[str], per_folder: int = 1, offset: int = 0) -> dict[str, list[Path]]:
    """``root/<folder>/<i>.png`` with distinct demo images; returns the files per folder."""
    images = demo_images()
    made, k = {}, offset
    for folder in folders:
        made[folder] = []
        for i in range(per_folder):
            made[folder].append(copy_image(images[k % len(images)], root / folder / f"img{i}.png"))
            k += 1
    return made


def make_objectnet(root: Path, num_folders: int = 313, num_mapped: int = 113) -> dict:
    """An ObjectNet-1.0-like release: ``objectnet-1.0/images/<folder>/`` and ``mappings/``.

    The first ``num_mapped`` folders map to ImageNet classes; the first of them to two classes.
    The 2012 ids are a permutation of the sorted-wnid class indices, as in the real release, so a
    reader that skips ``pytorch_to_imagenet_2012_id.json`` gets the classes wrong. Returns the
    expected ``{folder: [ImageNet class index, ...]}``.
    """
    from clipforge.evaluate import metadata

    names = metadata.classnames("imagenet1k")
    # ImageNet labels as the release spells them (unique, unlike the curated names).
    labels = [f"{name} ({i})" for i, name in enumerate(names)]
    release = root / "objectnet-1.0"
    folders = [f"object_{i:03d}" for i in range(num_folders)]
    make_class_folders(release / "images", folders, per_folder=1)
    permutation = [(i * 7 + 3) % 1000 for i in range(1000)]  # class index -> 2012 id (7 is coprime to 1000)
    id_to_class = {permutation[c]: c for c in range(1000)}
    mapped = {folder: [(37 * k + 11) % 1000] for k, folder in enumerate(folders[:num_mapped])}
    mapped[folders[0]] = sorted([11, 500])
    mappings = release / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps({f: f"thing {f[-3:]}" for f in folders}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {f"thing {f[-3:]}": "; ".join(labels[c] for c in classes) for f, classes in mapped.items()}))
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(c): permutation[c] for c in range(1000)}))
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(labels[id_to_class[i]] for i in range(1000)) + "\n")
    return mapped


def make_wds(root: Path, classnames: list[str], per_class: int = 2, shards: int = 2,
             templates: list[str] | None = None) -> list[tuple[Path, int]]:
    """CLIP_benchmark's webdataset folder with real images; returns ``[(source image, label)]`` in order."""
    images = demo_images()
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    samples = [(images[3 * k + 1], k % len(classnames)) for k in range(per_class * len(classnames))]
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as archive:
            for index in range(shard * per_shard, min(len(samples), (shard + 1) * per_shard)):
                source, label = samples[index]
                for suffix, data in (("png", source.read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{index:07d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    return samples
