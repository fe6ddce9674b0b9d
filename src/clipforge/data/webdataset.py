"""WebDataset tar shards: each sample is an image file plus a caption file sharing a key.

A sample ``00000017`` is the tar members ``00000017.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) and
``00000017.txt`` (the caption) or ``00000017.json`` (a caption under ``caption``/``title``/``text``,
or ``caption_key``; a list of captions gives one drawn per epoch). Shards are named by a brace
pattern (``/data/cc3m-{0000..0331}.tar``), a list of paths, or a folder holding ``*.tar``.

The loader needs each shard's sample count to split an epoch exactly across ranks and workers.
Counts come from a ``sizes.json`` beside the shards (``{"cc3m-0000.tar": 5000, ...}``, the file
``clipforge shards`` and open_clip's tools write) or, for shards it does not list, from reading
the tar headers once at start-up (no image data is read). Samples are read with the
``webdataset`` package's tar iterators.

Shards may be local paths, ``http://`` / ``https://`` URLs (streamed; ``sizes.json`` is fetched
from beside them) or ``pipe:COMMAND`` (the command's standard output is the tar stream, as in
webdataset, e.g. ``pipe:aws s3 cp s3://bucket/data-0001.tar -``). Remote shards without a listed
size are streamed once at start-up to count their samples (with a progress bar on stderr).

A shard that cannot be read at start-up (damaged; cut between two members, local or streamed, plain
or gzip, as its missing end-of-archive block shows; a failing command; an unreachable server) stops
with one line naming it (ShardReadError, a ValueError); later, its samples are skipped and counted.
A shard that goes on after the samples its sizes.json lists is reported in a warning (once per
process), and a shard named twice (an epoch would read it twice) is refused.

Several sources (a list of patterns) can be mixed with ``weights``: with ``resampled=True`` each
epoch draws its shard sequence with replacement (open_clip's ``--dataset-resampled``), a shard of
source i with probability proportional to ``weights[i] / samples in source i``, so that source i
gives about ``weights[i] / sum(weights)`` of the samples whatever its shard sizes. The draw is a
function of (seed, epoch) and the shard sizes, so exact resume holds as for a permuted epoch.
"""
from __future__ import annotations

import collections
import http.client
import json
import logging
import math
import os
import sys
import tarfile
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import numpy as np

from .captions import CAPTION_KEYS, IMAGE_EXTENSIONS
from ._shard_io import (TIMEOUT_S, ShardMembers, ShardReadError, count_samples, is_remote, open_shard,
                        problem_text, require_webdataset)
from .samples import RawSample

# Shard member names of an image: the image file extensions of the caption reader, without the dot.
IMAGE_MEMBERS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
SIZES_FILE = "sizes.json"
PATTERN_FORMS = ("a .tar path, a brace pattern (data-{0000..0099}.tar), a list {a,b}, a folder of .tar files, "
                 "an http(s) URL or pipe:COMMAND")
logger = logging.getLogger("clipforge.data")
_WARNED_ENDS: set[str] = set()  # shards whose end was found wrong in this process (warned once)


def _expand_one(pattern: str) -> list[str]:
    """The shards one pattern names; ValueError for an empty pattern or braces that name no range or list."""
    if not pattern.strip():
        raise ValueError(f"an empty shard pattern {pattern!r}; expected {PATTERN_FORMS}")
    if not is_remote(pattern) and Path(pattern).is_dir():
        paths = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not paths:
            raise FileNotFoundError(f"no .tar shards in folder {pattern}")
        return paths
    try:
        urls = require_webdataset().shardlists.expand_urls(pattern)
    except ValueError:  # braceexpand's UnbalancedBracesError
        raise ValueError(f"shard pattern {pattern}: unbalanced braces; expected {PATTERN_FORMS}") from None
    # braceexpand keeps braces it cannot read ({0000..}, {0..0x}) as text: no such file or URL exists
    odd = next((u for u in urls if not u.startswith("pipe:") and ("{" in u or "}" in u)
                and (is_remote(u) or not Path(u).exists())), None)
    if odd is not None:
        raise ValueError(f"shard pattern {pattern}: braces that are neither a range ({{0000..0099}}, both ends "
                         f"numbers or letters) nor a list ({{a,b}}), kept as text in {odd}; expected {PATTERN_FORMS}")
    return urls


def expand_shards(urls: str | os.PathLike | list) -> list[str]:
    """Shard paths or URLs from a brace pattern, a folder of ``*.tar`` files or a list of either.

    Raises FileNotFoundError when the pattern matches no file or some of the local files it names
    are missing (a partly copied dataset would silently change the epoch).
    """
    patterns = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else [str(urls)]
    paths = [path for pattern in patterns for path in _expand_one(pattern)]
    local = [p for p in paths if not is_remote(p)]
    missing = [p for p in local if not Path(p).is_file()]
    if local and len(missing) == len(local):
        hint = " (wildcards are not expanded: name the shards with a brace range or give their folder)" \
            if any(c in missing[0] for c in "*?[") else ""
        raise FileNotFoundError(f"shard pattern {urls} matches no files (first expected: {missing[0]}){hint}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards of {urls} are missing, e.g. {missing[0]}")
    return paths


def _read_sizes(path: Path) -> dict:
    """A ``sizes.json``: ``{shard file name: sample count}``; one line naming it when malformed."""
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected {{\"shard.tar\": sample count, ...}} "
                         "(delete it to count the samples instead)") from None
    return _checked_sizes(sizes, path)


def _checked_sizes(sizes, path) -> dict:
    """``sizes`` (a parsed sizes.json at ``path``) when it maps names to counts, else one line naming it."""
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0] \
        if isinstance(sizes, dict) else None
    if bad is None or bad:
        what = f"entry {bad[0]!r} is not a sample count" if bad else f"holds a {type(sizes).__name__}"
        raise ValueError(f"{path}: {what}; expected {{\"shard.tar\": sample count, ...}} "
                         "(delete it to count the samples instead)")
    return sizes


def _shard_file(url: str) -> str:
    """The file ``url`` reads: for ``pipe:`` its command's first ``*.tar`` word (where a sizes.json may sit)."""
    words = [w.strip("'\"") for w in url[len("pipe:"):].split()] if url.startswith("pipe:") else [url]
    return next((w for w in words if w.endswith(".tar")), url)


def _sizes_beside(url: str) -> dict:
    """The ``sizes.json`` in the folder of ``url`` ({} when there is none or it cannot be read)."""
    if (url := _shard_file(url)).startswith("pipe:"):
        return {}
    if is_remote(url):
        try:
            sizes_url = url.rsplit("/", 1)[0] + "/" + SIZES_FILE
            with urllib.request.urlopen(sizes_url, timeout=TIMEOUT_S) as response:
                sizes = json.loads(response.read())
        except (OSError, ValueError, http.client.HTTPException):  # none there (or an error page): count
            return {}
        return _checked_sizes(sizes, sizes_url)
    sizes_path = Path(url).parent / SIZES_FILE
    return _read_sizes(sizes_path) if sizes_path.is_file() else {}


def _folder(url: str) -> str:
    return (url := _shard_file(url)).rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def _name(url: str) -> str:
    return (url := _shard_file(url)).rsplit("/", 1)[-1] if is_remote(url) else Path(url).name


def shard_sizes(paths: list[str], progress: bool = True) -> list[int]:
    """Sample count of each shard: from ``sizes.json`` beside it when listed, else counted.

    Counting reads every unlisted shard (remote and ``pipe:`` ones in full), so a progress bar on
    stderr shows it (at once for remote shards, after two seconds for local ones) with a line
    saying that a ``sizes.json`` avoids it. Raises ValueError naming a shard that cannot be counted.
    """
    from tqdm import tqdm

    listed = {_folder(p): _sizes_beside(p) for p in {_folder(p): p for p in paths}.values()}
    known = [listed[_folder(p)].get(_name(p)) for p in paths]
    unlisted = [p for p, n in zip(paths, known) if n is None]
    remote = sum(is_remote(p) for p in unlisted)
    show = progress and bool(unlisted) and os.environ.get("RANK", "0") == "0"  # one process of a job speaks
    if show and remote:
        print(f"counting the samples of {len(unlisted)} shards not listed in a {SIZES_FILE} beside them "
              f"({remote} streamed in full); a {SIZES_FILE} ({{\"shard.tar\": samples, ...}}, as `clipforge shards` "
              "writes) avoids this", file=sys.stderr, flush=True)
    counted = {}
    with tqdm(unlisted, desc=f"counting shard samples (no {SIZES_FILE})", unit="shard", file=sys.stderr,
              disable=not show, delay=0 if remote else 2, dynamic_ncols=True) as bar:
        for path in bar:
            try:
                counted[path] = count_samples(path)
            except ShardReadError as err:
                raise err.at_start(f"read at start-up to count its samples: no {SIZES_FILE} lists it") from None
    return [int(n) if n is not None else counted[p] for p, n in zip(paths, known)]


def iter_shard_samples(url: str):
    """Yield webdataset sample dicts (``__key__``, ``__url__`` plus one entry per extension) from one
    shard, in file order. Read errors, and a shard that ends without its end-of-archive block (cut
    short), raise ShardReadError naming it, after the samples read before the damage."""
    group_by_keys = require_webdataset().tariterators.group_by_keys
    with open_shard(url) as stream:  # read errors become a ShardReadError naming the shard
        members = ShardMembers(stream, url)
        yield from group_by_keys(members)
        members.check_end()


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


def _check_weights(weights: list, sources: list[str], several: bool, resampled: bool) -> list[float]:
    """``weights`` as floats; ValueError naming data.weights unless one finite weight >= 0 per source."""
    if not several:
        raise ValueError(f"data.weights mixes several sources, so it needs data.sources (a list of shard "
                         f"patterns, one weight each); got {len(weights)} weights for the single pattern {sources[0]}")
    if len(weights) != len(sources):
        raise ValueError(f"data.weights has {len(weights)} values for {len(sources)} sources; give one per source")
    try:
        numbers = [math.nan if isinstance(w, bool) else float(w) for w in weights]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if not all(math.isfinite(w) and w >= 0 for w in numbers) or not sum(numbers) > 0:
        raise ValueError(f"data.weights must be finite numbers >= 0 with a positive sum, got {list(weights)}")
    if not resampled:
        raise ValueError("data.weights needs data.resampled=true (weighted mixing draws shards with replacement)")
    return numbers


def _shard_weights(weights: list | None, sources: list[str], per_source: list[list[str]],
                   sizes: np.ndarray) -> np.ndarray:
    """(S,) probability of drawing each shard so that source i gives ``weights[i] / sum(weights)``
    of the samples: ``weights[i] / samples of source i`` for each of its shards. Within a source
    every shard is alike, so each of its samples is drawn as often, whatever its shard's size.
    Unweighted: every shard alike (each source in proportion to its samples)."""
    if not weights:
        return np.full(len(sizes), 1 / len(sizes))
    bounds = np.cumsum([0] + [len(paths) for paths in per_source])
    per_shard = []
    for weight, source, start, stop in zip(weights, sources, bounds[:-1], bounds[1:]):
        source_samples = int(sizes[start:stop].sum())
        if source_samples == 0 and weight > 0:
            raise ValueError(f"data.weights gives source {source} the weight {weight}, but its shards hold no samples")
        per_shard.append(np.full(stop - start, weight / source_samples if weight > 0 else 0.0))
    shard_weights = np.concatenate(per_shard)
    return shard_weights / shard_weights.sum()


class ShardDataset:
    """Image-caption samples in WebDataset tar shards, read sequentially.

    Raises, before any training work, FileNotFoundError when shards are missing and ValueError
    when one cannot be read, they hold no samples, or the first sample has no image or no caption
    (shards packed for another task). Later bad samples and shards are skipped and counted.
    """

    sequential = True  # read in order: the loader shuffles shard order and within blocks

    def __init__(self, urls: str | os.PathLike | list, caption_key: str | None = None, *,
                 weights: list[float] | None = None, resampled: bool = False):
        self.urls, self.resampled = urls, resampled
        sources = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else [str(urls)]
        if not sources:
            raise ValueError(f"no shard patterns given; expected {PATTERN_FORMS} (or a list of them)")
        if weights:
            weights = _check_weights(weights, sources, isinstance(urls, (list, tuple)), resampled)
        per_source = [expand_shards(source) for source in sources]
        self.paths = [path for paths in per_source for path in paths]
        repeated, times = collections.Counter(self.paths).most_common(1)[0]
        if times > 1:  # an epoch would read its samples that many times, and weights would not hold
            raise ValueError(f"shard {repeated} is named {times} times by {urls}; name each shard once "
                             "(to draw a source more often, give data.weights with data.resampled=true)")
        self.shard_weights = None  # resampled: probability of drawing each shard
        self.caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
        self.sizes = np.array(shard_sizes(self.paths), dtype=np.int64)
        if self.sizes.sum() == 0:
            raise ValueError(f"shards {urls} hold no samples")
        if resampled:
            self.shard_weights = _shard_weights(weights, sources, per_source, self.sizes)
        self._check_first_sample()

    def _check_first_sample(self) -> None:
        """Shards made for another task (no captions, no images), or a first one unreadable or
        emptier than ``sizes.json`` says, fail here, not mid-run."""
        path = self.paths[shard := int(np.flatnonzero(self.sizes)[0])]
        try:
            with closing(iter_shard_samples(path)) as samples:  # closed: a pipe ends, a connection closes
                sample = next(samples)
        except ShardReadError as err:
            raise err.at_start("its first sample is read at start-up to check the shards") from None
        except StopIteration:
            raise ValueError(f"shard {path}: holds no samples, but the {SIZES_FILE} beside it lists "
                             f"{self.sizes[shard]}; expected them (fix or delete the {SIZES_FILE})") from None
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
        """This epoch's order: shards permuted by (seed, epoch), or, resampled, as many shards drawn
        with replacement (by ``shard_weights``); samples in file order within each."""
        rng = np.random.default_rng([seed, epoch])
        if self.resampled:
            return ShardEpoch(self, rng.choice(len(self.paths), size=len(self.paths), p=self.shard_weights))
        return ShardEpoch(self, rng.permutation(len(self.paths)))


class ShardEpoch:
    """One epoch of a ShardDataset: epoch position -> (shard, offset), read forward with one open shard."""

    def __init__(self, dataset: ShardDataset, order: np.ndarray):
        self.dataset = dataset
        self.order = order  # (S,) shard index at each place of this epoch's shard sequence
        self.starts = np.concatenate([[0], np.cumsum(dataset.sizes[order])])  # (S+1,) first position of each
        self._reader = None  # (shard index, next offset, sample iterator): continues the last read

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}  # an open file does not travel to workers

    def __len__(self) -> int:
        """Samples in this epoch (resampled epochs differ in length)."""
        return int(self.starts[-1])

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
            self._reader = (shard, 0, iter_shard_samples(path))
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
            reason = (f"shard {path} ends early: it holds fewer samples than {SIZES_FILE} lists"
                      if isinstance(err, StopIteration) else f"unreadable {err}" if isinstance(err, ShardReadError)
                      else f"unreadable shard {path}: {problem_text(err)}")
            raws += [RawSample(key=f"{name}:#{offset + i}", image=None, captions=[], error=reason)
                     for i in range(len(raws), count)]
            self._reader = None
            return raws
        if position == self.dataset.sizes[shard]:  # its last sample: nothing may follow it unread
            self._reader = None
            _check_nothing_follows(path, samples_iter, position)
            return raws
        self._reader = (shard, position, samples_iter)
        return raws


def _check_nothing_follows(path: str, samples, listed: int) -> None:
    """Warn, once per shard and process, when shard ``path`` goes on after the ``listed`` samples an
    epoch takes from it (a stale sizes.json) or ends damaged: samples otherwise left out unseen."""
    problem = None
    try:
        if next(samples, None) is not None:
            problem = (f"holds more than the {listed} samples its {SIZES_FILE} lists (or start-up counted); the "
                       f"ones after are never read (fix or delete the {SIZES_FILE})")
        samples.close()  # a pipe's exit status can only come now
    except (OSError, tarfile.TarError, ValueError) as err:
        problem = problem or f"after its {listed} samples: " + (
            err.problem if isinstance(err, ShardReadError) else problem_text(err))
    if problem and path not in _WARNED_ENDS:
        _WARNED_ENDS.add(path)
        logger.warning("shard %s %s", path, problem)
