"""Images read in place from local, uncompressed tar shards: each image member's byte range is
indexed once from the headers, then read by offset. An image's path is ``<shard>#<member>``
(:func:`member_path`, the one place that form is made; ``clipforge embed`` names shard samples so too).

Used by CLIP_benchmark's webdataset sets (``protocols/clip_benchmark_wds.py``) and by
``clipforge overlap`` for a training collection in shards.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator

IMAGE_SUFFIXES = ("webp", "png", "jpg", "jpeg")
# Leading bytes of the compressions tarfile would undo on the fly; offsets into such a file are wrong.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class TarMemberImages:
    """``preprocess`` of images read by offset from tar shards; picklable for DataLoader workers."""

    def __init__(self, preprocess: Callable, locations: dict[str, tuple[int, int]], shards: list[str]):
        self.preprocess, self.locations = preprocess, locations
        self.shards = [(shard, os.stat(shard).st_size, os.stat(shard).st_mtime_ns) for shard in shards]

    def __call__(self, image):
        if isinstance(image, str) and image in self.locations:
            image = self.open(image)
        return self.preprocess(image)

    def open(self, member: str):
        """The PIL image of ``<shard>#<member>``; ValueError naming it when it is not a readable image."""
        from PIL import Image

        offset, size = self.locations[member]
        with open(member.rsplit("#", 1)[0], "rb") as file:
            file.seek(offset)
            data = file.read(size)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as error:
            raise ValueError(f"{member}: not a readable image ({type(error).__name__}: {error})") from error
        return image

    def __repr__(self) -> str:  # part of the feature-cache key: shard sizes and times catch edits
        return f"TarMemberImages({self.preprocess!r}, shards={self.shards})"


def shard_members(shard: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """``(archive, member)`` for each regular file of a local, plain tar shard, in order; ValueError
    naming the shard for a compressed, damaged or cut one (tarfile reads a file cut between two
    members as a shorter tar: its missing end-of-archive block shows it)."""
    with open(shard, "rb") as file:
        head = file.read(6)
    compression = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
    if compression:
        raise ValueError(f"{shard}: a {compression}-compressed tar; images are read by offset from plain tar "
                         f"shards, so decompress it first (e.g. {compression} -d < {shard.name} > plain.tar)")
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                if member.isfile():
                    yield archive, member
            end = archive.offset  # the byte after the last member
    except tarfile.TarError as error:
        raise ValueError(f"{shard}: not a readable tar file ({' '.join(str(error).split())})") from None
    with open(shard, "rb") as file:
        file.seek(end)
        if file.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ValueError(f"{shard}: damaged: no end-of-archive block after its last member (byte {end}); "
                             "the file was cut short or overwritten (download it again)")


def member_path(shard: str | os.PathLike, member: str) -> str:
    """The name of tar member ``member`` (its full name in the archive) of ``shard``: ``<shard>#<member>``,
    what overlap's and embed's outputs hold, and what ``tar -xf <shard> <member>`` extracts."""
    return f"{os.fspath(shard)}#{member}"


def split_member_path(path: str) -> tuple[str, str] | None:
    """``(shard, member)`` of a :func:`member_path` ``<shard>.tar#<member>``; None for a plain file path."""
    cut = path.find(".tar#")
    return None if cut < 0 else (path[:cut + 4], path[cut + 5:])


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, lower-case suffix)`` of a member name ``key.suffix``, or None without a suffix."""
    if "." not in Path(name).name:
        return None
    key, suffix = name.rsplit(".", 1)
    return key, suffix.lower()


def shard_images(shards: list[Path]) -> TarMemberImages:
    """Every image member of ``shards`` (``locations``: ``<shard>#<member>`` -> byte range, in order)
    behind an identity preprocess; wrap another with ``TarMemberImages(p, images.locations, ...)``."""
    locations = {}
    for shard in shards:
        for _, member in shard_members(shard):
            parts = split_member_name(member.name)
            if parts is not None and parts[1] in IMAGE_SUFFIXES:
                locations[member_path(shard, member.name)] = (member.offset_data, member.size)
    return TarMemberImages(_unchanged, locations, [str(shard) for shard in shards])


def _unchanged(image):
    return image
