"""Audit of issue 14's speed features on real images (the demo's emoji PNGs, upscaled to photo
sizes): JPEG draft decoding in the training loader, FLIP patch dropout at evaluation, in saved
checkpoints and across a resume, with gradient caching and multi-process loading."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.data.samples import decode_image
from clipforge.train.loop import draft_size
from clipforge.transforms import image_transform

DEMO = Path.home() / ".cache" / "clipforge" / "demo" / "data-64px"
pytestmark = pytest.mark.skipif(not (DEMO / "train.jsonl").exists(), reason="demo data not downloaded")


def _demo_lines(n: int) -> list[dict]:
    with open(DEMO / "train.jsonl") as file:
        return [json.loads(next(file)) for _ in range(n)]


def _big_photo(size=(2000, 1500), index: int = 4) -> Image.Image:
    """A real demo image, upscaled to a photo's size."""
    path = DEMO / _demo_lines(index + 1)[index]["image"]
    return Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return exif.tobytes()


@pytest.mark.parametrize("variant", ["rgb", "progressive", "grey", "cmyk", "exif-rotated"])
def test_training_draft_of_large_real_jpegs_covers_the_crop_and_keeps_the_picture(variant):
    photo = _big_photo()
    image, options = photo, {"quality": 92}
    if variant == "progressive":
        options["progressive"] = True
    elif variant == "grey":
        image = photo.convert("L")
    elif variant == "cmyk":
        image = photo.convert("CMYK")
    elif variant == "exif-rotated":
        options["exif"] = _rotated_exif()
    data = _encode(image, "JPEG", **options)
    side = draft_size(224, 0.9)  # 273 for the default crop scale
    full, draft = decode_image(data), decode_image(data, draft_size=side)
    assert full.mode == draft.mode == "RGB"
    assert full.size == (2000, 1500)  # no EXIF rotation in either path (as the reference)
    assert draft.size == (500, 375) and min(draft.size) >= side
    small = [np.asarray(im.resize((200, 150), Image.Resampling.BICUBIC), dtype=np.float32) for im in (full, draft)]
    difference = np.abs(small[0] - small[1])
    assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_training_draft_leaves_other_formats_bit_exact(fmt):
    data = _encode(_big_photo(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    full, draft = decode_image(data), decode_image(data, draft_size=100)
    assert draft.size == (2000, 1500)
    assert np.array_equal(np.asarray(full), np.asarray(draft))


def test_eval_transform_of_a_decoded_image_is_the_plain_pipeline(tmp_path):
    """A PIL image given to the eval transform is never drafted: the tensor equals the one made from
    PIL's own full decode, and the training loader's decode without draft is that decode too."""
    path = tmp_path / "big.jpg"
    _big_photo((2000, 2000)).save(path, quality=92)
    plain = Image.open(path).convert("RGB")
    for size in (64, 224):
        preprocess = image_transform(size)
        expected = preprocess(plain)
        assert torch.equal(preprocess(Image.open(path)), expected)
        assert torch.equal(preprocess(decode_image(path.read_bytes())), expected)
        # given the path, the eval transform drafts (documented in ImageTransform): close, not equal
        difference = (preprocess(path) - expected).abs()
        assert difference.max() < 0.06 and difference.mean() < 0.006, (difference.max(), difference.mean())


def test_patch_dropout_is_kept_in_the_checkpoint_but_never_used_by_inference(tmp_path):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit")
    model.set_patch_dropout(0.5)
    clipforge.save(model, tmp_path / "ckpt")
    loaded = clipforge.load_model(tmp_path / "ckpt")
    assert loaded.config.vision.patch_dropout == 0.5 and not loaded.training
    plain = clipforge.load_model(tmp_path / "ckpt")
    plain.set_patch_dropout(0.0)
    preprocess = image_transform(64)
    images = torch.stack([preprocess(Image.open(DEMO / line["image"])) for line in _demo_lines(6)])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), plain.eval().encode_image(images))
        loaded.train()
        assert not torch.equal(loaded.encode_image(images), plain.encode_image(images))  # training drops


def test_resume_with_patch_dropout_grad_cache_and_workers_is_bit_exact(tmp_path):
    listing = tmp_path / "train.jsonl"
    with open(listing, "w") as file:
        for line in _demo_lines(32):
            file.write(json.dumps({**line, "image": str(DEMO / line["image"])}) + "\n")
    from clipforge.train import TrainConfig, apply_overrides, train

    def settings(run_dir, *extra):
        return ["model.name=tiny-vit", "model.patch_dropout=0.5", "device=cpu", "batch_size=8", "steps=4",
                "chunk_size=4", "data.workers=2", "optim.warmup_steps=1", "run.progress=false",
                "run.checkpoint_every=2", "run.keep=0", f"run.run_dir={run_dir}", f"data.train={listing}", *extra]
    whole = train(apply_overrides(TrainConfig(), settings(tmp_path / "whole")))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")  # the run as it was after step 2
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000004")
    resumed = train(apply_overrides(TrainConfig(), settings(tmp_path / "split", "run.resume=latest")))
    assert resumed.losses == whole.losses[2:]  # bit for bit


def test_a_model_with_patch_dropout_still_names_its_preset():
    from clipforge.cli.eval_suite import _architecture_name

    model = clipforge.create_model("tiny-vit")
    model.set_patch_dropout(0.5)
    assert _architecture_name(model) == "tiny-vit"


def test_patch_dropout_with_a_locked_image_tower_is_refused():
    from clipforge.train import TrainConfig, apply_overrides
    from clipforge.train.config import validate

    with pytest.raises(ValueError, match="has no effect with model.lock_image"):
        validate(apply_overrides(TrainConfig(), ["model.lock_image=true", "model.patch_dropout=0.5"]))
