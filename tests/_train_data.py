"""Small real image-caption sets for the training tests: drawn shapes saved as JPEG and PNG files.

Each image is a coloured shape (circle, square or triangle) on a light background, drawn with PIL
at a position and size that vary per sample, and captioned with its colour and shape, so a tiny
model can learn to match them within a few dozen steps.
"""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, index: int, size: int = 64) -> Image.Image:
    """An RGB ``size`` x ``size`` image of one ``colour`` ``shape``, placed by ``index``."""
    image = Image.new("RGB", (size, size), (240 - index % 5 * 6, 238, 232))
    draw = ImageDraw.Draw(image)
    extent = size // 3 + index % 4 * 3
    left, top = 4 + index * 7 % (size - extent - 8), 4 + index * 11 % (size - extent - 8)
    box = (left, top, left + extent, top + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left, top + extent), (left + extent, top + extent), (left + extent // 2, top)], fill=fill)
    return image


def make_shapes(root: Path, count: int, size: int = 64) -> Path:
    """``count`` shape images under ``root/images`` (JPEG and PNG alternating) with ``root/captions.csv``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[i // len(COLOURS) % len(SHAPES)]
        name = f"shape_{i:03d}.{'png' if i % 2 else 'jpg'}"
        draw_shape(colour, shape, i, size).save(images / name, quality=95)
        rows.append((f"images/{name}", f"a {colour} {shape}"))
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return captions
