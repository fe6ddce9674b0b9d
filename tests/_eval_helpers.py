"""Real image files and a model whose right answers are known, for the evaluation tests.

Images are crops of real photos that ship with matplotlib and scikit-learn, tinted strongly red,
green or blue and saved as JPEG or PNG. ``ColorCLIP`` embeds an image as its mean (normalised)
R, G, B and a text as the counts of the words "red", "green", "blue" in its tokens, so a tinted
image is nearest to the prompts naming its colour: any metric it yields can be computed by hand.
``RecordingBar`` stands in for tqdm, so a test can see which progress bars were shown and counted.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

COLORS = {"red": (230, 20, 20), "green": (20, 210, 30), "blue": (20, 30, 230)}


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    def package_file(package: str, *parts: str) -> Path:
        return Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts)

    files = [package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
             package_file("sklearn", "datasets", "images", "china.jpg")]
    return [np.array(Image.open(f).convert("RGB")) for f in files]


def write_tinted_image(path: Path, color: str, index: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    """A crop of a real photo blended 70% towards ``color``, saved by ``path``'s extension."""
    photo = _photos()[index % 2]
    top, left = (index * 37) % (photo.shape[0] - 100), (index * 53) % (photo.shape[1] - 100)
    crop = np.asarray(Image.fromarray(photo[top:top + 100, left:left + 100]).resize(size), dtype=np.float32)
    tinted = 0.3 * crop + 0.7 * np.array(COLORS[color], dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tinted.astype(np.uint8)).save(path)
    return path


def make_color_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    """``root/<class>/<i>.jpg|png`` with the image colours in ``layout[class]``."""
    for class_name, colors in layout.items():
        for i, color in enumerate(colors):
            write_tinted_image(root / class_name / f"{i}.{'jpg' if i % 2 else 'png'}", color, i)
    return root


class ColorCLIP(nn.Module):
    """A stand-in CLIP with known answers: 3-d embeddings, colour of image vs colour words of text."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        from clipforge.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
        self.register_buffer("color_ids", torch.tensor([tokenizer.encode(c)[0] for c in COLORS]))
        self.logit_scale = nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))
        self.context_length = 77
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=image_size))
        self.encoded_images = 0  # how many images went through encode_image (cache tests)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded_images += len(images)
        return images.float().mean(dim=(2, 3))  # (N, 3) mean normalised R, G, B

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = (tokens[:, :, None] == self.color_ids).sum(dim=1).float()  # (N, 3)
        return counts + 1e-3  # never a zero vector


class RecordingBar:
    """Stands in for tqdm: records each bar's ``desc``, ``disable`` and how far it counted."""

    made: list = []

    def __init__(self, *args, desc=None, disable=None, **kwargs):
        self.desc, self.disable, self.count = desc, disable, 0
        RecordingBar.made.append(self)

    def update(self, n=1):
        """Count ``n`` more steps."""
        self.count += n

    def set_postfix_str(self, *args, **kwargs):
        """Ignored: only the counts are checked."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
