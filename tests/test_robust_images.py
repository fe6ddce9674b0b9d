"""Large images: eval decodes big JPEGs at a reduced scale (PIL's draft) with the full image's
framing, stays exact everywhere else, and Pillow's decompression-bomb warning and error become
one message naming the file."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge import image_transform, load_image
from clipforge.transforms import DRAFT_MIN_SIDE, _decode

FIXTURES = Path(__file__).parent / "fixtures" / "transforms"
REFERENCE = np.load(FIXTURES / "reference.npz")
EVAL_KEYS = sorted(key for key in REFERENCE.files if key.startswith("eval/"))
# Measured on the fixtures (see ImageTransform's docstring): 0.10 at most after normalisation.
DRAFT_TOLERANCE = 0.11


def photo(path: Path, width: int, height: int, fmt: str = "JPEG") -> Path:
    """A smooth synthetic photo (gradients and a disc), saved as ``fmt``."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2) * 90
    pixels = np.stack([x * 255 // width, y * 255 // height, 80 + disc], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


@pytest.mark.parametrize("key", EVAL_KEYS)
def test_eval_from_a_path_is_exact_unless_drafted_and_close_when_drafted(key):
    _, name, size = key.split("/")
    path = FIXTURES / "images" / name
    expected = torch.from_numpy(REFERENCE[key])
    from_path = image_transform(int(size))(path)
    decoded, full_size = _decode(path, False, DRAFT_MIN_SIDE * int(size))
    if decoded.size == full_size:  # not drafted: the very same tensor as decoding in full
        assert torch.equal(from_path, image_transform(int(size))(load_image(path)))
    else:
        assert name.endswith(".jpg") and min(decoded.size) >= DRAFT_MIN_SIDE * int(size)
        assert from_path.shape == expected.shape
        assert (from_path - expected).abs().max().item() <= DRAFT_TOLERANCE


@pytest.mark.slow
def test_big_jpeg_is_decoded_at_reduced_scale_with_the_same_framing(tmp_path):
    path = photo(tmp_path / "big.jpg", 4000, 3000)
    decoded, full_size = _decode(path, False, DRAFT_MIN_SIDE * 224)
    assert full_size == (4000, 3000) and decoded.size == (2000, 1500)  # 1/2: 1/4 would be < 896
    transform = image_transform(224)
    drafted, full = transform(path), transform(load_image(path))
    assert drafted.shape == full.shape == (3, 224, 224)
    difference = (drafted - full).abs()
    assert difference.max().item() <= DRAFT_TOLERANCE and difference.mean().item() < 0.01
    assert load_image(path).size == (4000, 3000)  # load_image alone decodes in full
    assert load_image(path, min_side=100).size == (500, 375)  # ... unless asked


def test_draft_keeps_odd_sizes_framed_like_the_full_image(tmp_path):
    """Sides that do not divide by the scale are rounded up by the draft; the resize box must
    cut that back, or the crop shifts (a 2400 x 2812 image at 64 differed by 2.4 without it)."""
    path = photo(tmp_path / "odd.jpg", 2403, 2811)
    transform = image_transform(64)
    assert _decode(path, False, DRAFT_MIN_SIDE * 64)[0].size == (301, 352)
    assert (transform(path) - transform(load_image(path))).abs().max().item() <= DRAFT_TOLERANCE


def test_png_and_train_pipeline_are_never_drafted(tmp_path):
    path = photo(tmp_path / "big.png", 2000, 1800, "PNG")
    assert torch.equal(image_transform(32)(path), image_transform(32)(load_image(path)))
    jpeg = photo(tmp_path / "big.jpg", 2000, 1800)
    train = image_transform(32, train=True, generator=torch.Generator().manual_seed(0))
    again = image_transform(32, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train(jpeg), again(load_image(jpeg)))


def test_image_over_pillows_limit_gives_one_warning_naming_the_file(tmp_path, monkeypatch):
    path = photo(tmp_path / "large.jpg", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the limit, under 2x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
    assert image.size == (40, 40)
    assert len(caught) == 1 and issubclass(caught[0].category, Image.DecompressionBombWarning)
    message = str(caught[0].message)
    assert "\n" not in message and str(path) in message and "40 x 40" in message
    assert "MAX_IMAGE_PIXELS (1,000)" in message and "decompression bomb DOS" not in message


def test_image_over_twice_pillows_limit_is_a_one_line_error(tmp_path, monkeypatch):
    path = photo(tmp_path / "bomb.png", 50, 50, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2,500 pixels > 2 x 1,000
    with pytest.raises(ValueError) as raised:
        image_transform(16)(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "raise that limit if you trust the file" in message
