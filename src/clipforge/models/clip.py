"""The CLIP model: an image tower, a causal text transformer, and a learnable temperature.

Attribute names are OpenAI's, so ``model.state_dict()`` has exactly the keys (and shapes) of a
released OpenAI checkpoint: ``visual.*``, ``transformer.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection`` (width x embed) and ``logit_scale``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig, check_patch_dropout
from .layers import LayerNorm, Transformer
from .resnet import ModifiedResNet
from .vit import VisionTransformer


class CLIP(nn.Module):
    """Two towers mapping images and texts into one embedding space; see Radford et al. 2021."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        vision, text = config.vision, config.text
        if vision.is_resnet:
            self.visual = ModifiedResNet(vision, config.embed_dim)
        else:
            self.visual = VisionTransformer(vision, config.embed_dim, config.quick_gelu)
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        # Run the text tower only up to the last end-of-text token in the batch; exact under the
        # causal mask (later positions cannot reach the pooled one). Off for fixed-shape tracing.
        self.trim_text = True
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation as in OpenAI's ``initialize_parameters``."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.visual.init_weights()
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; inputs are cast to it (fp16 weights take fp32 images)."""
        return self.text_projection.dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from pixels ``(N, 3, H, W)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        features = self.visual(images.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``, pooled at end-of-text."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must have shape (N, L) with L <= {self.context_length}, got {tuple(tokens.shape)}; "
                "tokenize for this model with clipforge.tokenize(texts, context_length=model.context_length)"
            )
        eot_positions = tokens.argmax(dim=-1)  # the end-of-text id is the largest id
        if self.trim_text and tokens.shape[0] > 0:
            tokens = tokens[:, : int(eot_positions.max()) + 1]  # (N, L') with L' <= L
        x = self.token_embedding(tokens).to(self.dtype)  # (N, L', width)
        x = x + self.positional_embedding[: tokens.shape[1]].to(self.dtype)
        pooled = self.transformer(x, causal=True, pool_at=eot_positions)  # (N, width): end-of-text tokens only
        features = self.ln_final(pooled) @ self.text_projection  # (N, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: scaled cosine similarities, as OpenAI's."""
        return pair_logits(self, images, tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory (both towers)."""
        self.transformer.grad_checkpointing = enable
        target = self.visual.transformer if hasattr(self.visual, "transformer") else self.visual
        target.grad_checkpointing = enable

    def set_patch_dropout(self, share: float) -> None:
        """FLIP patch dropout: drop ``share`` of each image's patch tokens in training mode (ViT only).

        Recorded in ``config.vision.patch_dropout`` so checkpoints keep it; evaluation (``eval()``)
        always sees every patch. Raises ValueError for a share outside [0, 1) or a ResNet tower.
        """
        check_patch_dropout(share, self.config.vision.is_resnet)
        if not self.config.vision.is_resnet:
            self.visual.set_patch_dropout(share)
        self.config.vision.patch_dropout = float(share)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay: gains, biases, embeddings, temperature."""
        return {
            name for name, param in self.named_parameters()
            if param.ndim < 2 or "embedding" in name or name == "logit_scale"
        }

    def lock_image_tower(self) -> None:
        """Freeze the image tower (no gradients, BatchNorm statistics kept)."""
        for param in self.visual.parameters():
            param.requires_grad_(False)
        self.image_locked = True
        self.visual.eval()

    def train(self, mode: bool = True) -> "CLIP":
        """As ``nn.Module.train``, but a locked image tower stays in eval mode."""
        super().train(mode)
        if getattr(self, "image_locked", False):
            self.visual.eval()
        return self

    def lock_text_tower(self) -> None:
        """Freeze the text tower: transformer, embeddings, final norm and projection."""
        for name, param in self.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                param.requires_grad_(False)


def pair_logits(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_per_image, logits_per_text)`` of any model with ``encode_image``, ``encode_text`` and
    ``logit_scale``: ``exp(logit_scale)`` times the cosine similarities (the ONNX model shares it)."""
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    logits_per_image = model.logit_scale.exp() * image_features @ text_features.t()  # (N_img, N_txt)
    return logits_per_image, logits_per_image.t()
