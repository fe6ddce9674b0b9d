"""Hugging Face ``CLIPModel`` <-> OpenAI key names and configs: the one place that knows both layouts.

HF splits each fused ``in_proj`` into ``q_proj``/``k_proj``/``v_proj``, stores the projections as
``nn.Linear`` weights (``embed x width``, i.e. OpenAI's transposed), and renames the rest::

    OpenAI                               Hugging Face
    visual.conv1.weight                  vision_model.embeddings.patch_embedding.weight
    visual.class_embedding               vision_model.embeddings.class_embedding
    visual.positional_embedding          vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post       vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.transformer.resblocks.N       vision_model.encoder.layers.N
    visual.proj (width x embed)          visual_projection.weight (embed x width)
    transformer.resblocks.N              text_model.encoder.layers.N
    token_embedding.weight               text_model.embeddings.token_embedding.weight
    positional_embedding                 text_model.embeddings.position_embedding.weight
    ln_final                             text_model.final_layer_norm
    text_projection (width x embed)      text_projection.weight (embed x width)
    inside a block: ln_1/ln_2 -> layer_norm1/layer_norm2, mlp.c_fc/c_proj -> mlp.fc1/fc2,
                    attn.out_proj -> self_attn.out_proj, attn.in_proj_* -> self_attn.{q,k,v}_proj.*
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..models.config import ClipConfig

_NORMS = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "ln_final": "text_model.final_layer_norm"}
_FLAT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
    **{f"{old}.{p}": f"{new}.{p}" for old, new in _NORMS.items() for p in ("weight", "bias")},
}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks": "vision_model.encoder.layers", "transformer.resblocks": "text_model.encoder.layers"}
_BLOCK_PARTS = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))
_BLOCK = {f"{old}.{p}": f"{new}.{p}" for old, new in _BLOCK_PARTS for p in ("weight", "bias")}
_OPENAI_BLOCK = re.compile(r"^(visual\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(vision_model\.encoder\.layers|text_model\.encoder\.layers)\.(\d+)\.(.+)$")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> ClipConfig.quick_gelu


def openai_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict from an OpenAI-format ViT CLIP state dict."""
    out = {}
    for key, value in state_dict.items():
        block = _OPENAI_BLOCK.match(key)
        if key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()  # (embed, width)
        elif key in _FLAT:
            out[_FLAT[key]] = value
        elif block and block.group(3) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            tower, layer, inner = block.groups()
            kind = inner.rsplit("_", 1)[1]  # weight or bias
            for name, part in zip("qkv", value.chunk(3, dim=0)):  # each (width, ...) of (3*width, ...)
                out[f"{_TOWERS[tower]}.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif block and block.group(3) in _BLOCK:
            tower, layer, inner = block.groups()
            out[f"{_TOWERS[tower]}.{layer}.{_BLOCK[inner]}"] = value
        else:
            raise ValueError(f"no Hugging Face name for state-dict key {key!r}")
    return out


def hf_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI-format state dict from an HF ``CLIPModel`` one; unknown keys pass through unchanged
    (so a mismatch report shows them) and ``position_ids`` buffers are dropped."""
    flat = {new: old for old, new in {**_FLAT, **_PROJECTIONS}.items()}
    towers = {new: old for old, new in _TOWERS.items()}
    block_names = {new: old for old, new in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer prefix, weight|bias) -> q/k/v parts
    for key, value in state_dict.items():
        block = _HF_BLOCK.match(key)
        attn = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", block.group(3)) if block else None
        if key.endswith("embeddings.position_ids"):
            continue
        if key in _PROJECTIONS.values():
            out[flat[key]] = value.t()  # (width, embed)
        elif key in flat:
            out[flat[key]] = value
        elif attn:
            prefix = f"{towers[block.group(1)]}.{block.group(2)}."
            qkv.setdefault((prefix, attn.group(2)), {})[attn.group(1)] = value
        elif block and block.group(3) in block_names:
            out[f"{towers[block.group(1)]}.{block.group(2)}.{block_names[block.group(3)]}"] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        fused = f"{prefix}attn.in_proj_{kind}"
        if set(parts) != set("qkv"):
            raise ValueError(f"{fused}: found only {sorted(parts)} of the q/k/v projections")
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3*width, ...)
    return out


def _sub_config(hf: dict[str, Any], tower: str) -> dict[str, Any]:
    """One tower's settings: ``<tower>_config``, updated by the older ``<tower>_config_dict`` where both
    are there, as transformers' ``CLIPConfig`` reads them."""
    merged: dict[str, Any] = {}
    for name in (f"{tower}_config", f"{tower}_config_dict"):
        sub = hf.get(name) or {}
        if not isinstance(sub, dict):
            raise ValueError(f"{name} is a JSON {type(sub).__name__}, expected an object")
        merged.update(sub)
    return merged


def hf_config_mismatches(hf: dict[str, Any], config: ClipConfig) -> list[str]:
    """The sizes an HF ``CLIPConfig`` states that its weights contradict, as ``"field X, weights Y"``.

    ``config`` is what the weights' shapes say; a size the config leaves out is not checked (the
    weights decide). Only the top-level ``projection_dim`` is read: ``CLIPModel`` ignores the towers'.
    """
    vision, text = config.vision, config.text
    stated = {
        "projection_dim": (hf.get("projection_dim"), config.embed_dim),
        **{f"vision_config.{name}": (_sub_config(hf, "vision").get(name), value) for name, value in (
            ("hidden_size", vision.width), ("num_hidden_layers", vision.layers),
            ("intermediate_size", round(vision.width * vision.mlp_ratio)), ("image_size", vision.image_size),
            ("patch_size", vision.patch_size))},
        **{f"text_config.{name}": (_sub_config(hf, "text").get(name), value) for name, value in (
            ("hidden_size", text.width), ("num_hidden_layers", text.layers),
            ("intermediate_size", round(text.width * text.mlp_ratio)), ("vocab_size", text.vocab_size),
            ("max_position_embeddings", text.context_length))},
    }
    found = [f"{field} {said!r}, weights {actual}" for field, (said, actual) in stated.items()
             if said is not None and said != actual]
    eos = _sub_config(hf, "text").get("eos_token_id")
    if eos is not None and eos not in (2, text.vocab_size - 1):  # 2: transformers' legacy argmax pooling
        found.append(f"text_config.eos_token_id {eos!r}: transformers pools at that token, clipforge at the "
                     f"highest id ({text.vocab_size - 1})")
    return found


def hf_config_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """What an HF ``CLIPConfig`` says beyond the weights' shapes: head counts, activation,
    temperature init. Raises ``ValueError`` for settings clipforge cannot represent."""
    model_type = hf.get("model_type")
    if model_type != "clip" and "CLIPModel" not in (hf.get("architectures") or []):
        raise ValueError(f"model_type is {model_type!r}, expected 'clip' (a transformers CLIPModel)")
    text, vision = _sub_config(hf, "text"), _sub_config(hf, "vision")
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"hidden_act {sorted(acts)}: expected both towers 'quick_gelu' or both 'gelu'")
    for tower, sub in (("text", text), ("vision", vision)):
        eps = sub.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise ValueError(f"{tower}_config.layer_norm_eps is {eps}; clipforge's LayerNorm uses 1e-05")
    return {
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "init_logit_scale": float(hf.get("logit_scale_init_value", 2.6592)),
        "text_heads": int(text.get("num_attention_heads", 8)),  # transformers' defaults
        "vision_heads": int(vision.get("num_attention_heads", 12)),
    }


def clip_to_hf_config(config: ClipConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A transformers ``CLIPConfig`` dict (``config.json``) for a ViT :class:`ClipConfig`."""
    vision, text = config.vision, config.text
    if vision.is_resnet:
        raise ValueError("transformers' CLIPModel has no ModifiedResNet image tower; only ViT models export to HF")
    act = "quick_gelu" if config.quick_gelu else "gelu"
    # CLIP's start/end-of-text ids are the last two of the vocabulary; HF pools at the first end id,
    # which is where clipforge's argmax pooling lands for tokenizer output.
    bos, eos = text.vocab_size - 2, text.vocab_size - 1
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "initializer_factor": 1.0,
        "dtype": str(dtype).removeprefix("torch."),
        "text_config": {
            "model_type": "clip_text_model", "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio), "num_attention_heads": text.heads,
            "num_hidden_layers": text.layers, "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size, "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 1, "projection_dim": config.embed_dim,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio), "num_attention_heads": vision.num_heads,
            "num_hidden_layers": vision.layers, "image_size": vision.image_size, "patch_size": vision.patch_size,
            "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim,
        },
    }
