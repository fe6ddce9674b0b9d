"""The Vision Transformer image tower of CLIP (OpenAI's ``VisionTransformer``)."""
from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig, check_patch_dropout
from .layers import LayerNorm, Transformer, builds_graph


class VisionTransformer(nn.Module):
    """Patchify, prepend a class token, transformer, LayerNorm the class token, project."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = True):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.input_resolution = cfg.image_size
        self.output_dim = output_dim
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.patch_dropout = cfg.patch_dropout  # share of patch tokens dropped in training mode

    def set_patch_dropout(self, share: float) -> None:
        """Drop ``share`` of the patch tokens of each image in training mode (0: keep all)."""
        check_patch_dropout(share)
        self.patch_dropout = float(share)

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a uniform random subset of each image's patch tokens.

        Draws from torch's global generator (the device's), so a resumed run, and the two passes of
        gradient caching, which replay the generator state, draw the same subsets.
        """
        patches = x[:, 1:]  # (N, P, width)
        keep = max(1, int(patches.shape[1] * (1.0 - self.patch_dropout)))
        scores = torch.rand(patches.shape[0], patches.shape[1], device=x.device)  # (N, P)
        kept = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (N, keep), in patch order
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[2]))  # (N, keep, width)
        return torch.cat([x[:, :1], patches], dim=1)  # (N, keep + 1, width)

    def init_weights(self) -> None:
        """Transformer weights as OpenAI initialises them (embeddings are set in __init__)."""
        self.transformer.init_weights()

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``conv1`` as tokens ``(N, grid*grid, width)`` from pixels ``(N, 3, H, W)``. In training, the
        same sums as one matrix multiply over the flattened patches (its weight gradient is one GEMM:
        ViT-B/32 at batch 32 on the CPU, 85 ms forward and backward against the convolution's 119)."""
        weight = self.conv1.weight  # (width, 3, patch, patch)
        patch = weight.shape[-1]
        n, channels, height, width = x.shape
        if not builds_graph(weight) or height % patch or width % patch:
            return self.conv1(x).flatten(2).transpose(1, 2)  # (N, width, grid, grid) -> (N, grid*grid, width)
        rows, cols = height // patch, width // patch
        patches = x.reshape(n, channels, rows, patch, cols, patch)  # (N, 3, rows, patch, cols, patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, -1)  # (N, rows*cols, 3*patch*patch)
        return patches @ weight.reshape(weight.shape[0], -1).t()  # (N, rows*cols, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed_patches(x)  # (N, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, width)
        x = torch.cat([cls, x], dim=1)  # (N, grid*grid + 1, width)
        x = x + self.positional_embedding.to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)  # (N, keep + 1, width)
        x = self.ln_pre(x)
        cls_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.ln_post(self.transformer(x, pool_at=cls_index))  # (N, width): the class token only
        return x @ self.proj  # (N, output_dim)
