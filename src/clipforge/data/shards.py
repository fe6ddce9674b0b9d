"""Pack a folder of images plus a caption file into WebDataset tar shards.

Each sample becomes ``KEY.<ext>`` (the image file's bytes, not re-encoded), ``KEY.txt`` (the caption,
when there is one) and ``KEY.json`` (``{"image": original path, "caption": caption or list}``), with
``KEY`` the row number (``00000017``): dot-free, so webdataset groups the members correctly, and
mappable back to the caption file. Rows are shuffled by default, because the loader reads shards
in runs and a shard written in caption-file order (often sorted by source) would give batches of
near-duplicates. A ``sizes.json`` with each shard's sample count is written beside the shards.

Each image is decoded once as the loader would decode it (:func:`.samples.decode_image`), so a
corrupt or truncated file is left out, logged and counted instead of packed (``check_images=False``
packs without decoding); rows whose file cannot be read are left out and counted too.
"""
from __future__ import annotations

import json
import logging
import os
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


def _encode(dataset: CaptionDataset, row: int, check_image: bool) -> dict | str | None:
    """The webdataset sample dict for one row; None (logged) when its image cannot be read, or
    ``"corrupt"`` (logged) when ``check_image`` and it does not decode."""
    raw = dataset.read(row)
    if raw.image is None:
        logger.warning("left out %s: %s", raw.key, raw.error)
        return None
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


def _remove_partial(out: Path, prefix: str, written: list[str], writer) -> None:
    """Remove the shards of a failed run: the open temporary one and those already renamed."""
    if writer is not None:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the disk is full or the stream broken: it is deleted anyway
            pass
    for path in [*written, *out.glob(f"{prefix}-*.tar.tmp")]:
        Path(path).unlink(missing_ok=True)


def write_shards(caption_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                 image_root: str | os.PathLike | None = None, max_count: int = 10000, max_size_mb: float = 1000.0,
                 prefix: str = "data", shuffle: bool = True, seed: int = 0, image_key: str | None = None,
                 caption_key: str | None = None, overwrite: bool = False,
                 check_images: bool = True) -> ShardsWritten:
    """Pack the rows of ``caption_file`` (images under ``image_root``) into tar shards in ``out_dir``.

    A shard closes at ``max_count`` samples or before its file would exceed ``max_size_mb``
    megabytes (10**6 bytes; a single larger sample gets a shard of its own). Shards are named
    ``{prefix}-000000.tar`` upwards; each is written to a temporary name and renamed when complete.
    Raises FileExistsError when ``out_dir`` already holds ``{prefix}-*.tar`` files, unless
    ``overwrite`` (then they are removed first, so no stale shard joins the new set).
    ``check_images`` decodes every image first and leaves out the ones that do not decode.
    """
    if max_count < 1 or max_size_mb <= 0:
        raise ValueError(f"max_count must be >= 1 and max_size_mb > 0, got {max_count} and {max_size_mb}")
    dataset = CaptionDataset(caption_file, image_root, image_key=image_key, caption_key=caption_key)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; expected a folder to write the shards into")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"{prefix}-*.tar"))
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds {len(stale)} {prefix}-*.tar shards; remove them or pass overwrite")
    for path in stale:
        path.unlink()
    if stale:
        (out / SIZES_FILE).unlink(missing_ok=True)  # it described the shards just removed
    rows = np.random.default_rng(seed).permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    max_bytes = int(max_size_mb * 1e6)

    paths: list[str] = []
    sizes: dict[str, int] = {}
    writer, count, members_bytes, skipped, corrupt = None, 0, 0, 0, 0  # open shard, its samples and bytes

    def close_shard():
        writer.close()
        final = out / f"{prefix}-{len(paths):06d}.tar"
        normal_permissions(final.with_suffix(".tar.tmp"))
        os.replace(final.with_suffix(".tar.tmp"), final)
        paths.append(str(final))
        sizes[final.name] = count

    try:
        for row in rows:
            sample = _encode(dataset, int(row), check_images)
            if sample is None or sample == "corrupt":
                skipped += 1
                corrupt += sample is not None
                continue
            sample_bytes = sum(_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")
            if writer is not None and (count >= max_count or _tar_file_bytes(members_bytes + sample_bytes) > max_bytes):
                close_shard()
                writer = None
            if writer is None:
                # An integer mtime keeps members to one 512-byte header (a float one adds a PAX header)
                # and makes the shards byte-for-byte reproducible.
                writer = require_webdataset().TarWriter(str(out / f"{prefix}-{len(paths):06d}.tar.tmp"), encoder=False, mtime=0)
                count = 0
            writer.write(sample)
            count, members_bytes = count + 1, writer.tarstream.offset  # bytes of members written so far
        if writer is not None:
            close_shard()
        if paths:
            write_text_atomic(out / SIZES_FILE, json.dumps(sizes, indent=0) + "\n")
    except BaseException as err:  # a full disk, an interrupt: no partial shard, no incomplete set
        _remove_partial(out, prefix, paths, writer)
        if is_disk_full(err):
            raise DiskFullError(f"no space left on the device writing shards into {out}; "
                                "no shard was kept") from None
        raise
    if not paths:
        raise ValueError(f"no image of {caption_file} could be read under {dataset.image_root}; no shards written")
    pattern = paths[0] if len(paths) == 1 else str(out / f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar")
    num_bytes = sum(os.path.getsize(p) for p in paths)
    return ShardsWritten(paths, pattern, sum(sizes.values()), skipped, num_bytes, corrupt)
