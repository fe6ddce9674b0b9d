"""Train/eval overlap (the paper's section 5): evaluation images with a near-duplicate in training.

Both collections are embedded (through the feature cache, so a second run costs nothing) and an
evaluation image overlaps when its nearest training image has cosine similarity >= a threshold.
Memory does not grow with the training collection beyond its list of paths: it is embedded and
searched in blocks of ``TRAIN_BLOCK`` images (each block its own cache entry, so a changed file
re-embeds its block only), and no more than ``SIMILARITY_BLOCK`` similarities are held at once.
Zero-shot accuracy is then split into the clean and overlapping subsets, as the paper reports it
(all, clean, overlap, all - clean: how much the overlap inflated the headline number).

Two descriptors, each with its own calibrated threshold (``tools/calibrate_overlap_threshold.py``
on the demo data: the same image resized or re-encoded is a duplicate, the same emoji drawn in
another style, Noto vs Twemoji vs Fluent, is not):

- ``pixels`` (the default, model-free, like the paper's use of a separate detector): the
  preprocessed image averaged down to 16 x 16 x 3, centred and L2-normalised. Threshold 0.98.
- ``model``: the model's image embedding. A CLIP embedding is semantic: at 64 px the demo model
  puts different keycaps ("#" and "3") at cosine 1.000, so it needs 0.995 and still confuses
  images that share a layout. Recalibrate it for another model.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..files import atomic_path, read_utf8
from ._tar_images import member_path, split_member_path
from .datasets import ClassificationData
from .features import encode_images

if TYPE_CHECKING:
    import PIL.Image

    from ._tar_images import TarMemberImages

DEFAULT_THRESHOLDS = {"pixels": 0.98, "model": 0.995}  # tools/calibrate_overlap_threshold.py, demo data
THUMBNAIL_GRID = 16
_CHUNK = 4096  # training images compared per step
TRAIN_BLOCK = 32768  # training images embedded at a time (pixels: 96 MiB of float32 descriptors)
SIMILARITY_BLOCK = 1 << 24  # similarities held at once: (rows, keys) with rows * keys <= this (64 MiB)


def read_path_list(path: str | os.PathLike) -> list[str]:
    """Image paths, one per line (``#`` comments and blank lines skipped)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a file listing image paths, one per line")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a list of image paths, one per line)")
    lines = read_utf8(path).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def absolute_image_path(path: str | os.PathLike) -> str:
    """``path`` absolute with symbolic links resolved; a webdataset member ``shard.tar#member`` keeps
    its member name and has its shard resolved. The form ``overlap.txt`` and ``pairs.csv`` hold."""
    path = os.fspath(path)
    parts = split_member_path(path)
    if parts is not None:
        return member_path(os.path.realpath(parts[0]), parts[1])
    return os.path.realpath(path)


def dataset_root(data: ClassificationData) -> Path:
    """The folder a data set was read from: ``data.source``, or the folder of a CSV listing."""
    source = Path(data.source)
    return source if source.is_dir() else source.parent


def drop_listed(data: ClassificationData, list_path: str | os.PathLike
                ) -> tuple[ClassificationData, list[str], list[str]]:
    """``(data without the images named in list_path, the paths dropped, the entries naming none)``.

    Paths compare absolute with symbolic links resolved (:func:`absolute_image_path`). An absolute
    entry is taken as it is; a relative one is read against the list file's folder and, when that
    names no image of ``data``, against the data set's folder (:func:`dataset_root`), never
    against the working folder. Webdataset members are written ``<shard>.tar#<member>``, e.g.
    ``test/0.tar#s0000001.png`` relative to the set's folder. An empty list drops nothing; a list
    none of whose entries names an image of ``data``, or that names every one, raises ValueError.
    """
    entries = list(dict.fromkeys(read_path_list(list_path)))
    present = {absolute_image_path(p): p for p in data.paths}
    bases = [Path(list_path).parent, dataset_root(data)]
    listed, unmatched = set(), []
    for entry in entries:
        candidates = [entry] if os.path.isabs(entry) else [str(base / entry) for base in bases]
        key = next((k for k in map(absolute_image_path, candidates) if k in present), None)
        if key is None:
            unmatched.append(entry)
        else:
            listed.add(key)
    if entries and not listed:
        raise ValueError(f"{list_path}: none of its {len(entries)} paths is an image of {data.source} "
                         f"(first: {entries[0]!r}); expected absolute paths, or paths relative to the list's "
                         f"folder or to {dataset_root(data)}")
    listed_here = [absolute_image_path(p) in listed for p in data.paths]
    keep = [i for i, is_listed in enumerate(listed_here) if not is_listed]
    dropped = [p for p, is_listed in zip(data.paths, listed_here) if is_listed]
    if not keep:
        raise ValueError(f"{list_path}: lists every one of the {len(data.paths)} images of {data.source}")
    return dataclasses.replace(data, paths=[data.paths[i] for i in keep],
                               labels=[data.labels[i] for i in keep]), dropped, unmatched


@dataclass
class TrainingImages:
    """A training collection's images: ``paths`` (files, or ``<shard>.tar#<member>`` of shards read
    in place) and how to read them."""

    paths: list[str]
    shards: "TarMemberImages | None" = None  # the shards' member index, for a collection in shards

    def wrap_preprocess(self, preprocess: Callable) -> Callable:
        """``preprocess`` reading this collection's paths (shard members by offset)."""
        if self.shards is None:
            return preprocess
        from ._tar_images import TarMemberImages

        return TarMemberImages(preprocess, self.shards.locations, [shard for shard, _, _ in self.shards.shards])

    def open(self, path: str) -> "PIL.Image.Image":
        """The image at ``path`` (a file, or a shard member)."""
        from ..transforms import load_image

        return self.shards.open(path) if self.shards is not None and path in self.shards.locations \
            else load_image(path)


def training_images(path: str | os.PathLike) -> TrainingImages:
    """The images of a training collection: a caption listing (.csv/.tsv/.jsonl), an image folder,
    or local tar shards (a ``.tar`` file, a brace pattern ``data-{0000..0099}.tar``, or a folder of
    ``.tar`` files), whose image members are read in place."""
    from ..data.captions import is_image_name, read_listing

    text = os.fspath(path)
    path = Path(text)
    if path.is_dir():
        images = sorted(str(Path(d) / n) for d, _, names in os.walk(path) for n in names
                        if is_image_name(n) and not n.startswith("."))
        if images:
            return TrainingImages(images)
        if not any(path.glob("*.tar")):
            raise ValueError(f"{path}: no images (or .tar shards) in this folder")
        return _shard_images(text)
    if text.endswith(".tar") or (".tar" in text and "{" in text):
        return _shard_images(text)
    listing = read_listing(path)
    images = [image if os.path.isabs(image) else str(path.parent / image) for image in listing.images if image]
    if not images:
        raise ValueError(f"{path}: the listing names no images")
    return TrainingImages(list(dict.fromkeys(images)))


def _shard_images(pattern: str) -> TrainingImages:
    """The image members of the local shards ``pattern`` names."""
    from ..data.webdataset import expand_shards, is_remote
    from ._tar_images import IMAGE_SUFFIXES, shard_images

    shards = expand_shards(pattern)
    remote = [shard for shard in shards if is_remote(shard)]
    if remote:
        raise ValueError(f"{remote[0]}: training shards are read in place, so they must be local files (copy "
                         "them here, or list the images in a caption file)")
    index = shard_images([Path(shard) for shard in shards])
    if not index.locations:
        raise ValueError(f"{pattern}: the shards hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return TrainingImages(list(index.locations), index)


class PixelThumbnails(torch.nn.Module):
    """A model-free near-duplicate descriptor with CLIP's ``encode_image`` interface.

    A preprocessed batch (B, 3, H, W) is averaged down to (B, 3, grid, grid), flattened and centred
    per image: resizing and re-encoding barely move it, a different drawing does.
    """

    def __init__(self, grid: int = THUMBNAIL_GRID):
        super().__init__()
        self.grid = grid
        self.register_buffer("grid_size", torch.tensor(grid))  # part of the feature-cache key

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        thumbnails = F.adaptive_avg_pool2d(images.float(), self.grid).flatten(1)  # (B, 3 * grid * grid)
        return thumbnails - thumbnails.mean(dim=1, keepdim=True)


class NearestSearch:
    """Each query's most similar key over key blocks added one after another (the same answer as one
    search over their concatenation: on a tie the earlier key wins, as ``argmax`` picks it)."""

    def __init__(self, queries: torch.Tensor, chunk: int = _CHUNK, max_similarities: int = SIMILARITY_BLOCK):
        self.queries = F.normalize(queries.float(), dim=-1)  # (Q, D)
        self.best = torch.full((len(queries),), -2.0)  # (Q,) cosine of the nearest key so far
        self.index = torch.zeros(len(queries), dtype=torch.long)  # (Q,) its position among all keys added
        self.seen = 0  # keys added so far
        self.chunk, self.max_similarities = chunk, max_similarities

    def add(self, keys: torch.Tensor) -> None:
        """Search ``keys`` (K, D), which follow the keys added before (their positions start at ``seen``)."""
        keys = keys.float()
        for start in range(0, len(keys), self.chunk):
            block = F.normalize(keys[start:start + self.chunk], dim=-1)  # (k, D)
            rows = max(1, self.max_similarities // max(1, len(block)))
            for first in range(0, len(self.queries), rows):
                similarity = self.queries[first:first + rows] @ block.T  # (rows, k)
                values, positions = similarity.max(dim=1)
                best, index = self.best[first:first + rows], self.index[first:first + rows]
                better = values > best
                self.best[first:first + rows] = torch.where(better, values, best)
                self.index[first:first + rows] = torch.where(better, positions + self.seen + start, index)
        self.seen += len(keys)


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, chunk: int = _CHUNK,
                       max_similarities: int = SIMILARITY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cosine, index)`` of each query's most similar key; (Q, D) and (K, D) in, (Q,) and (Q,) out.
    At most ``max_similarities`` similarities are held at once, whatever Q and K."""
    search = NearestSearch(queries, chunk, max_similarities)
    search.add(keys)
    return search.best, search.index


@dataclass
class Overlap:
    """Each evaluation image's nearest training image and whether it counts as a duplicate."""

    eval_paths: list[str]  # the readable evaluation images
    train_paths: list[str]  # the readable training images
    similarity: torch.Tensor  # (E,) cosine to the nearest training image
    nearest: torch.Tensor  # (E,) index into train_paths
    threshold: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_overlap(self) -> torch.Tensor:
        """(E,) bool: nearest cosine >= threshold."""
        return self.similarity >= self.threshold

    def pairs(self) -> list[tuple[str, str, float]]:
        """``(eval image, training image, cosine)`` of the overlapping images, most similar first."""
        order = torch.argsort(self.similarity, descending=True).tolist()
        return [(self.eval_paths[i], self.train_paths[int(self.nearest[i])], float(self.similarity[i]))
                for i in order if self.similarity[i] >= self.threshold]


def find_overlap(model: torch.nn.Module, train_paths: Sequence[str], eval_paths: Sequence[str],
                 preprocess: Callable | None = None, threshold: float = DEFAULT_THRESHOLDS["model"],
                 batch_size: int = 64, num_workers: int = 0, device=None, precision: str = "fp32",
                 cache_dir: str | os.PathLike | None = None, progress: bool = True,
                 train_preprocess: Callable | None = None,
                 known_train: Iterable[tuple[list[str], torch.Tensor]] = (),
                 train_block: int = TRAIN_BLOCK) -> Overlap:
    """Embed both collections with ``model`` (a CLIP model or :class:`PixelThumbnails`) and find,
    for each evaluation image, its nearest training image. ``preprocess`` defaults to the eval
    transform at the model's image size (64 px for the thumbnails); ``train_preprocess`` (default:
    ``preprocess``) reads the training images. ``known_train``: blocks of training images already
    embedded by the same model and preprocessing (``(paths, (n, D) features)``, e.g. the parts of
    ``clipforge embed``), searched first; ``train_paths`` are embedded ``train_block`` at a time."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if train_block < 1:
        raise ValueError(f"train_block must be at least 1 image, got {train_block}")
    if preprocess is None:
        from ..transforms import image_transform

        config = getattr(model, "config", None)
        preprocess = image_transform(config.vision.image_size if config is not None else 64)
    train_preprocess = train_preprocess or preprocess
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                   cache_dir=cache_dir, progress=progress)
    eval_paths = list(eval_paths)
    evaluation = encode_images(model, eval_paths, preprocess, desc="eval images", **options)
    if len(evaluation.indices) == 0:
        raise ValueError(_none_read("eval", eval_paths, evaluation.skipped))
    search = NearestSearch(evaluation.features)  # (E, D) in; one block of training images at a time
    train_kept, skipped, train_paths = [], list(evaluation.skipped), list(train_paths)
    for paths, features in known_train:
        search.add(features)
        train_kept += paths
    blocks = range(0, len(train_paths), train_block)
    for number, start in enumerate(blocks):
        paths = train_paths[start:start + train_block]
        desc = "train images" + (f" {number + 1}/{len(blocks)}" if len(blocks) > 1 else "")
        train = encode_images(model, paths, train_preprocess, desc=desc, **options)
        skipped += train.skipped
        if len(train.indices):
            search.add(train.features)
            train_kept += [paths[i] for i in train.indices.tolist()]
    if not train_kept:
        listed = set(train_paths)
        raise ValueError(_none_read("train", train_paths, [item for item in skipped if item[0] in listed]))
    return Overlap([eval_paths[i] for i in evaluation.indices.tolist()], train_kept, search.best, search.index,
                   threshold, skipped)


def _none_read(name: str, paths: list[str], skipped: list[tuple[str, str]]) -> str:
    """The error of a collection none of whose images could be read."""
    if not skipped:
        return f"no {name} images to compare"
    path, reason = skipped[0]
    return f"none of the {len(paths)} {name} images could be read, e.g. {path}: {reason}"


def split_accuracy(correct: torch.Tensor, is_overlap: torch.Tensor) -> dict:
    """Accuracy on all, clean and overlapping images, and the paper's differences (in [0, 1]).

    Computed from the counts in Python floats (not float32 means), so a share such as 1/3 is exact
    and the differences of equal accuracies are exactly 0; an empty subset's accuracy is None."""
    correct, is_overlap = correct.bool().tolist(), is_overlap.bool().tolist()
    if len(correct) != len(is_overlap):
        raise ValueError(f"correct has {len(correct)} images and is_overlap {len(is_overlap)}; expected the same")
    hits = {"all": sum(correct), "overlap": sum(c for c, o in zip(correct, is_overlap) if o)}
    counts = {"all": len(correct), "overlap": sum(is_overlap)}
    hits["clean"], counts["clean"] = hits["all"] - hits["overlap"], counts["all"] - counts["overlap"]
    accuracy = {name: hits[name] / counts[name] if counts[name] else None for name in counts}
    report = {"num_images": counts["all"], "num_overlap": counts["overlap"],
              "overlap_share": counts["overlap"] / counts["all"] if counts["all"] else 0.0,
              "accuracy_all": accuracy["all"], "accuracy_clean": accuracy["clean"],
              "accuracy_overlap": accuracy["overlap"]}
    clean, overlap = accuracy["clean"], accuracy["overlap"]
    report["overlap_minus_clean"] = None if clean is None or overlap is None else overlap - clean
    report["all_minus_clean"] = None if clean is None or accuracy["all"] is None else accuracy["all"] - clean
    return report


def image_opener(data: ClassificationData) -> Callable[[str], "PIL.Image.Image"]:
    """A function opening an image of ``data`` by its path, as the evaluation reads it: a file, or a
    CLIP_benchmark webdataset member ``<shard>.tar#<member>`` read in place from its shard (and
    ObjectNet's border crop), through the protocol's own reader (``data.wrap_preprocess``)."""
    from ..transforms import load_image

    read = data.wrap_preprocess(_unchanged) if hasattr(data, "wrap_preprocess") else _unchanged

    def open_image(path: str):
        image = read(path)
        return load_image(image) if isinstance(image, (str, os.PathLike)) else image

    return open_image


def _unchanged(image):
    return image


def write_contact_sheet(pairs: Sequence[tuple[str, str, float]], path: str | os.PathLike,
                        max_pairs: int = 48, tile: int = 96,
                        open_eval_image: Callable[[str], "PIL.Image.Image"] | None = None,
                        open_train_image: Callable[[str], "PIL.Image.Image"] | None = None) -> Path:
    """A PNG of (evaluation image | nearest training image, cosine) pairs, most similar first.

    ``open_eval_image`` reads an evaluation image by its path (default: an image file); pass
    :func:`image_opener` of the data set for webdataset members (and ``TrainingImages.open`` as
    ``open_train_image`` for training shards). An image that cannot be read is drawn as an empty
    red box."""
    from PIL import Image, ImageDraw

    from ..transforms import load_image

    open_eval_image, open_train_image = open_eval_image or load_image, open_train_image or load_image
    shown = list(pairs)[:max_pairs]
    columns = 4
    rows = max(1, -(-len(shown) // columns))
    cell_w, cell_h = 2 * tile + 12, tile + 18
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h + (18 if not shown else 0)), "white")
    draw = ImageDraw.Draw(sheet)
    if not shown:
        draw.text((6, 6), "no overlapping images", fill="black")
    for k, (eval_path, train_path, cosine) in enumerate(shown):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        for offset, image_path, opener in ((0, eval_path, open_eval_image), (tile + 2, train_path, open_train_image)):
            try:
                image = opener(image_path).convert("RGB")
                image.thumbnail((tile, tile))
                sheet.paste(image, (x + offset, y))
            except (OSError, ValueError):
                draw.rectangle((x + offset, y, x + offset + tile - 1, y + tile - 1), outline="red")
        draw.text((x, y + tile + 2), f"eval | train  cos {cosine:.3f}", fill="black")
    path = Path(path)
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path
