"""Small real image-caption datasets for the data tests, written to a temporary folder.

Images are crops of real photos that ship with matplotlib and scikit-learn (Grace Hopper, a
Chinese temple, a flower), saved as JPEG, PNG and WebP files with PIL; broken samples are real
broken files (a truncated JPEG, text saved as .png, random bytes).
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    """Real photos as (H, W, 3) uint8 arrays, read from the packages' data folders (no import)."""
    def package_file(package: str, *parts: str) -> Path:
        return Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts)

    files = [package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
             package_file("sklearn", "datasets", "images", "china.jpg"),
             package_file("sklearn", "datasets", "images", "flower.jpg")]
    return [np.array(Image.open(f).convert("RGB")) for f in files]


def make_images(folder: Path, count: int, size: tuple[int, int] = (40, 32)) -> list[str]:
    """``count`` distinct small crops of real photos in ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    names = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = (i * 37) % (photo.shape[0] - 200), (i * 53) % (photo.shape[1] - 200)
        crop = Image.fromarray(photo[top:top + 200, left:left + 200]).resize(size, Image.Resampling.BILINEAR)
        extension = ("jpg", "png", "webp", "jpeg")[i % 4]
        name = f"img_{i:03d}.{extension}"
        crop.save(folder / name)
        names.append(name)
    return names


def write_bad_images(folder: Path) -> dict[str, str]:
    """Broken files of each kind the loader must skip; returns name -> what is wrong."""
    good = io.BytesIO()
    Image.fromarray(_photos()[0][:200, :200]).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return {"truncated.jpg": "truncated", "text.png": "text", "noise.jpg": "noise", "missing.jpg": "missing file"}


def write_caption_file(path: Path, rows: list[tuple[str, object]], image_column: str = "image",
                       caption_column: str = "caption") -> Path:
    """Write (image, caption) rows as CSV, TSV or JSONL by ``path``'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({image_column: i, caption_column: c}) + "\n" for i, c in rows))
        return path
    with open(path, "w", newline="") as f:
        if path.suffix == ".tsv":
            f.write(f"{image_column}\t{caption_column}\n" + "".join(f"{i}\t{c}\n" for i, c in rows))
        else:
            writer = csv.writer(f)
            writer.writerow([image_column, caption_column])
            writer.writerows(rows)
    return path


def make_pairs(root: Path, count: int, suffix: str = ".csv") -> tuple[Path, list[str]]:
    """A folder of ``count`` real images with a caption file; returns (caption file, image names)."""
    names = make_images(root / "images", count)
    rows = [(f"images/{n}", f"photo number {i}") for i, n in enumerate(names)]
    return write_caption_file(root / f"captions{suffix}", rows), [f"images/{n}" for n in names]


class StandInPreprocess:
    """Train-style augmentation stand-in: a random 16x16 crop of a 20x20 resize, drawn from torch's RNG."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image.resize((20, 20)))).permute(2, 0, 1).float() / 255  # (3, 20, 20)
        top, left = torch.randint(0, 5, (2,)).tolist()
        return pixels[:, top:top + 16, left:left + 16]  # (3, 16, 16)


def stand_in_tokenize(captions: list[str], length: int = 12) -> torch.Tensor:
    """Captions -> (n, length) int64 of their first bytes, zero padded."""
    tokens = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions):
        data = list(caption.encode("utf-8"))[:length]
        tokens[row, : len(data)] = torch.tensor(data)
    return tokens
