"""Pack a folder of images plus a caption file into WebDataset tar shards.

Each sample becomes ``KEY.<ext>`` (the image file's bytes, not re-encoded), ``KEY.txt`` (the caption,
when there is one) and ``KEY.json`` (``{"image": original path, "caption": caption or list}``), with
``KEY`` the row number (``00000017``): dot-free, so webdataset groups the members correctly, and
mappable back to the caption file. Rows are shuffled by default, because the loader reads shards
in runs and a shard written in caption-file order (often sorted by source) would give batches of
near-duplicates. A ``sizes.json`` with each shard's sample count is written beside the shards.

Each image is decoded once as the loader would decode it (:func:`.samples.decode_image`), so a
corrupt or truncated file is left out, logged and counted instead of packed (``check_images=False``
packs without decoding); rows whose file cannot be read, or with no caption but blanks, are left
out and counted too.

The shards are written into a hidden staging folder inside ``out_dir`` and moved into place, old
shards replaced and ``sizes.json`` last, only when the whole set is written: an interrupted or
failed run leaves the folder as it was (a killed one leaves its staging folder, removed by the
next run), so a training never reads half a set.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import DiskFullError, is_disk_full, normal_permissions, write_text_atomic
from .captions import CaptionDataset
from .samples import BadSample, decode_image
from .webdataset import IMAGE_MEMBERS, SIZES_FILE, require_webdataset

logger = logging.getLogger("clipforge.data")

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tar files are padded to whole records of 20 blocks


def _member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a ustar file: a header block plus padded data."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(members_bytes: int) -> int:
    """Final size of a tar file whose members take ``members_bytes``: two end blocks, record padding."""
    return -(-(members_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


@dataclass
class ShardsWritten:
    """What ``write_shards`` produced."""

    paths: list[str]    # shard files in order
    pattern: str        # brace pattern naming them all, for the loader
    num_samples: int    # samples written
    num_skipped: int    # rows left out because their image could not be read or decoded
    num_bytes: int      # total size of the shard files
    num_corrupt: int = 0  # of num_skipped: files read but not decodable as an image
    num_no_caption: int = 0  # of num_skipped: rows whose captions are all empty or blank


_STAGING = ".shards-staging-"  # + pid: the set being written


def _encode(dataset: CaptionDataset, row: int, check_image: bool) -> dict | str | None:
    """The webdataset sample dict for one row; None (logged) when its image cannot be read,
    ``"no caption"`` when its captions are all blank, or ``"corrupt"`` (logged) when
    ``check_image`` and it does not decode."""
    raw = dataset.read(row)
    if raw.image is None:
        logger.warning("left out %s: %s", raw.key, raw.error)
        return None
    captions = [caption for caption in raw.captions if caption.strip()]
    if not captions:
        logger.warning("left out %s: no caption", raw.key)
        return "no caption"
    raw.captions = captions
    if check_image:
        try:
            decode_image(raw.image)
        except BadSample as error:
            logger.warning("left out %s: %s", raw.key, error)
            return "corrupt"
    extension = Path(raw.key).suffix.lower().lstrip(".")
    extension = extension if extension in IMAGE_MEMBERS else "jpg"  # the loader decodes by content anyway
    sample = {"__key__": f"{row:08d}", extension: raw.image,
              "json": json.dumps({"image": raw.key, "caption": raw.captions[0] if len(raw.captions) == 1
                                  else raw.captions}).encode("utf-8")}
    if len(raw.captions) == 1:
        sample["txt"] = raw.captions[0].encode("utf-8")
    return sample


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of packers that died (their pid is gone)."""
    for folder in out.glob(f"{_STAGING}*"):
        pid = folder.name.removeprefix(_STAGING)
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True  # another user's live process
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def _move_into_place(staging: Path, out: Path, prefix: str, names: list[str]) -> None:
    """The finished set replaces the old one: old shards and sizes.json go, the new shards move in
    (renames within one folder), ``sizes.json`` last, so its presence marks a complete set."""
    (out / SIZES_FILE).unlink(missing_ok=True)
    for path in [*out.glob(f"{prefix}-*.tar"), *out.glob(f"{prefix}-*.tar.tmp")]:
        path.unlink()
    for name in names:
        os.replace(staging / name, out / name)
    os.replace(staging / SIZES_FILE, out / SIZES_FILE)


def write_shards(caption_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                 image_root: str | os.PathLike | None = None, max_count: int = 10000, max_size_mb: float = 1000.0,
                 prefix: str = "data", shuffle: bool = True, seed: int = 0, image_key: str | None = None,
                 caption_key: str | None = None, overwrite: bool = False,
                 check_images: bool = True) -> ShardsWritten:
    """Pack the rows of ``caption_file`` (images under ``image_root``) into tar shards in ``out_dir``.

    A shard closes at ``max_count`` samples or before its file would exceed ``max_size_mb``
    megabytes (10**6 bytes; a single larger sample gets a shard of its own). Shards are named
    ``{prefix}-000000.tar`` upwards, written into a staging folder and moved into ``out_dir``
    when the whole set is complete (module docstring). Raises FileExistsError when ``out_dir``
    already holds ``{prefix}-*.tar`` files, unless ``overwrite`` (then they are replaced by the new
    set once it is complete, so no stale shard joins it and a failure keeps them).
    ``check_images`` decodes every image first and leaves out the ones that do not decode.
    """
    if max_count < 1 or not (math.isfinite(max_size_mb) and max_size_mb > 0):
        raise ValueError(f"max_count must be >= 1 and max_size_mb a finite number > 0, got {max_count} "
                         f"and {max_size_mb}")
    dataset = CaptionDataset(caption_file, image_root, image_key=image_key, caption_key=caption_key)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; expected a folder to write the shards into")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"{prefix}-*.tar"))
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds {len(stale)} {prefix}-*.tar shards; remove them or pass overwrite")
    _remove_stale_staging(out)
    staging = out / f"{_STAGING}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    rows = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    max_bytes = int(max_size_mb * 1e6)

    names: list[str] = []
    sizes: dict[str, int] = {}
    writer, count, members_bytes = None, 0, 0  # open shard, its samples and bytes
    left_out = {"unreadable": 0, "corrupt": 0, "no caption": 0}

    def close_shard():
        writer.close()
        final = staging / f"{prefix}-{len(names):06d}.tar"
        normal_permissions(final.with_suffix(".tar.tmp"))
        os.replace(final.with_suffix(".tar.tmp"), final)
        names.append(final.name)
        sizes[final.name] = count

    try:
        for row in rows:
            sample = _encode(dataset, int(row), check_images)
            if not isinstance(sample, dict):
                left_out["unreadable" if sample is None else sample] += 1
                continue
            sample_bytes = sum(_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")
            if writer is not None and (count >= max_count or _tar_file_bytes(members_bytes + sample_bytes) > max_bytes):
                close_shard()
                writer = None
            if writer is None:
                # An integer mtime keeps members to one 512-byte header (a float one adds a PAX header)
                # and makes the shards byte-for-byte reproducible.
                writer = require_webdataset().TarWriter(str(staging / f"{prefix}-{len(names):06d}.tar.tmp"),
                                                        encoder=False, mtime=0)
                count = 0
            writer.write(sample)
            count, members_bytes = count + 1, writer.tarstream.offset  # bytes of members written so far
        if writer is not None:
            close_shard()
            writer = None
        if not names:
            raise ValueError(f"no image of {caption_file} with a caption could be read under {dataset.image_root}; "
                             "no shards written")
        write_text_atomic(staging / SIZES_FILE, json.dumps(sizes, indent=0) + "\n")
        _move_into_place(staging, out, prefix, names)
    except BaseException as err:  # a full disk, an interrupt: the folder keeps what it held
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the disk is full or the stream broken: it is deleted anyway
                pass
        if is_disk_full(err):
            raise DiskFullError(f"no space left on the device writing shards into {out}; "
                                "the folder keeps what it held") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = [str(out / name) for name in names]
    pattern = paths[0] if len(paths) == 1 else str(out / f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar")
    num_bytes = sum(os.path.getsize(p) for p in paths)
    return ShardsWritten(paths, pattern, sum(sizes.values()), sum(left_out.values()), num_bytes,
                         left_out["corrupt"], left_out["no caption"])
