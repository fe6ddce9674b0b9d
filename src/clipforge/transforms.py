"""Image preprocessing for CLIP: OpenAI's eval pipeline and the random-resized-crop train pipeline.

Eval is OpenAI's ``preprocess``: resize the shortest side to S (bicubic), center-crop S x S,
convert to RGB, scale to [0, 1], normalise with OpenAI's mean/std. Train swaps resize + crop for a
random resized crop. Both make the same PIL calls, with the same size and offset rounding, as
torchvision does on PIL images, and the same float32 arithmetic, so the tensors equal torchvision's
bit for bit; tests/test_transforms.py checks that against stored fixtures. Resampling and mode
conversion stay in PIL (C code); PIL -> numpy -> torch does the rest, with no Python loop over pixels.

Like the reference, nothing here applies EXIF orientation unless asked (``load_image(...,
exif_transpose=True)``), and 16-bit/32-bit greyscale images go through PIL's own ``convert("RGB")``,
which clips values above 255.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Given a path, eval decodes a JPEG at 1/2, 1/4 or 1/8 scale while its sides stay at least this
# many times the model's input size (see ImageTransform)
DRAFT_MIN_SIDE = 4


def load_image(path: str | os.PathLike, exif_transpose: bool = False,
               min_side: int | None = None) -> Image.Image:
    """Open and fully decode an image file, so a broken file fails here and not mid-pipeline.

    Raises FileNotFoundError for a missing path and ValueError naming the path for anything PIL
    cannot decode (not an image, truncated, over twice ``PIL.Image.MAX_IMAGE_PIXELS``). An image
    over ``MAX_IMAGE_PIXELS`` itself gives one ``DecompressionBombWarning`` naming the file and
    its size, instead of PIL's. ``exif_transpose`` applies the EXIF orientation tag; the reference
    pipeline does not, so it is off by default.

    ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (PIL's ``draft``, done in the
    DCT: a 12,000 x 12,000 photo then needs 1/64 of the memory and time) as long as both its
    sides stay at least ``min_side``; other formats, and JPEGs too small to halve, decode as
    they are.
    """
    return _decode(path, exif_transpose, min_side)[0]


def _decode(path: str | os.PathLike, exif_transpose: bool,
            min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, and the image's (width, height) in the file, before any draft."""
    try:
        with open(path, "rb") as file, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(file)
            full_size = image.size
            if min_side is not None and image.format == "JPEG":
                image.draft(image.mode, (min_side, min_side))
            image.load()  # decode now, while the file is open
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: {error} Pillow refuses images over twice "
                         "PIL.Image.MAX_IMAGE_PIXELS; raise that limit if you trust the file") from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError...
        raise ValueError(f"{path}: not a readable image ({type(error).__name__}: {error})") from error
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            width, height = full_size
            scale = f", at 1/{width // image.width} scale" if image.width < width else ""
            warnings.warn(f"{path}: {width} x {height} image ({width * height:,} pixels) is over "
                          f"PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS:,}); decoding it "
                          f"anyway{scale}", Image.DecompressionBombWarning, stacklevel=2)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if exif_transpose:
        decoded_size = image.size
        image = ImageOps.exif_transpose(image)
        if image.size != decoded_size:  # rotated by a quarter turn
            full_size = full_size[::-1]
    return image, full_size


def resize_shortest_side(image: Image.Image, size: int,
                         full_size: tuple[int, int] | None = None) -> Image.Image:
    """Bicubic resize so the shorter side is ``size``; the longer side is truncated like torchvision's.

    ``full_size``: the (width, height) of the image in its file when ``image`` was decoded at a
    reduced scale (a JPEG draft, whose sides are rounded up): the output then has the size and
    framing of the full image's, resampled from the reduced pixels.
    """
    width, height = full_size or image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)  # (W, H)
    if full_size is None or full_size == image.size:
        if new_size == image.size:
            return image  # torchvision returns the image untouched
        return image.resize(new_size, Image.Resampling.BICUBIC)
    # a draft decodes at 1/scale with sides rounded up: the file's pixels span width / scale
    scale = next(scale for scale in (2, 4, 8, 16) if -(-width // scale) <= image.width)
    box = (0.0, 0.0, width / scale, height / scale)
    return image.resize(new_size, Image.Resampling.BICUBIC, box=box)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` box; sides shorter than ``size`` are padded with zeros.

    Offsets use Python's round() (half to even) as torchvision does; padding puts the odd pixel
    on the right/bottom. PIL's crop fills outside the image with zeros, as torchvision's pad does.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    # Either pad (negative offset: (size - side) // 2 on the left/top) or centre the crop.
    left = -((size - width) // 2) if size > width else int(round((width - size) / 2.0))
    top = -((size - height) // 2) if size > height else int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample (top, left, crop_height, crop_width) exactly as torchvision's RandomResizedCrop does.

    Ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, the largest central crop with the ratio clamped to ``ratio``. Draws from torch's
    global RNG unless ``generator`` is given, so the same seed gives torchvision's crops.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item()
            return top, left, crop_height, crop_width
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB conversion, /255 and (x - mean) / std in float32, in torchvision's order of operations."""
    rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8, a copy
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)
    return pixels.to(torch.float32).div(255).sub_(mean).div_(std)  # mean, std: (3, 1, 1)


class ImageTransform:
    """Callable PIL image (or image path) -> FloatTensor[3, S, S]; build it with image_transform().

    Given a path, the eval pipeline decodes a JPEG at 1/2, 1/4 or 1/8 scale (PIL's ``draft``)
    while both its sides stay at least ``DRAFT_MIN_SIDE`` (4) times ``image_size``, so only JPEGs
    at least 8x the input size on their shorter side are drafted (a 12,000 x 12,000 photo for a
    224 model: 1/8, 1500 x 1500, about 7 MB of pixels instead of 432 MB); the resize keeps the
    full image's output size and framing. The result is then close to, not equal to, the full
    decode's: on the JPEG fixtures of tests/test_transforms.py, forced to draft by small input
    sizes, the largest difference is 0.10 after normalisation (7/255 of a channel, on a 171 x 200
    CMYK image at 1/2), at most 0.057 (4/255) on the RGB photos, mean differences under 0.006.
    Everything else (other formats, smaller JPEGs, PIL images, the train pipeline) is decoded
    in full and is exactly OpenAI's pipeline.

    A plain class rather than a closure so DataLoader workers can pickle it. In the train pipeline
    leave ``generator`` None under a multi-worker DataLoader: torch seeds each worker's global RNG
    differently, whereas a generator would be copied into every worker and repeat the same crops.
    """

    def __init__(self, image_size, train, mean, std, scale, ratio, generator, hflip=0.0):
        self.image_size, self.train = image_size, train
        self.scale, self.ratio, self.generator = tuple(scale), tuple(ratio), generator
        self.hflip = float(hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)

    def __call__(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        full_size = None
        if isinstance(image, (str, os.PathLike)):
            # eval decodes big JPEGs at a reduced scale (see the class docstring)
            min_side = None if self.train else DRAFT_MIN_SIDE * self.image_size
            image, full_size = _decode(image, False, min_side)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image or an image path, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image has no pixels (size {image.width}x{image.height})")
        if self.train:
            top, left, crop_height, crop_width = random_resized_crop_box(
                image.width, image.height, self.scale, self.ratio, self.generator
            )
            image = image.crop((left, top, left + crop_width, top + crop_height))
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            if self.hflip > 0 and float(torch.rand((), generator=self.generator)) < self.hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(resize_shortest_side(image, self.image_size, full_size), self.image_size)
        return to_normalized_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        steps = (
            f"random_resized_crop({self.image_size}, scale={self.scale}, ratio={self.ratio}, bicubic)"
            + (f", horizontal_flip(p={self.hflip})" if self.hflip > 0 else "")
            if self.train
            else f"resize_shortest_side({self.image_size}, bicubic, jpeg_draft_min_side={DRAFT_MIN_SIDE * self.image_size}), "
            f"center_crop({self.image_size})"
        )
        mean, std = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        return f"ImageTransform({steps}, rgb, normalize(mean={mean}, std={std}))"


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
    hflip: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build CLIP preprocessing: PIL image -> normalised FloatTensor[3, image_size, image_size].

    ``train=False`` is OpenAI's eval pipeline (shortest-side bicubic resize, center crop).
    ``train=True`` is a random resized crop of area fraction in ``scale`` (open_clip's default
    (0.9, 1.0)) and aspect ratio in ``ratio``, resized bicubic, drawing from ``generator`` or
    torch's global RNG, then mirrored left-right with probability ``hflip`` (default 0, as CLIP).
    Both then convert to RGB and normalise with ``mean`` / ``std``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (R, G, B), got {values!r}")
    if any(value <= 0 for value in std):
        raise ValueError(f"std values must be positive, got {std!r}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    return ImageTransform(image_size, train, mean, std, scale, ratio, generator, hflip)
