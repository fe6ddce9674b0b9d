"""Tiny models, CLIP-like inputs and comparisons shared by the checkpoint tests."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import clipforge
from clipforge import CLIP


FIXTURES = Path(__file__).parent / "fixtures"
HF_TOLERANCE = 1e-5  # max abs difference to transformers' outputs, fp32 CPU


def tiny_model(name: str = "tiny-vit", seed: int = 0) -> CLIP:
    """A randomly initialised preset in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    return clipforge.create_model(name).eval()


def sample_inputs(model: CLIP, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (2, 3, H, W), tokens (3, context))`` shaped like tokenizer output: start, ids, end, zeros."""
    generator = torch.Generator().manual_seed(seed)
    size, text = model.config.vision.image_size, model.config.text
    images = torch.randn(2, 3, size, size, generator=generator)
    tokens = torch.zeros(3, text.context_length, dtype=torch.long)
    for row, length in enumerate((3, 9, 1)):
        body = torch.randint(1, text.vocab_size - 2, (length,), generator=generator)
        tokens[row, : length + 2] = torch.cat([torch.tensor([text.vocab_size - 2]), body,
                                               torch.tensor([text.vocab_size - 1])])
    return images, tokens


@torch.no_grad()
def embeddings(model: CLIP, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_embeddings, text_embeddings)`` in fp32."""
    images, tokens = inputs
    return model.encode_image(images).float(), model.encode_text(tokens).float()


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal in shape, dtype and value."""
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def assert_matches_transformers(model: CLIP, variant: str) -> None:
    """``model`` gives the embeddings and logits ``transformers.CLIPModel`` gave for fixture ``variant``."""
    io = load_file(FIXTURES / f"{variant}_io.safetensors")
    with torch.no_grad():
        image_features = model.encode_image(io["pixel_values"])
        text_features = model.encode_text(io["input_ids"])
        logits_per_image, _ = model(io["pixel_values"], io["input_ids"])
    assert (image_features - io["image_features"]).abs().max() <= HF_TOLERANCE
    assert (text_features - io["text_features"]).abs().max() <= HF_TOLERANCE
    assert (logits_per_image - io["logits_per_image"]).abs().max() <= 10 * HF_TOLERANCE  # scaled by exp(logit_scale)
