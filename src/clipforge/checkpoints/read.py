"""Load CLIP weights from every common layout, without ever running code from a file.

Sources ``load`` understands (the layout is detected from the content, not the file name):

- OpenAI's released ``.pt`` files: TorchScript archives, read as data by :mod:`._torchscript`;
- plain OpenAI-format state dicts (``torch.save`` or ``.safetensors``), e.g. from :func:`export_openai`;
- open_clip checkpoints: a bare state dict or ``{"state_dict": ...}``, optional ``module.`` prefix, or
  its Hub files (``open_clip_config.json`` beside ``open_clip_model.safetensors``), whose config gives
  the activation and head counts;
- Hugging Face CLIP folders: ``config.json`` + ``model.safetensors`` (or its shards with their index,
  or ``pytorch_model.bin``, or its shards); a config that contradicts the weights is refused;
- clipforge folders written by :func:`save`: ``config.json`` + ``model.safetensors``.

The architecture is read from the config where there is one, else inferred from the weights'
shapes as OpenAI's ``build_model`` does. Key names follow OpenAI's layout throughout; the HF
mapping lives in :mod:`._hf_keys`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from ..models import CLIP, ClipConfig, available_models, get_config
from ..files import why_missing
from ..runtime import cache_root, resolve_device
from ._files import (FORMAT_VERSION, CheckpointError, read_safetensors, read_sharded, safetensors_metadata, sniff,
                     torch_load_safely, unwrap_state_dict)
from ._hf_keys import hf_config_mismatches, hf_config_overrides, hf_to_openai
from ._open_clip import CONFIG_NAME as OPEN_CLIP_CONFIG, apply_open_clip_config, open_clip_config_beside, open_clip_weights
from ._torchscript import read_torchscript_state_dict
from .architecture import infer_config

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
# Where OpenAI publishes each release (the path segment is the file's SHA-256).
OPENAI_URLS = {
    "RN50": f"{_OPENAI_BASE}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_OPENAI_BASE}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_OPENAI_BASE}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_OPENAI_BASE}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_OPENAI_BASE}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_OPENAI_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_OPENAI_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_OPENAI_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_OPENAI_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# A Hugging Face Hub model id, ``org/name``, looked up in the local Hub cache (never downloaded).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Tensors some checkpoints carry that are not weights: OpenAI's TorchScript archives keep these
# three sizes as attributes; older open_clip saved the causal mask.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _Checkpoint:
    state_dict: dict[str, torch.Tensor]  # OpenAI key names
    kind: str  # openai_torchscript | openai | open_clip | hf | clipforge
    config: ClipConfig | None = None  # from the file, when it has one
    run_name: str | None = None  # open_clip's experiment name, a hint for the activation


def cache_dir() -> Path:
    """Where a bare model name is looked up: the cache root (``$CLIPFORGE_CACHE``, ``~/.cache/clipforge``)."""
    return cache_root()


def released_weights_file(name: str) -> Path | None:
    """Where OpenAI's released weights for architecture ``name`` are looked up in :func:`cache_dir`
    (whether or not the file is there), or None when ``name`` has no released weights."""
    url = OPENAI_URLS.get(name)
    return None if url is None else cache_dir() / url.rsplit("/", 1)[1]


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in OPENAI_URLS:
        url = OPENAI_URLS[name]
        local = released_weights_file(name)
        if local.exists():
            return local
        raise CheckpointError(
            f"no local weights for {name!r}: expected OpenAI's file at {local} (download it once from {url}, "
            f"or set CLIPFORGE_CACHE to the folder holding {local.name}); clipforge never downloads at load time"
        )
    if name in available_models():
        raise CheckpointError(f"{name!r} has no released weights; use clipforge.create_model({name!r}) for a "
                              "randomly initialised model, or pass a checkpoint path")
    if path.is_symlink():
        raise CheckpointError(f"{name}: {why_missing(path)}")
    message = f"{name}: no such file or folder, and not a released model name ({', '.join(OPENAI_URLS)})"
    repo = name.removeprefix("hf-hub:")  # open_clip's spelling of a Hub id
    if _HUB_ID.match(repo):
        cache, snapshot = _hub_snapshot(repo)
        if snapshot is not None:
            return snapshot
        raise CheckpointError(
            f"{message}; as a Hugging Face Hub id it is not in the local Hub cache ({cache}), and clipforge "
            f"never downloads at load time: fetch it once (`hf download {repo}`, or "
            "huggingface_hub.snapshot_download) and pass the id or the folder"
        )
    raise CheckpointError(message)


def _hub_snapshot(repo: str) -> tuple[Path, Path | None]:
    """``(hub cache, snapshot folder or None)`` of a Hub model in the local cache, read offline as
    huggingface_hub lays it out: ``models--org--name/refs/main`` names a ``snapshots/`` folder."""
    cache = Path(os.environ.get("HF_HUB_CACHE")
                 or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub").expanduser()
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        return cache, snapshot if snapshot.is_dir() else None
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    return cache, snapshots[0] if len(snapshots) == 1 else None


def _read_folder(folder: Path) -> _Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file() and (weights := open_clip_weights(folder)) is not None:
        return _read(weights)
    if not config_path.is_file() and (folder / "onnx_export.json").is_file():  # export.onnx.META_NAME
        raise CheckpointError(f"{folder}: is an ONNX export, which holds graphs, not PyTorch weights; "
                              f"use the checkpoint it was exported from (for inference, clipforge.load and eval read the export itself)")
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a clipforge folder (clipforge.save), a Hugging "
                              f"Face CLIP folder, or an open_clip one ({OPEN_CLIP_CONFIG} + open_clip_model.safetensors)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path}: holds a JSON {type(meta).__name__}, expected an object "
                              "(a clipforge or Hugging Face CLIP config)")
    if meta.get("format") == "clipforge":
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: format_version {meta['format_version']} is newer than this "
                                  f"clipforge reads ({FORMAT_VERSION}); upgrade clipforge")
        try:
            config = ClipConfig.from_dict(meta["config"])
        except KeyError:
            raise CheckpointError(f"{config_path}: no \"config\" entry; expected the model config clipforge.save "
                                  "writes") from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{config_path}: bad clipforge config ({err})") from None
        return _Checkpoint(read_safetensors(folder / "model.safetensors"), "clipforge", config)
    try:
        overrides = hf_config_overrides(meta)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    state_dict = _hf_weights(folder)
    try:
        state_dict = hf_to_openai(state_dict)
    except ValueError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    config = infer_config(state_dict, source=str(folder), match_presets=False)
    try:
        mismatches = hf_config_mismatches(meta, config)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    if mismatches:
        raise CheckpointError(f"{config_path}: disagrees with the weights beside it: {'; '.join(mismatches)}; "
                              "expected the config.json saved with these weights")
    config = dataclasses.replace(
        config, quick_gelu=overrides["quick_gelu"], init_logit_scale=overrides["init_logit_scale"],
        vision=dataclasses.replace(config.vision, heads=overrides["vision_heads"]),
        text=dataclasses.replace(config.text, heads=overrides["text_heads"]),
    )
    return _Checkpoint(state_dict, "hf", config)


def _torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``torch.save`` file, read into memory (see :func:`torch_load_safely`)."""
    return unwrap_state_dict(torch_load_safely(path), path)[0]


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF folder, in transformers' order of preference (safetensors before bin)."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        return read_sharded(folder / "model.safetensors.index.json", read_safetensors)
    if (folder / "pytorch_model.bin").is_file():
        return _torch_weights(folder / "pytorch_model.bin")
    if (folder / "pytorch_model.bin.index.json").is_file():
        return read_sharded(folder / "pytorch_model.bin.index.json", _torch_weights)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                          f"pytorch_model.bin.index.json; found {sorted(p.name for p in folder.iterdir())[:10]}")


def _read(path: Path) -> _Checkpoint:
    kind = sniff(path)
    if kind == "folder":
        return _read_folder(path)
    if kind == "torchscript":
        return _Checkpoint(read_torchscript_state_dict(path), "openai_torchscript")
    config = None
    try:
        if kind == "safetensors":
            state_dict, source_kind, run_name = read_safetensors(path), "openai", None
            if "clipforge_config" in (metadata := safetensors_metadata(path)):
                try:
                    config = ClipConfig.from_dict(json.loads(metadata["clipforge_config"]))
                except ValueError as err:
                    raise CheckpointError(f"{path}: bad clipforge_config metadata ({err})") from None
        else:
            state_dict, source_kind, run_name = unwrap_state_dict(torch_load_safely(path), path)
        if "text_model.embeddings.token_embedding.weight" in state_dict:  # HF weights without their folder
            state_dict, source_kind = hf_to_openai(state_dict), "hf"
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # a bad embedded config, incomplete q/k/v projections
        raise CheckpointError(f"{path}: {err}") from None
    if config is None and (open_clip_config := open_clip_config_beside(path)) is not None:
        try:
            config = apply_open_clip_config(open_clip_config, infer_config(state_dict, source=str(path),
                                                                           match_presets=False))
        except ValueError as err:
            raise CheckpointError(f"{open_clip_config}: {err}") from None
        source_kind = "open_clip"
    return _Checkpoint(state_dict, source_kind, config, run_name)


def load_state_dict_any(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, source_kind)`` from any supported checkpoint, with OpenAI key names.

    ``source_kind`` is one of ``openai_torchscript``, ``openai``, ``open_clip``, ``hf``, ``clipforge``.
    Tensors keep the file's dtypes and own their memory (files are read, not memory-mapped).
    Raises :class:`CheckpointError` naming the file on bad input.
    """
    checkpoint = _read(_resolve(path))
    return checkpoint.state_dict, checkpoint.kind


class _SkipInit(TorchFunctionMode):
    """Makes ``torch.nn.init`` calls no-ops while a model is built only to receive checkpoint weights
    (random init of ViT-L/14 takes seconds; building on the meta device costs a slow first import)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _fill(config: ClipConfig, state_dict: dict[str, torch.Tensor], source: str) -> CLIP:
    """A :class:`CLIP` holding exactly ``state_dict`` (cast to fp32), or one error listing what differs
    (or which weights hold NaN or inf: such a model answers, but every answer is meaningless).

    The weights are copied into the model's own memory, one tensor at a time, and each is dropped
    from ``state_dict`` once copied (the dict is consumed), so loading holds about one copy at a
    time; the model never views the file (a memory map would crash it, SIGBUS, once the file is
    overwritten in place).
    """
    try:
        with _SkipInit():
            model = CLIP(config)
    except ValueError as err:  # sizes that do not fit together (heads, patch size)
        raise CheckpointError(f"{source}: cannot build the model its config describes ({err})") from None
    expected = model.state_dict(keep_vars=True)
    for key in [k for k in state_dict if k.rsplit(".", 1)[-1] in _NOT_WEIGHTS]:
        del state_dict[key]
    given = state_dict
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in given:
            given[key] = torch.tensor(0)
    if "logit_scale" in given and given["logit_scale"].numel() == 1:
        given["logit_scale"] = given["logit_scale"].reshape(())  # some open_clip versions store shape (1,)
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in given]
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    wrong = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in given and given[k].shape != v.shape]
    # Weights must be real floating point: an integer, complex or fp8 tensor cast to fp32 is not the weight.
    not_float = [f"{k} {str(given[k].dtype).removeprefix('torch.')}" for k, v in expected.items()
                 if k in given and v.is_floating_point() and given[k].dtype not in _FLOAT_DTYPES]
    if missing or unexpected or wrong or not_float:
        problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong),
                                        ("not fp16/bf16/fp32/fp64", not_float)) if keys]
        tower = "ModifiedResNet" if config.vision.is_resnet else "ViT"
        raise CheckpointError(f"{source}: weights do not fit the {tower} CLIP architecture "
                              f"(embed_dim {config.embed_dim}); " + "; ".join(problems))
    not_finite = []
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(given.pop(key))  # casts to the model's dtype (fp32)
            if target.is_floating_point() and target.numel():
                low, high = torch.aminmax(target)  # NaN propagates to both; an inf shows in one of them
                if not (low.isfinite() and high.isfinite()):
                    not_finite.append(key)
    if not_finite:
        raise CheckpointError(f"{source}: {len(not_finite)} weights hold NaN or inf ({', '.join(not_finite[:4])}"
                              f"{' ...' if len(not_finite) > 4 else ''}); expected finite weights (was the run that "
                              "saved them diverging, or a cast to fp16 overflowing?)")
    return model.eval()


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *,
               quick_gelu: bool | None = None, config: ClipConfig | str | None = None) -> CLIP:
    """A :class:`CLIP` (fp32, eval mode) with the weights of any supported checkpoint; see the module docstring.

    ``quick_gelu`` overrides the activation (OpenAI-format weights default to QuickGELU; exact-GELU
    open_clip models need ``quick_gelu=False``). ``config`` (a preset name or :class:`ClipConfig`)
    replaces the inferred architecture, e.g. for head counts the weights cannot reveal.
    """
    path = _resolve(name_or_path)
    checkpoint = _read(path)
    if config is not None:
        resolved = get_config(config) if isinstance(config, str) else config
    else:
        resolved = checkpoint.config or infer_config(checkpoint.state_dict, source=str(path))
    if quick_gelu is None and checkpoint.config is None and checkpoint.kind == "open_clip":
        if checkpoint.run_name and "quickgelu" in checkpoint.run_name.lower():
            quick_gelu = True
        else:
            warnings.warn(f"{path}: cannot tell whether this open_clip checkpoint uses QuickGELU (OpenAI weights) "
                          "or exact GELU (most LAION models); assuming QuickGELU, pass quick_gelu=False otherwise",
                          stacklevel=2)
    if quick_gelu is not None:
        resolved = dataclasses.replace(resolved, quick_gelu=quick_gelu)
    return _fill(resolved, checkpoint.state_dict, str(path)).to(resolve_device(device))


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", jit: bool = False, *,
         quick_gelu: bool | None = None, config: ClipConfig | str | None = None) -> tuple[CLIP, Callable]:
    """``(model, preprocess)`` as ``clip.load`` returns: a path, a released model name (looked up in
    :func:`cache_dir`) or a Hugging Face Hub id ``org/name`` (looked up in the local Hub cache, never
    downloaded). ``preprocess`` maps a PIL image to the model's input tensor ``(3, H, W)``.

    ``jit=True`` is refused: it would run the TorchScript code stored in the file.
    """
    if jit:
        raise ValueError("jit=True is not supported: clipforge reads TorchScript archives as data and never "
                         "runs their code; use the default jit=False (same weights, same outputs)")
    from ..transforms import image_transform  # lazy: checkpoint tools do not need PIL

    if (Path(name_or_path).expanduser() / "onnx_export.json").is_file():  # clipforge convert --to onnx
        from ..export import load_export  # lazy: onnxruntime is the optional extra clipforge[onnx]

        return load_export(Path(name_or_path).expanduser(), device)
    model = load_model(name_or_path, device, quick_gelu=quick_gelu, config=config)
    return model, image_transform(model.config.vision.image_size)


