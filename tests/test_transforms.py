"""Preprocessing equals OpenAI's / open_clip's torchvision pipelines on real images of many modes.

The reference tensors in tests/fixtures/transforms were made by make_fixtures.py in a side venv with
torchvision + open_clip; these tests need neither (the live test at the end is skipped without
torchvision). Resampling is PIL's, so the comparison is exact (1e-6) under the Pillow named in
fixtures/transforms/versions.json. Other Pillow releases resample a little differently: under
Pillow 11.3 and 12.0 the 40x600 strip differs by up to 0.07 (a few 8-bit levels after
normalisation) while clipforge still equals open_clip exactly on the same Pillow, so there the
bound is a few levels, which still catches any wrong size, crop, interpolation or normalisation.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from clipforge.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    center_crop,
    image_transform,
    load_image,
    random_resized_crop_box,
)

FIXTURES = Path(__file__).parent / "fixtures" / "transforms"
IMAGES = FIXTURES / "images"
REFERENCE = np.load(FIXTURES / "reference.npz")
CROP_BOXES = json.loads((FIXTURES / "crop_boxes.json").read_text())
RATIO = (3 / 4, 4 / 3)


def keys(kind: str) -> list[str]:
    return sorted(key for key in REFERENCE.files if key.startswith(kind + "/"))


# OpenAI's normalisation, written out here (clip/clip.py, _transform) rather than read from clipforge.
PUBLISHED_MEAN = (0.48145466, 0.4578275, 0.40821073)
PUBLISHED_STD = (0.26862954, 0.26130258, 0.27577711)
FIXTURE_PILLOW = json.loads((FIXTURES / "versions.json").read_text())["pillow"]
# Exact under the fixtures' Pillow; else 6 levels of 255 over the smallest std (0.261): 0.09.
TOLERANCE = 1e-6 if PIL.__version__ == FIXTURE_PILLOW else 6 / 255 / 0.261


def assert_matches(actual: torch.Tensor, key: str) -> None:
    expected = torch.from_numpy(REFERENCE[key])
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, key
    max_diff = (actual - expected).abs().max().item()
    assert max_diff <= TOLERANCE, f"{key}: max abs diff {max_diff:.3g} (Pillow {PIL.__version__}, fixtures {FIXTURE_PILLOW})"


def test_fixtures_cover_every_mode_the_issue_names():
    images = [load_image(path) for path in IMAGES.iterdir()]
    assert {"RGB", "RGBA", "LA", "L", "1", "P", "I;16", "I", "F", "CMYK"} <= {image.mode for image in images}
    assert sum(image.mode == "P" and "transparency" in image.info for image in images) >= 2
    assert load_image(IMAGES / "hopper_exif_rotated.jpg").getexif().get(0x0112) == 6
    assert len(keys("eval")) >= 50


@pytest.mark.parametrize("key", keys("eval"))
def test_eval_transform_matches_reference(key):
    _, name, size = key.split("/")
    transform = image_transform(int(size))
    assert_matches(transform(load_image(IMAGES / name)), key)


@pytest.mark.parametrize("key", keys("pad"))
def test_center_crop_pads_small_images_like_torchvision(key):
    _, name, size = key.split("/")
    cropped = center_crop(load_image(IMAGES / name), int(size))
    assert cropped.size == (int(size), int(size))
    pixels = torch.from_numpy(np.array(cropped.convert("RGB"))).permute(2, 0, 1).float() / 255  # (3, S, S)
    mean, std = torch.tensor(PUBLISHED_MEAN).view(3, 1, 1), torch.tensor(PUBLISHED_STD).view(3, 1, 1)
    assert_matches((pixels - mean) / std, key)


def test_normalisation_is_openais_on_its_own():
    """Independent of the fixtures' Pillow: the constants are OpenAI's, and un-normalising the eval
    output with them gives back 8-bit pixel levels exactly (any other mean or std would not)."""
    assert OPENAI_MEAN == PUBLISHED_MEAN and OPENAI_STD == PUBLISHED_STD
    mean, std = torch.tensor(PUBLISHED_MEAN).view(3, 1, 1), torch.tensor(PUBLISHED_STD).view(3, 1, 1)
    for name in ("hopper.jpg", "hopper_rgba.png", "hopper_224x224.png"):
        output = image_transform(64)(load_image(IMAGES / name))  # (3, 64, 64)
        levels = (output * std + mean) * 255
        assert (levels - levels.round()).abs().max() < 1e-3, name
        assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3, name
    imagenet_mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    wrong = (output * std + imagenet_mean) * 255  # what the check sees if the mean were ImageNet's
    assert (wrong - wrong.round()).abs().max() > 0.1


@pytest.mark.parametrize("key", keys("train"))
def test_train_transform_matches_open_clip_given_the_same_torch_seed(key):
    _, name, size, seed = key.split("/")
    transform = image_transform(int(size), train=True)
    torch.manual_seed(int(seed))
    assert_matches(transform(load_image(IMAGES / name)), key)


def test_crop_sampling_matches_torchvision_with_global_seed_and_with_generator():
    for case in CROP_BOXES:
        width, height = case["size"]
        torch.manual_seed(case["seed"])
        assert list(random_resized_crop_box(width, height, case["scale"], RATIO)) == case["box"], case
        generator = torch.Generator().manual_seed(case["seed"])
        assert list(random_resized_crop_box(width, height, case["scale"], RATIO, generator)) == case["box"]


def test_train_crops_stay_inside_the_image_with_area_and_ratio_in_range():
    generator = torch.Generator().manual_seed(0)
    width, height = 512, 600
    for _ in range(500):
        box = random_resized_crop_box(width, height, (0.9, 1.0), RATIO, generator)
        top, left, crop_height, crop_width = box
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        assert 0.88 <= crop_width * crop_height / (width * height) <= 1.0
        assert 3 / 4 - 0.02 <= crop_width / crop_height <= 4 / 3 + 0.02
    # An image far outside the ratio range falls back to the largest central crop with a valid ratio.
    top_of_central_crop = (1000 - 27) // 2
    assert random_resized_crop_box(20, 1000, (0.9, 1.0), RATIO, generator) == (top_of_central_crop, 0, 27, 20)


def test_train_transform_is_deterministic_with_a_generator_and_ignores_the_global_rng():
    image = load_image(IMAGES / "hopper.jpg")
    first = image_transform(48, train=True, scale=(0.08, 1.0), generator=torch.Generator().manual_seed(7))
    second = image_transform(48, train=True, scale=(0.08, 1.0), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    a = [first(image) for _ in range(3)]
    torch.manual_seed(2)
    b = [second(image) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # successive draws differ


@pytest.mark.parametrize("name", sorted(p.name for p in IMAGES.iterdir()))
def test_train_transform_gives_a_normalised_square_for_every_image(name):
    transform = image_transform(32, train=True, generator=torch.Generator().manual_seed(0))
    output = transform(load_image(IMAGES / name))
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    low = (0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    high = (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert (output.amin(dim=(1, 2)) >= low - 1e-6).all() and (output.amax(dim=(1, 2)) <= high + 1e-6).all()


def test_transform_accepts_a_path_and_survives_pickling_for_dataloader_workers():
    transform = pickle.loads(pickle.dumps(image_transform(64, train=True, generator=torch.Generator())))
    assert transform(IMAGES / "hopper.jpg").shape == (3, 64, 64)
    assert_matches(image_transform(64)(str(IMAGES / "hopper_p.png")), "eval/hopper_p.png/64")
    with Image.open(IMAGES / "hopper_la.png") as lazily_decoded:
        assert_matches(image_transform(64)(lazily_decoded), "eval/hopper_la.png/64")


def test_load_image_decodes_fully_and_can_apply_exif_orientation():
    image = load_image(IMAGES / "hopper_exif_rotated.jpg")
    assert image.size == (171, 200)  # as stored: the reference ignores EXIF orientation
    assert load_image(IMAGES / "hopper_exif_rotated.jpg", exif_transpose=True).size == (200, 171)
    assert_matches(image_transform(64)(image), "eval/hopper_exif_rotated.jpg/64")


def test_files_that_are_not_images_raise_one_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((IMAGES / "hopper.jpg").read_bytes()[:5000])
    for path in (text, empty, truncated):
        with pytest.raises(ValueError, match=f"{path.name}: not a readable image"):
            load_image(path)
        with pytest.raises(ValueError, match=f"{path.name}: not a readable image"):
            image_transform(64)(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_inputs_that_are_not_images_raise_a_clear_error():
    transform = image_transform(64)
    with pytest.raises(TypeError, match="expected a PIL.Image.Image or an image path, got ndarray"):
        transform(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="got Tensor"):
        transform(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="no pixels"):
        transform(Image.new("RGB", (0, 10)))


def test_horizontal_flip_mirrors_the_crop_with_its_probability():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}  # the crop is the whole image: only the flip varies
    plain = image_transform(40, train=True, **full)(image)
    mirrored = image_transform(40, train=True, hflip=1.0, **full)(image)
    assert torch.equal(mirrored, plain.flip(-1))
    assert torch.equal(image_transform(40, train=True, hflip=0.0, **full)(image), plain)
    half = image_transform(40, train=True, hflip=0.5, generator=torch.Generator().manual_seed(3), **full)
    outputs = [half(image) for _ in range(400)]
    flips = sum(torch.equal(out, mirrored) for out in outputs)
    assert 160 < flips < 240  # about half (binomial sd 10)
    assert flips + sum(torch.equal(out, plain) for out in outputs) == 400  # the others are untouched
    assert torch.equal(image_transform(40, **full)(image), image_transform(40, hflip=1.0, **full)(image))  # eval: never


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 224.0}, "image_size"),
        ({"image_size": 224, "mean": (0.5, 0.5)}, "mean must have 3"),
        ({"image_size": 224, "std": (0.5, 0.0, 0.5)}, "std values must be positive"),
        ({"image_size": 224, "scale": (1.0, 0.5)}, "scale"),
        ({"image_size": 224, "ratio": (0.0, 1.0)}, "ratio"),
        ({"image_size": 224, "hflip": 1.5}, "hflip must be a probability"),
    ],
)
def test_bad_arguments_are_refused_when_the_transform_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        image_transform(**kwargs)


def test_live_equals_torchvision_on_every_image_at_odd_sizes():
    """Only where torchvision is installed (not in clipforge's own venv)."""
    transforms = pytest.importorskip("torchvision.transforms")
    bicubic = transforms.InterpolationMode.BICUBIC
    for size in (17, 50, 97, 336):
        reference = transforms.Compose([
            transforms.Resize(size, interpolation=bicubic),
            transforms.CenterCrop(size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ])
        train_reference = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ])
        ours, ours_train = image_transform(size), image_transform(size, train=True, scale=(0.08, 1.0))
        for path in sorted(IMAGES.iterdir()):
            image = load_image(path)
            assert torch.equal(ours(image), reference(image)), (path.name, size)
            torch.manual_seed(size)
            expected = train_reference(image)
            torch.manual_seed(size)
            assert torch.equal(ours_train(image), expected), (path.name, size)
            padded = np.array(transforms.CenterCrop(size)(image).convert("RGB"))
            ours_padded = np.array(center_crop(image, size).convert("RGB"))
            assert np.array_equal(ours_padded, padded), (path.name, size)
