"""JPEG draft decoding in the training loader: large JPEGs decode at a reduced scale that still
covers every random crop at the model's resolution; other files and small JPEGs decode in full."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.samples import decode_image
from clipforge.train.loop import draft_size
from clipforge.transforms import random_resized_crop_box

from _data_helpers import _photos


def _encoded(size, fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_photos()[1]).resize(size, Image.Resampling.BICUBIC).save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_a_reduced_scale_above_the_requested_size():
    data = _encoded((1280, 960))
    full, draft = decode_image(data), decode_image(data, draft_size=100)
    assert full.size == (1280, 960)
    assert min(draft.size) >= 100 and draft.size[0] <= 1280 // 4, draft.size
    # the same picture: both resized to 64 px agree to within JPEG's DCT-scaling error
    small = [np.asarray(im.resize((64, 48), Image.Resampling.BICUBIC), dtype=np.float32) for im in (full, draft)]
    assert np.abs(small[0] - small[1]).mean() < 4.0


@pytest.mark.parametrize("size, fmt", [((1280, 960), "PNG"), ((150, 120), "JPEG")])
def test_other_formats_and_small_jpegs_decode_in_full(size, fmt):
    assert decode_image(_encoded(size, fmt), draft_size=100).size == size


@pytest.mark.parametrize("image_size, min_area", [(224, 0.9), (64, 0.4), (224, 0.08)])
def test_draft_size_never_makes_a_crop_smaller_than_the_input(image_size, min_area):
    side = draft_size(image_size, min_area)
    generator = torch.Generator().manual_seed(0)
    for width, height in ((side, side), (side * 2, side), (side, side * 3 // 2)):
        for _ in range(200):
            _, _, crop_height, crop_width = random_resized_crop_box(width, height, (min_area, min_area),
                                                                    (3 / 4, 4 / 3), generator)
            assert min(crop_height, crop_width) >= image_size - 1  # rounding of the crop box
