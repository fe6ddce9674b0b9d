"""clipforge: CLIP (Radford et al. 2021) in PyTorch.

The public API mirrors openai/CLIP, so code written for it ports unchanged::

    import clipforge
    model, preprocess = clipforge.load("ViT-B-32.pt")
    tokens = clipforge.tokenize(["a photo of a cat"])
    image_features = model.encode_image(preprocess(image).unsqueeze(0))
"""
from ._version import __version__
from .checkpoints import CheckpointError, export_hf, export_openai, infer_config, load, load_model, save
from .evaluate.zeroshot import zero_shot_classifier
from .loss import ClipLoss, SigLipLoss, clamp_logit_scale_, contrastive_loss, sigmoid_loss
from .models import CLIP, ClipConfig, TextConfig, VisionConfig, available_models, create_model, get_config, register_model
from .tokenizer import Tokenizer, get_tokenizer, tokenize
from .transforms import OPENAI_MEAN, OPENAI_STD, image_transform, load_image

__all__ = [
    "__version__",
    "CLIP",
    "CheckpointError",
    "ClipLoss",
    "SigLipLoss",
    "clamp_logit_scale_",
    "contrastive_loss",
    "sigmoid_loss",
    "export_hf",
    "export_openai",
    "infer_config",
    "load",
    "load_model",
    "save",
    "Tokenizer",
    "get_tokenizer",
    "tokenize",
    "zero_shot_classifier",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "image_transform",
    "load_image",
    "ClipConfig",
    "TextConfig",
    "VisionConfig",
    "available_models",
    "create_model",
    "get_config",
    "register_model",
]
