"""Parse and check what a request sends: JSON bodies, counts, ids, base64 and uploaded images.

Every problem raises :class:`RequestError` with a 4xx status and one line naming the field and
what was expected; the service turns it into ``{"error": ...}``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re

MAX_BODY_BYTES = 10 * 1024 * 1024  # request bodies and uploads
MAX_K = 1000  # results per query, ids per /metadata call
MAX_TEXT_CHARS = 2000  # a caption query; the tokenizer truncates to the context length anyway
MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs before decoding
_DIGITS = re.compile(r"^[0-9]{1,18}$")


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def parse_json_object(body: bytes) -> dict:
    """The JSON object in ``body`` (any content type, as clip-retrieval's ClipClient sends none)."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RequestError(f"request body must be a JSON object, got {type(value).__name__}")
    return value


def parse_count(value, name: str, default: int, cap: int = MAX_K) -> int:
    """A positive integer from JSON or a query string, capped at ``cap``."""
    if value is None or value == "":
        return min(default, cap)
    if isinstance(value, str) and _DIGITS.match(value.strip()):
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{name} must be a positive integer, got {value!r}")
    return min(value, cap)


def parse_id(text: str) -> int:
    """A row id from a URL segment: ASCII digits only (no sign, no dots, no path)."""
    if not _DIGITS.match(text):
        raise RequestError(f"id must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def parse_flag(value, name: str, default: bool = False) -> bool:
    """A boolean from JSON (true/false) or a query string (1/0, true/false)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise RequestError(f"{name} must be true or false, got {value!r}")


def parse_modality(value, default: str = "image") -> str:
    """``image`` or ``text`` (which index to search, i.e. which kind of result)."""
    value = default if value in (None, "") else value
    if value not in ("image", "text"):
        raise RequestError(f"modality must be 'image' or 'text', got {value!r}")
    return value


def parse_text(value, name: str = "text") -> str:
    """A non-empty query string of at most MAX_TEXT_CHARS characters."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{name} must be a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise RequestError(f"{name} is {len(value)} characters; at most {MAX_TEXT_CHARS} are accepted")
    return value


def parse_embedding(value, dim: int):
    """A ``(dim,)`` float32 vector from a JSON list of finite numbers."""
    import numpy as np

    if not isinstance(value, list) or len(value) != dim:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise RequestError(f"embedding_input must be a list of {dim} numbers, got {got}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise RequestError("embedding_input must hold finite numbers only")
    return np.asarray(value, dtype=np.float32)


def decode_base64(value, name: str = "image") -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{name} must be a base64 string")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{name}: only base64 data URLs are accepted")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} is not valid base64") from None


def open_image(data: bytes, name: str = "image"):
    """A decoded RGB PIL image from ``data``, or RequestError for anything that is not one."""
    from PIL import Image

    if not data:
        raise RequestError(f"{name} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise RequestError(f"{name} is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} are accepted", 413)
        image.load()
        return image.convert("RGB")
    except RequestError:
        raise
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise RequestError(f"{name} is not a readable image ({type(error).__name__})") from None
