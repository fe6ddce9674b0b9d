"""Batched image and text embeddings for evaluation, with an optional on-disk cache.

Images go through a DataLoader (workers decode and preprocess in parallel; a file that cannot be
decoded is skipped and reported by name, never fatal), texts through the tokenizer in batches.
Both run under ``torch.no_grad`` in eval mode, optionally under bf16/fp16 autocast, and return
float32 embeddings exactly as ``encode_image`` / ``encode_text`` give them (not normalised).

The cache key is a hash of the model's weights, the preprocessing, the precision and the data:
for images every path with its size and modification time, for texts the texts themselves. A
second evaluation of the same model and data therefore loads instead of recomputing, and any
change to weights or files makes a new entry. Entries are ``<cache_dir>/<key>.pt``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..runtime import autocast, check_precision



@dataclass
class ImageFeatures:
    """Embeddings of the readable images among the ones asked for."""

    features: torch.Tensor  # (M, embed_dim) float32, on CPU
    indices: torch.Tensor  # (M,) position of each row's image in the input list
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) per unreadable image


class _ImageFiles(Dataset):
    """Preprocessed images by index; an unreadable file yields ``None`` and the reason."""

    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.preprocess(self.paths[index]), index, None
        except Exception as error:  # any decode or transform failure is reported, not raised
            reason = str(error).removeprefix(f"{self.paths[index]}: ") or type(error).__name__
            return None, index, reason


def _collate(batch):
    images = [image for image, _, _ in batch if image is not None]
    indices = torch.tensor([index for image, index, _ in batch if image is not None], dtype=torch.long)
    failures = [(index, reason) for image, index, reason in batch if image is None]
    return (torch.stack(images) if images else None), indices, failures


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers only decode; leave the cores to the model


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the model's train/eval state is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# model -> (identity of its tensors, digest): hashing ViT-L's 1.7 GB takes seconds, so an evaluation
# that asks several times hashes once, while any in-place change (which bumps a tensor's version
# counter) or swapped tensor makes a new digest.
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor in the state dict (names, dtypes, shapes and bytes)."""
    state = sorted(model.state_dict().items())
    identity = tuple((name, tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))
                     for name, tensor in state)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == identity:
        return memo[1]
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    _FINGERPRINTS[model] = (identity, digest.hexdigest())
    return digest.hexdigest()


def _cache_key(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def _listing(paths: Sequence[str]) -> str:
    """Each path with its size and modification time, so an edited file changes the key."""
    lines = []
    for path in paths:
        try:
            stat = os.stat(path)
            lines.append(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}")
        except OSError:
            lines.append(f"{os.path.abspath(path)}|missing")
    return "\n".join(lines)


def _cached(cache_dir: str | os.PathLike | None, key: str | None, compute: Callable[[], dict]) -> dict:
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute and overwrite
            pass
    result = compute()
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, partial)
        os.replace(partial, path)  # atomic: a reader sees the old entry or the whole new one
    except OSError as error:  # a full or read-only disk costs the cache, not the evaluation
        warnings.warn(f"feature cache not written to {path}: {error}", stacklevel=3)
        partial.unlink(missing_ok=True)
    return result


def encode_images(model: torch.nn.Module, paths: Sequence[str], preprocess: Callable,
                  batch_size: int = 64, num_workers: int = 0, device: str | torch.device | None = None,
                  precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, desc: str = "images") -> ImageFeatures:
    """Embed the images at ``paths``; unreadable ones are skipped and listed in ``skipped``.

    ``preprocess`` maps a path (or PIL image) to a (3, H, W) tensor, e.g.
    ``clipforge.transforms.image_transform(size)``. ``device`` defaults to the model's.
    """
    check_precision(precision)
    device = torch.device(device) if device is not None else model_device(model)
    key = cache_dir and _cache_key("images", model_fingerprint(model), repr(preprocess), precision, _listing(paths))

    def compute() -> dict:
        from tqdm.auto import tqdm

        loader = DataLoader(
            _ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init if num_workers else None,
        )
        chunks, kept, skipped = [], [], []
        with inference_mode(model), tqdm(total=len(paths), desc=desc, unit="img",
                                         disable=None if progress else True) as bar:
            for images, indices, failures in loader:
                skipped += [(str(paths[index]), reason) for index, reason in failures]
                if images is not None:
                    with autocast(device, precision):
                        features = model.encode_image(images.to(device, non_blocking=True))
                    chunks.append(features.float().cpu())  # (B, embed_dim)
                    kept.append(indices)
                bar.update(len(indices) + len(failures))
        features = torch.cat(chunks) if chunks else torch.empty(0, 0)
        indices = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)
        return {"features": features, "indices": indices, "skipped": [list(item) for item in skipped]}

    result = _cached(cache_dir, key, compute)
    return ImageFeatures(result["features"], result["indices"], [tuple(item) for item in result["skipped"]])


def _default_tokenizer(model: torch.nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    from ..tokenizer import tokenize

    context_length = getattr(model, "context_length", 77)
    return lambda texts: tokenize(list(texts), context_length=context_length, truncate=True)


def encode_texts(model: torch.nn.Module, texts: Sequence[str], tokenizer: Callable | None = None,
                 batch_size: int = 256, device: str | torch.device | None = None,
                 precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 progress: bool = False, desc: str = "texts") -> torch.Tensor:
    """Embed ``texts`` in batches; returns float32 ``(len(texts), embed_dim)`` on CPU.

    ``tokenizer`` maps a list of strings to a LongTensor (N, L); the default is CLIP's BPE at the
    model's context length, truncating texts that are too long. Only the default is cached.
    """
    check_precision(precision)
    device = torch.device(device) if device is not None else model_device(model)
    if tokenizer is not None:
        cache_dir = None  # a custom tokenizer cannot be told apart by a key: never cache its output
    tokenizer = tokenizer or _default_tokenizer(model)
    texts = list(texts)
    key = cache_dir and _cache_key("texts", model_fingerprint(model), precision,
                                   str(getattr(model, "context_length", "")), "\n".join(texts))

    def compute() -> dict:
        from tqdm.auto import tqdm

        chunks = []
        with inference_mode(model), tqdm(total=len(texts), desc=desc, unit="text",
                                         disable=None if progress else True) as bar:
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(texts[start:start + batch_size]).to(device)  # (B, L)
                with autocast(device, precision):
                    features = model.encode_text(tokens)
                chunks.append(features.float().cpu())  # (B, embed_dim)
                bar.update(len(tokens))
        return {"features": torch.cat(chunks) if chunks else torch.empty(0, 0)}

    return _cached(cache_dir, key, compute)["features"]
