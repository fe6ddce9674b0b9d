"""The open_clip reference fixtures (reduced-width ViT and ModifiedResNet CLIPs with random
weights, their inputs and outputs), loaded into clipforge models; shared by the CPU and CUDA tests."""
import json
from pathlib import Path

import torch
from safetensors import safe_open

import clipforge
from clipforge import ClipConfig, TextConfig, VisionConfig

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def load_openclip_fixture(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The clipforge model holding fixture ``family``'s weights (``vit`` or ``resnet``), and its tensors."""
    path = FIXTURES / f"openclip_{family}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vision = dict(cfg["vision_cfg"])
    head_width = vision.pop("head_width")
    layers = vision["layers"]
    heads = vision["width"] * 32 // head_width if isinstance(layers, list) else vision["width"] // head_width
    config = ClipConfig(
        embed_dim=cfg["embed_dim"],
        vision=VisionConfig(**{**vision, "layers": tuple(layers) if isinstance(layers, list) else layers}, heads=heads),
        text=TextConfig(**cfg["text_cfg"]),
    )
    model = clipforge.create_model(config).eval()
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    model.load_state_dict(weights, strict=True)
    return model, tensors
