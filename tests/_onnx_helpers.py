"""Models for the ONNX export tests: a demo-sized CLIP with trained (not initial) weights."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import clipforge
from clipforge import CLIP


@functools.lru_cache(maxsize=1)  # trained once per test process; no test changes it
def trained_demo_model(steps: int = 12, seed: int = 0) -> CLIP:
    """``demo-vit`` after ``steps`` Adam steps of the contrastive loss on random pairs.

    Training moves the weights (and the logit scale) off their initial distribution, so parity is
    checked on activations like a real model's, not only on freshly initialised ones.
    """
    torch.manual_seed(seed)
    model = clipforge.create_model("demo-vit").train()
    size, text = model.config.vision.image_size, model.config.text
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    images = torch.randn(16, 3, size, size)
    tokens = torch.randint(1, text.vocab_size - 2, (16, text.context_length))
    lengths = torch.randint(2, text.context_length, (16,))
    tokens[torch.arange(16), lengths] = text.vocab_size - 1  # end-of-text, then padding
    tokens[torch.arange(text.context_length)[None, :] > lengths[:, None]] = 0
    for _ in range(steps):
        logits, _ = model(images, tokens)  # (16, 16) image-text pairs on the diagonal
        targets = torch.arange(16)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
