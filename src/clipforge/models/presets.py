"""Registered model presets: OpenAI's nine released architectures and small CPU-sized ones.

The OpenAI numbers are what ``build_model`` in openai/CLIP infers from each released checkpoint.
"""
from __future__ import annotations

from .config import ClipConfig, TextConfig, VisionConfig
from .registry import register_model


def _openai(embed_dim, image_size, vision_layers, vision_width, text_width, text_heads, patch_size=32):
    return ClipConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, layers=vision_layers, width=vision_width, patch_size=patch_size),
        text=TextConfig(width=text_width, heads=text_heads, layers=12),
    )


@register_model("RN50")
def rn50() -> ClipConfig:
    return _openai(1024, 224, (3, 4, 6, 3), 64, 512, 8)


@register_model("RN101")
def rn101() -> ClipConfig:
    return _openai(512, 224, (3, 4, 23, 3), 64, 512, 8)


@register_model("RN50x4")
def rn50x4() -> ClipConfig:
    return _openai(640, 288, (4, 6, 10, 6), 80, 640, 10)


@register_model("RN50x16")
def rn50x16() -> ClipConfig:
    return _openai(768, 384, (6, 8, 18, 8), 96, 768, 12)


@register_model("RN50x64")
def rn50x64() -> ClipConfig:
    return _openai(1024, 448, (3, 15, 36, 10), 128, 1024, 16)


@register_model("ViT-B/32")
def vit_b_32() -> ClipConfig:
    return _openai(512, 224, 12, 768, 512, 8, patch_size=32)


@register_model("ViT-B/16")
def vit_b_16() -> ClipConfig:
    return _openai(512, 224, 12, 768, 512, 8, patch_size=16)


@register_model("ViT-L/14")
def vit_l_14() -> ClipConfig:
    return _openai(768, 224, 24, 1024, 768, 12, patch_size=14)


@register_model("ViT-L/14@336px")
def vit_l_14_336() -> ClipConfig:
    return _openai(768, 336, 24, 1024, 768, 12, patch_size=14)


@register_model("tiny-vit")
def tiny_vit() -> ClipConfig:
    """Test-sized ViT pair: 64 px, 2 layers of width 64 per tower, 32-d embedding."""
    return ClipConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=64, layers=2, width=64, patch_size=16, heads=2),
        text=TextConfig(width=64, heads=2, layers=2),
    )


@register_model("tiny-rn")
def tiny_rn() -> ClipConfig:
    """Test-sized ModifiedResNet pair: 64 px, one bottleneck per stage, stem width 16."""
    return ClipConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16, heads=4),
        text=TextConfig(width=64, heads=2, layers=2),
    )


@register_model("small-vit")
def small_vit() -> ClipConfig:
    """Demo-sized ViT pair that trains in minutes on 2 CPU cores: 64 px, patch 8, width 256."""
    return ClipConfig(
        embed_dim=256,
        vision=VisionConfig(image_size=64, layers=6, width=256, patch_size=8, heads=4),
        text=TextConfig(width=256, heads=4, layers=4),
    )


@register_model("demo-vit")
def demo_vit() -> ClipConfig:
    """The demo's model, sized so ``clipforge demo`` trains it in minutes on 2 CPU cores.

    64 px, patch 16 (16 patches), 4 x 128 vision blocks; 2 x 128 text blocks over 24 tokens;
    128-d embedding. The demo data is 64 px emoji, stamps and clip art with short captions (median
    8 tokens, 99.9 % within 24), so both towers are narrow and shallow and the text context is 24
    tokens (longer captions are truncated; the model trims each batch to its longest caption).
    Patch 16 rather than 8: on 2 busy cores, four times fewer image tokens buy about twice the
    epochs in the same minutes, which raised zero-shot top-1 more than the finer patches did.
    """
    return ClipConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, layers=4, width=128, patch_size=16, heads=4),
        text=TextConfig(context_length=24, width=128, heads=4, layers=2),
    )


@register_model("demo-rn")
def demo_rn() -> ClipConfig:
    """The demo's default model: a small ModifiedResNet image tower at 32 px, the text tower of demo-vit.

    32 px input, stem width 16, one bottleneck per stage (16 -> 512 channels), attention pooling
    with 8 heads; text as ``demo-vit`` (2 x 128 blocks over 24 tokens); 128-d embedding. On the
    demo's 6,540 images the convolutional tower transfers to the unseen Fluent 3D style far better
    than the ViT, which memorises: at equal wall time (8 minutes, 1 thread each, two runs sharing
    2 cores) 35% zero-shot top-1 against 13-16% for demo-vit variants (patch 8 or 16, 32 or 64 px);
    32 px beat 64 px (29%) by allowing twice the steps (benchmarks/results_demo_recipe.md).
    """
    return ClipConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=16),
        text=TextConfig(context_length=24, width=128, heads=4, layers=2),
    )
