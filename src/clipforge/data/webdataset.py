"""WebDataset tar shards: each sample is an image file plus a caption file sharing a key.

A sample ``00000017`` is the tar members ``00000017.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) and
``00000017.txt`` (the caption) or ``00000017.json`` (a caption under ``caption``/``title``/``text``,
or ``caption_key``; a list of captions gives one drawn per epoch). Shards are named by a brace
pattern (``/data/cc3m-{0000..0331}.tar``), a list of paths, or a folder holding ``*.tar``.

The loader needs each shard's sample count to split an epoch exactly across ranks and workers.
Counts come from a ``sizes.json`` beside the shards (``{"cc3m-0000.tar": 5000, ...}``, the file
``clipforge shards`` and open_clip's tools write) or, for shards it does not list, from reading
the tar headers once at start-up (no image data is read). Samples are read with the
``webdataset`` package's tar iterators; only local files are supported.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from .captions import CAPTION_KEYS, IMAGE_EXTENSIONS
from .samples import RawSample

logger = logging.getLogger("clipforge.data")

# Shard member names of an image: the image file extensions of the caption reader, without the dot.
IMAGE_MEMBERS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
SIZES_FILE = "sizes.json"
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips members named like __meta__


def require_webdataset():
    """The ``webdataset`` package (an optional dependency), or an ImportError saying how to get it."""
    try:
        import webdataset
    except ImportError:
        raise ImportError("tar shards need the webdataset package: pip install 'clipforge[train]'") from None
    return webdataset


def expand_shards(urls: str | os.PathLike | list) -> list[str]:
    """Shard paths from a brace pattern, a folder of ``*.tar`` files or a list of paths.

    Raises FileNotFoundError when the pattern matches no file or some of the files it names are
    missing (a partly copied dataset would silently change the epoch).
    """
    if isinstance(urls, (list, tuple)):
        paths = [str(u) for u in urls]
    elif Path(urls).is_dir():
        paths = sorted(str(p) for p in Path(urls).glob("*.tar"))
        if not paths:
            raise FileNotFoundError(f"no .tar shards in folder {urls}")
    else:
        paths = require_webdataset().shardlists.expand_urls(str(urls))
    missing = [p for p in paths if not Path(p).is_file()]
    if len(missing) == len(paths):
        raise FileNotFoundError(f"shard pattern {urls} matches no files (first expected: {paths[0] if paths else urls})")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards of {urls} are missing, e.g. {missing[0]}")
    return paths


def count_samples(path: str) -> int:
    """Samples in a tar shard, counted the way webdataset groups members, from headers only."""
    base_plus_ext = require_webdataset().tariterators.base_plus_ext
    count, last_key = 0, None
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            key, _ = base_plus_ext(member.name)
            if key is not None and key != last_key:
                count, last_key = count + 1, key
    return count


def _read_sizes(path: Path) -> dict:
    """A ``sizes.json``: ``{shard file name: sample count}``; one line naming it when malformed."""
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected {{\"shard.tar\": sample count, ...}} "
                         "(delete it to count the samples instead)") from None
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0] \
        if isinstance(sizes, dict) else None
    if bad is None or bad:
        what = f"entry {bad[0]!r} is not a sample count" if bad else f"holds a {type(sizes).__name__}"
        raise ValueError(f"{path}: {what}; expected {{\"shard.tar\": sample count, ...}} "
                         "(delete it to count the samples instead)")
    return sizes


def shard_sizes(paths: list[str]) -> list[int]:
    """Sample count of each shard: from ``sizes.json`` beside it when listed, else counted."""
    listed: dict[Path, dict] = {}  # folder -> its sizes.json
    for folder in {Path(p).parent for p in paths}:
        sizes_path = folder / SIZES_FILE
        listed[folder] = _read_sizes(sizes_path) if sizes_path.is_file() else {}
    known = [listed[Path(p).parent].get(Path(p).name) for p in paths]
    if None in known:
        logger.info("counting samples of %d shards missing from %s (tar headers only)", known.count(None), SIZES_FILE)
    return [int(n) if n is not None else count_samples(p) for p, n in zip(paths, known)]


def _iter_samples(path: str):
    """Yield webdataset sample dicts (``__key__`` plus one entry per extension) from one shard."""
    tariterators = require_webdataset().tariterators
    with open(path, "rb") as stream:
        files = ({**f, "__url__": path} for f in tariterators.tar_file_iterator(stream))
        yield from tariterators.group_by_keys(files)


def to_raw(sample: dict, shard_name: str, caption_keys: tuple[str, ...]) -> RawSample:
    """A webdataset sample dict as a RawSample: the first image extension present and its caption(s)."""
    key = f"{shard_name}:{sample['__key__']}"
    image = next((sample[ext] for ext in IMAGE_MEMBERS if ext in sample), None)
    captions, error = [], None
    try:
        if "txt" in sample:
            captions = [sample["txt"].decode("utf-8")]
        elif "json" in sample:
            meta = json.loads(sample["json"])
            value = next((meta[k] for k in caption_keys if isinstance(meta, dict) and k in meta), None)
            captions = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        error = f"unreadable caption: {err}"
    if image is None and error is None:
        error = f"no image (.{', .'.join(IMAGE_MEMBERS)}); members: {', '.join(k for k in sample if not k.startswith('__'))}"
    return RawSample(key=key, image=image, captions=captions, error=error)


class ShardDataset:
    """Image-caption samples in WebDataset tar shards, read sequentially.

    Raises, before any training work, FileNotFoundError when shards are missing and ValueError
    when they hold no samples, or when the first sample has no image or no caption (shards
    packed for another task). Later samples without a caption are skipped and counted.
    """

    sequential = True  # read in order: the loader shuffles shard order and within blocks

    def __init__(self, urls: str | os.PathLike | list, caption_key: str | None = None):
        self.urls = urls
        self.paths = expand_shards(urls)
        self.caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
        self.sizes = np.array(shard_sizes(self.paths), dtype=np.int64)
        if self.sizes.sum() == 0:
            raise ValueError(f"shards {urls} hold no samples")
        self._check_first_sample()

    def _check_first_sample(self) -> None:
        """Shards made for another task (no captions, no images) fail here, not mid-run."""
        path = self.paths[int(np.flatnonzero(self.sizes)[0])]
        sample = next(_iter_samples(path))
        raw = to_raw(sample, Path(path).name, self.caption_keys)
        members = ", ".join(k for k in sample if not k.startswith("__"))
        if raw.image is None:
            raise ValueError(f"shards {self.urls} hold no images: sample {raw.key} has only {members}")
        if not raw.captions:
            keys = "/".join(self.caption_keys)
            raise ValueError(
                f"shards {self.urls} have no captions: sample {raw.key} has {members} but no .txt and no .json "
                f"with a {keys} field (name the field with --set data.caption_key=NAME)"
            )

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.urls)!r}, {len(self.paths)} shards, {len(self)} samples)"

    def epoch_view(self, epoch: int, seed: int) -> "ShardEpoch":
        """This epoch's order: shards permuted by (seed, epoch), samples in file order within each."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.paths))
        return ShardEpoch(self, order)


class ShardEpoch:
    """One epoch of a ShardDataset: epoch position -> (shard, offset), read forward with one open shard."""

    def __init__(self, dataset: ShardDataset, order: np.ndarray):
        self.dataset = dataset
        self.order = order  # (S,) shard index at each place of this epoch's shard sequence
        self.starts = np.concatenate([[0], np.cumsum(dataset.sizes[order])])  # (S+1,) first position of each
        self._reader = None  # (shard index, next offset, sample iterator): continues the last read

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}  # an open file does not travel to workers

    def read(self, start: int, stop: int) -> list[RawSample]:
        """Raw samples at epoch positions start..stop-1 (positions cross shard boundaries freely)."""
        samples = []
        while start < stop:
            place = int(np.searchsorted(self.starts, start, side="right")) - 1
            end = min(stop, int(self.starts[place + 1]))
            samples += self._read_shard(int(self.order[place]), start - int(self.starts[place]), end - start)
            start = end
        return samples

    def _read_shard(self, shard: int, offset: int, count: int) -> list[RawSample]:
        """``count`` samples of one shard from ``offset``; a damaged tail yields error samples."""
        path = self.dataset.paths[shard]
        name = Path(path).name
        if self._reader is None or self._reader[0] != shard or self._reader[1] > offset:
            self._reader = (shard, 0, _iter_samples(path))
        _, position, samples_iter = self._reader
        raws = []
        try:
            for _ in range(offset - position):  # skip forward without decoding
                next(samples_iter)
            position = offset
            for _ in range(count):
                raws.append(to_raw(next(samples_iter), name, self.dataset.caption_keys))
                position += 1
        except (StopIteration, OSError, tarfile.TarError, ValueError) as err:
            reason = "shard ends early" if isinstance(err, StopIteration) else f"unreadable shard: {err}"
            raws += [RawSample(key=f"{name}:#{offset + i}", image=None, captions=[], error=reason)
                     for i in range(len(raws), count)]
            self._reader = None
            return raws
        self._reader = (shard, position, samples_iter)
        return raws
