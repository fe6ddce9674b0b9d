"""Thumbnails of indexed images: made with PIL on first request, kept in a bounded in-memory LRU."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

THUMB_SIZE = 256  # longer side, pixels
CACHE_BYTES = 64 * 1024 * 1024


def make_thumbnail(path: Path, size: int = THUMB_SIZE) -> bytes | None:
    """JPEG bytes of ``path`` shrunk to fit ``size`` x ``size`` (transparency over white), or None."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                background = Image.new("RGB", image.size, "white")
                background.paste(image, mask=image.getchannel("A"))
                image = background
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=85)
            return out.getvalue()
    except Exception:  # unreadable, truncated, not an image: no thumbnail
        return None


def image_media_type(path: Path) -> str | None:
    """The MIME type of the image format PIL reads in ``path`` (None when it is not an image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return Image.MIME.get(image.format or "")
    except Exception:
        return None


class ThumbnailCache:
    """Thread-safe LRU of thumbnail bytes keyed by (collection, id), bounded by total bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key, path: Path) -> bytes | None:
        """The cached thumbnail of ``key``, made from ``path`` when missing (None: not decodable)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = make_thumbnail(path)
        if data is None:
            return None
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data
