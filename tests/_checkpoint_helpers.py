"""Tiny models, CLIP-like inputs and comparisons shared by the checkpoint tests."""
from __future__ import annotations

import torch

import clipforge
from clipforge import CLIP


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
