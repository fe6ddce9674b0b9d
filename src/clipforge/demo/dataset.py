"""Build the offline demo dataset: real images with human-written text, a held-out split, and a
zero-shot evaluation set in a style never seen in training.

``prepare_demo_data(cache_dir)`` installs the sources (see ``demo_sources``), reads their names and
captions (``demo_records``), renders every image to a small RGB PNG on white, and writes::

    <data_dir>/images/<source>/<key>.png        every rendered image (train, held-out and eval)
    <data_dir>/train.jsonl                      one {"image": path, "caption": [captions]} row per image
    <data_dir>/heldout.jsonl                    held-out {"image": path, "caption": text} pairs, for retrieval
    <data_dir>/eval/fluent3d/<class name>/*.png Fluent 3D emoji, one sub-folder per class
    <data_dir>/eval/fluent3d_classnames.txt     the class names, sorted like the sub-folders
    <data_dir>/manifest.json                    counts, options, each source's licence; written last

It is cached and idempotent: a complete dataset with the same options is returned at once. An
interrupted run resumes: images are written to a temporary name then renamed, and each source has a
done-marker, so a second call renders only what is missing. The training sources are Noto, Twemoji
and OpenMoji emoji, Tux Paint stamps and Open Clip Art; Fluent emoji are only ever written under
``eval/``. SVG sources (OpenMoji) are rasterised by librsvg's ``rsvg-convert``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..files import write_text_atomic
from ..runtime import log_progress as _log
from . import records as demo_records
from .records import DemoRecord
from .sources import (PACKAGES, SOURCES, DemoSourceError, default_cache_dir, install_commands, install_sources,
                      missing_packages, package_dir, packages_for)

FORMAT_VERSION = 3  # bump when the layout or the selection rules change: old caches are rebuilt
TRAIN_SOURCES = ("noto", "twemoji", "tuxpaint", "openclipart", "openmoji")
EMOJI_SOURCES = ("noto", "twemoji", "openmoji", "fluent3d")  # one image per emoji, named by its CLDR name
EVAL_SOURCE = "fluent3d"
# Emoji groups whose names are concrete things ("red apple", "bicycle"): the zero-shot classes.
EVAL_GROUPS = ("animals & nature", "food & drink", "travel & places", "activities", "objects")
# A few Open Clip Art PNGs are posters of 10,000 x 16,000 pixels; decoding one takes seconds and GBs.
MAX_SOURCE_PIXELS = 4096 * 4096
# SVGs are rasterised at this side (at least 4x the output), then cropped and resized like the PNGs.
SVG_RENDER_SIDE = 256
TEMPORARY_SUFFIX = ".tmp.png"  # an image being written; renamed to <key>.png when complete


@dataclass
class DemoDataConfig:
    image_size: int = 64  # side of the square RGB PNGs; emoji packages ship 64 px images
    eval_classes: int = 200  # Fluent 3D classes in the zero-shot set (at most the ~790 eligible)
    heldout_fraction: float = 0.08  # share of non-eval groups kept out of training, for retrieval
    openclipart_max: int = 1200  # cap on Open Clip Art drawings (the rest of the set is noisier)
    max_per_source: int | None = None  # cap on items per source, for quick tests; None: all
    seed: int = 0  # drives every random choice (selection, split); same seed, same dataset


# ``clipforge demo --quick`` (and ``--prepare-only --quick``): a slice of every source, in its own folder.
QUICK_DATA = DemoDataConfig(max_per_source=60, openclipart_max=60, eval_classes=20, heldout_fraction=0.2)


@dataclass
class DemoDataset:
    root: Path  # the data folder
    train_captions: Path  # JSONL, one {"image": path, "caption": [captions]} row per training image
    heldout_captions: Path  # JSONL, one {"image": path, "caption": text} row per held-out pair
    eval_dir: Path  # image folder (one sub-folder per class) of Fluent 3D emoji
    classnames: list[str]  # the eval classes, sorted like the sub-folders
    counts: dict  # images, pairs and classes per split and per source
    manifest: dict = field(repr=False)  # everything written to manifest.json


def default_data_dir(cache_dir: str | os.PathLike, config: DemoDataConfig) -> Path:
    """``<cache_dir>/data-<size>px``: a folder per image size, so changing the size never mixes files."""
    return Path(cache_dir) / f"data-{config.image_size}px"


def demo_data_plan(quick: bool = False, data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None, data_config: DemoDataConfig | None = None
                   ) -> tuple[Path, DemoDataConfig, Path]:
    """``(cache_dir, data_config, data_dir)`` the demo prepares and trains on: the whole set in
    ``<cache>/data-64px``, or with ``quick`` its slice in ``<cache>/data-64px-quick``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_config = data_config or (QUICK_DATA if quick else DemoDataConfig())
    if data_dir is None:
        data_dir = default_data_dir(cache_dir, data_config)
        if quick:
            data_dir = data_dir.with_name(f"{data_dir.name}-quick")
    return cache_dir, data_config, Path(data_dir)


def prepare_demo_data(cache_dir: str | os.PathLike, config: DemoDataConfig | None = None,
                      data_dir: str | os.PathLike | None = None, install: bool = True,
                      progress: bool = True) -> DemoDataset:
    """Install the sources if needed, build the demo dataset (or resume it) and return where it is.

    ``install=False`` never runs a package manager and raises ``DemoSourceError`` naming the
    command to run when a source is missing.
    """
    config = config or DemoDataConfig()
    _check_config(config)
    root = Path(data_dir) if data_dir is not None else default_data_dir(cache_dir, config)
    fingerprint = _fingerprint(config)
    if _read_json(root / "manifest.json").get("fingerprint") == fingerprint:
        done = load_demo_dataset(root)
        _log(progress, f"demo data: ready in {root} ({_summary(done.counts)})")
        return done
    _check_image_size(root, config)
    started = time.perf_counter()
    sources = [*TRAIN_SOURCES, EVAL_SOURCE]
    if install:
        install_sources(cache_dir, sources, progress)
    elif missing := missing_packages(cache_dir, sources):
        raise DemoSourceError(f"demo packages {missing} are not installed; run: "
                              f"{' && '.join(install_commands(missing, cache_dir))}")
    _log(progress, f"demo data: reading names and captions from {len(sources)} sources")
    records = read_records(Path(cache_dir), config)
    train, heldout, evaluation = split_records(records, config)
    unreadable = {}
    for source in sources:
        todo = [r for r in train + heldout + evaluation if r.source == source]
        unreadable[source] = _render_source(root, source, todo, config, fingerprint, progress)
    counts = _write_outputs(root, train, heldout, evaluation)
    for source, numbers in counts["per_source"].items():
        _log(progress, f"demo data: {source:<12} {numbers['train_images']:>5} training, "
                       f"{numbers['heldout_images']:>4} held-out images")
    manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "config": dataclasses.asdict(config),
                "files": {"train": "train.jsonl", "heldout": "heldout.jsonl", "eval": "eval/fluent3d",
                          "eval_classnames": "eval/fluent3d_classnames.txt"},
                "caption_format": "JSONL; image paths relative to the file; train: one row per image with a "
                                  "list of captions; heldout: one row per (image, caption) pair",
                "counts": counts, "sources": _source_notes(), "eval_classes": sorted({r.label for r in evaluation}),
                "unreadable": unreadable,
                "prepare_seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(root / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    dataset = load_demo_dataset(root)
    _log(progress, f"demo data: ready in {root} ({_summary(counts)}) after {manifest['prepare_seconds']} s")
    return dataset


def load_demo_dataset(data_dir: str | os.PathLike) -> DemoDataset:
    """The dataset a finished ``prepare_demo_data`` wrote to ``data_dir`` (read from its manifest)."""
    root = Path(data_dir)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {root} is not a prepared demo dataset")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    files = manifest["files"]
    return DemoDataset(root, root / files["train"], root / files["heldout"], root / files["eval"],
                       manifest["eval_classes"], manifest["counts"], manifest)


# ------------------------------------------------------------------------------- selection, split
def read_records(cache_dir: Path, config: DemoDataConfig) -> dict[str, list[DemoRecord]]:
    """Every usable record of each source, capped as the config says, keyed by source name."""
    names = demo_records.emoji_names(cache_dir)
    records = {source: demo_records.emoji_records(source, cache_dir, names) for source in EMOJI_SOURCES}
    records["tuxpaint"] = demo_records.tuxpaint_records(package_dir("tuxpaint-stamps-default", cache_dir))
    records["openclipart"] = _ranked(demo_records.openclipart_records(
        package_dir("openclipart-png", cache_dir), package_dir("openclipart-svg", cache_dir)),
        config.seed)[:config.openclipart_max]
    if config.max_per_source is not None:
        # Cap emoji by concept, so both styles (and the Fluent render) of a kept emoji stay together.
        kept_emoji = {r.group for r in _ranked(records["noto"], config.seed)[:config.max_per_source]}
        for source in records:
            pool = records[source]
            records[source] = ([r for r in pool if r.group in kept_emoji] if source in EMOJI_SOURCES
                               else _ranked(pool, config.seed)[:config.max_per_source])
    return records


def split_records(records: dict[str, list[DemoRecord]], config: DemoDataConfig
                  ) -> tuple[list[DemoRecord], list[DemoRecord], list[DemoRecord]]:
    """(train, held-out, eval). Eval classes are emoji with a Fluent render whose name is in training;
    held-out groups never reach training, and keep one image each so retrieval answers are unique."""
    evaluation = sorted(_ranked(_eligible_for_eval(records), config.seed)[:config.eval_classes], key=lambda r: r.label)
    eval_groups = {r.group for r in evaluation}
    train, heldout, heldout_groups = [], [], set()
    for source in TRAIN_SOURCES:
        for record in records[source]:
            if record.group in eval_groups or _unit(config.seed, "heldout", record.group) >= config.heldout_fraction:
                train.append(record)
            elif record.group not in heldout_groups and _heldout_style(config.seed, record):
                heldout_groups.add(record.group)
                heldout.append(record)
    seen_captions: set[str] = set()
    unique_heldout = []
    for record in heldout:  # a caption shared by two held-out images would make retrieval ambiguous
        captions = [c for c in record.captions if c.lower() not in seen_captions]
        seen_captions.update(c.lower() for c in captions)
        if captions:
            unique_heldout.append(dataclasses.replace(record, captions=captions))
    heldout = unique_heldout
    if any(r.source == EVAL_SOURCE for r in train + heldout):
        raise AssertionError("a Fluent emoji reached the training or held-out data")
    return train, heldout, evaluation


def validation_records(records: dict[str, list[DemoRecord]], config: DemoDataConfig, count: int = 300
                       ) -> list[DemoRecord]:
    """Fluent 3D records for choosing prompts without the eval set: the next ``count`` eligible classes
    after the eval ones, each with its other styles in training, none an eval class."""
    train, _, evaluation = split_records(records, config)
    train_groups, eval_labels = {r.group for r in train}, {r.label for r in evaluation}
    eligible = _ranked(_eligible_for_eval(records), config.seed)
    return [r for r in eligible if r.group in train_groups and r.label not in eval_labels][:count]


def _eligible_for_eval(records: dict[str, list[DemoRecord]]) -> list[DemoRecord]:
    """Fluent 3D emoji of the eval groups whose name both trained emoji styles share."""
    train_labels = {r.label for r in records["noto"]} & {r.label for r in records["twemoji"]}
    return [r for r in records[EVAL_SOURCE]
            if r.category in EVAL_GROUPS and r.label in train_labels and _is_folder_safe(r.label)]


def _ranked(records: list[DemoRecord], seed: int) -> list[DemoRecord]:
    """Records in a seeded pseudo-random order that does not depend on which others are present."""
    return sorted(records, key=lambda r: _unit(seed, "rank", r.source + ":" + r.key))


def _unit(seed: int, purpose: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a key (unlike hash(), equal across processes)."""
    digest = hashlib.sha1(f"{seed}:{purpose}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _heldout_style(seed: int, record: DemoRecord) -> bool:
    """A held-out emoji keeps one of its two styles, chosen at random: half Noto, half Twemoji."""
    if record.source not in ("noto", "twemoji"):
        return True
    return (record.source == "noto") == (_unit(seed, "style", record.group) < 0.5)


def _is_folder_safe(label: str) -> bool:
    return all(ch.isalnum() or ch in " -'’" for ch in label) and label == label.strip()


# ------------------------------------------------------------------------------------- rendering
def render_square(path: Path, size: int) -> Image.Image:
    """The image cropped to its visible content, composited on white and centred in a size x size RGB square."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # raised, then skipped by the caller
        opened = Image.open(_rasterise_svg(path, size) if path.suffix.lower() == ".svg" else path)
    with opened:
        if opened.width * opened.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{path} is {opened.width} x {opened.height} pixels, over the "
                             f"{MAX_SOURCE_PIXELS}-pixel limit for a source image")
        rgba = opened.convert("RGBA")  # palette images with a transparent colour become real alpha
    content = rgba.getchannel("A").point(lambda alpha: 255 if alpha > 8 else 0).getbbox()
    if content is None:
        raise ValueError(f"{path} is fully transparent")
    rgba = rgba.crop(content)
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)  # composite before resizing, so edges blend into white, not black
    inner = size - 2 * max(1, size // 32)  # a thin white margin all round
    scale = inner / max(flat.size)
    new_size = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
    resized = flat.convert("RGB").resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def _rasterise_svg(path: Path, size: int) -> io.BytesIO:
    """An SVG drawn by librsvg's ``rsvg-convert`` as PNG bytes with alpha, aspect ratio kept."""
    side = str(max(SVG_RENDER_SIDE, 4 * size))
    renderer = PACKAGES["librsvg2-bin"].probe
    try:
        done = subprocess.run([renderer, "--width", side, "--height", side, "--keep-aspect-ratio", str(path)],
                              capture_output=True, timeout=120)
    except FileNotFoundError:
        raise DemoSourceError(f"{renderer} is missing: it renders {path}; run: "
                              f"{install_commands(['librsvg2-bin'], '.')[0]}") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ValueError(f"rsvg-convert could not render it ({why[-1] if why else f'exit {done.returncode}'})")
    return io.BytesIO(done.stdout)


def _render_source(root: Path, source: str, records: list[DemoRecord], config: DemoDataConfig,
                   fingerprint: str, progress: bool) -> list[str]:
    """Render one source's images that are not on disk yet; returns the unreadable ones ("path: why")."""
    marker = root / "images" / f".done-{source}"
    folder = root / "images" / source
    folder.mkdir(parents=True, exist_ok=True)
    done = _read_json(marker)
    if done.get("fingerprint") == fingerprint:
        return done["unreadable"]
    for leftover in folder.glob(f"*{TEMPORARY_SUFFIX}"):  # half-written by a build that was killed
        leftover.unlink(missing_ok=True)
    unreadable = []
    for record in tqdm(records, desc=f"demo data: {source}", unit="img", disable=not progress, leave=False):
        target = folder / f"{record.key}.png"
        if target.is_file() and target.stat().st_size > 0:  # an empty file: lost in a crash, rendered again
            continue
        try:
            image = render_square(record.path, config.image_size)
        except (OSError, ValueError, subprocess.TimeoutExpired, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as err:
            # A broken or oversized file in a package must not stop the demo.
            unreadable.append(f"{record.path}: {err}")
            continue
        temporary = target.with_suffix(TEMPORARY_SUFFIX)
        image.save(temporary, optimize=True)
        os.replace(temporary, target)
    if unreadable:
        _log(progress, f"demo data: {len(unreadable)} unreadable {source} image(s) skipped, e.g. {unreadable[0]}")
    write_text_atomic(marker, json.dumps({"fingerprint": fingerprint, "unreadable": unreadable}, indent=1))
    return unreadable


# --------------------------------------------------------------------------------------- outputs
def _write_outputs(root: Path, train: list[DemoRecord], heldout: list[DemoRecord],
                   evaluation: list[DemoRecord]) -> dict:
    """Write the caption files and the eval folder; returns the counts for the manifest."""
    def rendered(records: list[DemoRecord]) -> list[DemoRecord]:
        return [r for r in records if (root / "images" / r.source / f"{r.key}.png").is_file()]

    train, heldout, evaluation = rendered(train), rendered(heldout), rendered(evaluation)
    # Training: one row per image with all its captions (the loader draws one per epoch, so an image
    # never meets itself as a negative). Retrieval: one row per pair, as evaluation readers expect.
    train_rows = [{"image": f"images/{r.source}/{r.key}.png", "caption": r.captions} for r in train]
    heldout_rows = [{"image": f"images/{r.source}/{r.key}.png", "caption": c} for r in heldout for c in r.captions]
    for name, rows in (("train.jsonl", train_rows), ("heldout.jsonl", heldout_rows)):
        write_text_atomic(root / name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    # The eval folder is rebuilt whole (it is small) so a changed class list leaves no stale folders.
    eval_dir, building = root / "eval" / EVAL_SOURCE, root / "eval" / f".{EVAL_SOURCE}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    for record in evaluation:
        (building / record.label).mkdir(parents=True, exist_ok=True)
        rendered_file = root / "images" / EVAL_SOURCE / f"{record.key}.png"
        shutil.copyfile(rendered_file, building / record.label / rendered_file.name)
    shutil.rmtree(eval_dir, ignore_errors=True)
    os.replace(building, eval_dir)
    classnames = sorted({r.label for r in evaluation})
    train_text = "\n".join(c.lower() for r in train for c in r.captions)
    unnamed = [name for name in classnames if name.lower() not in train_text]
    if unnamed:  # the zero-shot set must test a new style, not new words
        raise AssertionError(f"eval classes {unnamed[:5]} never occur in a training caption")
    write_text_atomic(root / "eval" / f"{EVAL_SOURCE}_classnames.txt", "\n".join(classnames) + "\n")
    per_source = {s: {"train_images": sum(r.source == s for r in train),
                      "heldout_images": sum(r.source == s for r in heldout)} for s in TRAIN_SOURCES}
    return {"train_images": len(train), "train_pairs": sum(len(r.captions) for r in train),
            "heldout_images": len(heldout), "heldout_pairs": sum(len(r.captions) for r in heldout),
            "eval_images": len(evaluation), "eval_classes": len(classnames), "per_source": per_source}


def _source_notes() -> dict:
    """Each source's role, packages, versions and licences, for the manifest."""
    notes = {}
    for name, source in SOURCES.items():
        notes[name] = {"role": source.role, "description": source.description,
                       "packages": [{"manager": PACKAGES[p].manager, "name": p, "version": PACKAGES[p].version,
                                     "licence": PACKAGES[p].licence, "url": PACKAGES[p].url}
                                    for p in packages_for([name])]}
    return notes


def _fingerprint(config: DemoDataConfig) -> str:
    versions = {p.name: p.version for p in PACKAGES.values()}
    blob = json.dumps([FORMAT_VERSION, dataclasses.asdict(config), versions], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _check_config(config: DemoDataConfig) -> None:
    if not 16 <= config.image_size <= 512:
        raise ValueError(f"DemoDataConfig.image_size={config.image_size}: expected 16..512 pixels")
    if config.eval_classes < 1:
        raise ValueError(f"DemoDataConfig.eval_classes={config.eval_classes}: expected at least 1")
    if not 0.0 <= config.heldout_fraction < 1.0:
        raise ValueError(f"DemoDataConfig.heldout_fraction={config.heldout_fraction}: expected 0 <= f < 1")
    if config.max_per_source is not None and config.max_per_source < 1:
        raise ValueError(f"DemoDataConfig.max_per_source={config.max_per_source}: expected None or >= 1")


def _check_image_size(root: Path, config: DemoDataConfig) -> None:
    """Refuse to mix image sizes in one folder: files already rendered would be reused at the wrong size.
    The first readable image decides: a half-written or empty file (a killed build) is rendered again."""
    for rendered in (root / "images").glob("*/*.png"):
        if rendered.name.endswith(TEMPORARY_SUFFIX):
            continue
        try:
            with Image.open(rendered) as image:
                size = image.size
        except OSError:  # empty (a crash): not evidence of a size
            continue
        if size != (config.image_size, config.image_size):
            raise ValueError(f"{root} holds {size[0]} px images but image_size={config.image_size}; "
                             f"choose another data folder or delete {root / 'images'}")
        return


def _read_json(path: Path) -> dict:
    """A JSON object from a file written by this module; {} when missing or from an older layout."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _summary(counts: dict) -> str:
    return (f"{counts['train_images']} training images / {counts['train_pairs']} pairs, "
            f"{counts['heldout_images']} held-out images, {counts['eval_images']} eval images "
            f"in {counts['eval_classes']} classes")

