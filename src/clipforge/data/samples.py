"""One raw image-text sample as a source reads it, and the checks that turn it into (image, caption).

Sources (caption files, tar shards) only read bytes; deciding whether a sample is usable happens
here, in one place, so every format skips the same things for the same reasons.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class RawSample:
    """A sample before decoding.

    ``key`` names the sample in logs (``images/cat.jpg`` or ``data-000003.tar:00000017``).
    ``image`` is the encoded file's bytes, or None when it could not be read (``error`` says why).
    ``captions`` holds one or more captions; several means one is drawn per epoch.
    """

    key: str
    image: bytes | None
    captions: list[str]
    error: str | None = None


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason shown in the log."""


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, fully loaded.

    ``draft_size`` (training only): a JPEG at least twice that size on both sides is decoded at a
    reduced DCT scale (PIL's draft mode: 1/2, 1/4 or 1/8) that still leaves both sides at least
    ``draft_size``, which is several times faster for photos far larger than the model's input.
    Raises BadSample for anything PIL cannot decode completely: non-image bytes, truncated
    files, decompression bombs. ``load()`` forces the whole file to be read, so truncation is
    caught here rather than inside the augmentation.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft_size and image.format == "JPEG" and min(image.size) >= 2 * draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise BadSample("not an image in a format PIL reads") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad files
        raise BadSample(f"cannot decode image: {type(err).__name__}: {err}") from None


def choose_caption(captions: list[str], seed: int, epoch: int, position: int) -> str:
    """Pick the caption used this epoch: the only one, or one drawn from (seed, epoch, position).

    Raises BadSample when there is no non-empty caption.
    """
    usable = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not usable:
        raise BadSample("no caption")
    if len(usable) == 1:
        return usable[0]
    rng = np.random.default_rng([seed, epoch, position])
    return usable[int(rng.integers(len(usable)))]


def to_pair(raw: RawSample, seed: int, epoch: int, position: int,
            draft_size: int | None = None) -> tuple[Image.Image, str]:
    """Check and decode a raw sample: returns (RGB image, caption) or raises BadSample."""
    if raw.error is not None:
        raise BadSample(raw.error)
    if raw.image is None:
        raise BadSample("no image")
    caption = choose_caption(raw.captions, seed, epoch, position)
    return decode_image(raw.image, draft_size), caption
