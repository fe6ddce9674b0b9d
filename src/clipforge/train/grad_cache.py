"""One training step over a contrastive batch larger than the encoders' activations can hold.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup") in two passes over chunks of the batch:

1. embed every chunk with ``torch.no_grad`` (no activations kept) and concatenate the embeddings;
2. compute the loss on the whole batch and back-propagate it to the embeddings only (this also
   fills ``logit_scale.grad`` and any other parameter the loss uses);
3. re-run each chunk with gradients and back-propagate the cached embedding gradients into it.

The parameter gradients equal those of one forward/backward over the whole batch: every pair
sees every negative, which is also how this project does gradient accumulation (one contrastive
batch of ``k * chunk_size`` pairs, not ``k`` small ones). The random number generators are
replayed per chunk so dropout or stochastic depth draw the same masks in both passes, and
BatchNorm running statistics are updated once (in the first pass); batch statistics themselves
are per chunk, as in any micro-batching.

Across processes, pass a ``loss_fn`` that gathers (``clipforge.loss.contrastive_loss`` does by
default): each rank embeds its own batch, the loss gathers embeddings with gradients, and after
the step :func:`clipforge.distributed.average_gradients` gives every rank the gradient of the
global batch. Pass the bare model, not a DistributedDataParallel wrapper (DDP hooks expect one
forward and one backward per step).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from ..runtime import autocast

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def contrastive_step(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: "int | None" = None,
    *,
    autocast_dtype: "torch.dtype | None" = None,
    scale_loss: "Callable[[torch.Tensor], torch.Tensor] | None" = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward of one contrastive batch, ``chunk_size`` pairs of activations at a time.

    ``model`` has ``encode_image(images)`` and ``encode_text(tokens)``; ``images`` (B, 3, H, W)
    and ``tokens`` (B, L) are this process's pairs; ``loss_fn(image_features, text_features)``
    returns the scalar loss of raw encoder outputs (B, D), e.g.
    ``lambda img, txt: contrastive_loss(img, txt, model.logit_scale)``. ``chunk_size=None`` (or
    >= B) runs one ordinary forward/backward. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs
    the encoders under ``torch.autocast``; ``scale_loss`` (e.g. ``GradScaler.scale``) multiplies
    the loss before backward. Gradients are *accumulated* into ``.grad`` as ``backward`` does:
    zero them before, step the optimizer after. Returns the detached loss and timings
    ``{"chunks", "embed_s", "loss_s", "backward_s"}``.
    """
    batch = images.shape[0]
    if tokens.shape[0] != batch:
        raise ValueError(f"images and tokens must hold the same number of pairs, got {batch} and {tokens.shape[0]}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ValueError(
            f"model must have encode_image and encode_text, got {type(model).__name__}; "
            "pass the bare model (model.module for DDP) and average gradients after the step"
        )
    if chunk_size is None or chunk_size >= batch:
        return _direct_step(model, images, tokens, loss_fn, autocast_dtype, scale_loss)
    return _cached_step(model, images, tokens, loss_fn, chunk_size, autocast_dtype, scale_loss)


def _backward(loss: torch.Tensor, scale_loss) -> None:
    (scale_loss(loss) if scale_loss is not None else loss).backward()


def _direct_step(model, images, tokens, loss_fn, autocast_dtype, scale_loss):
    start = time.perf_counter()
    with autocast(images.device, autocast_dtype):
        image_features = model.encode_image(images)  # (B, D)
        text_features = model.encode_text(tokens)  # (B, D)
    embedded = time.perf_counter()
    loss = loss_fn(image_features, text_features)
    _backward(loss, scale_loss)
    done = time.perf_counter()
    return loss.detach(), {"chunks": 1.0, "embed_s": embedded - start, "loss_s": 0.0, "backward_s": done - embedded}


def _cached_step(model, images, tokens, loss_fn, chunk_size, autocast_dtype, scale_loss):
    device = images.device
    spans = [(start, min(start + chunk_size, images.shape[0])) for start in range(0, images.shape[0], chunk_size)]
    image_trainable, text_trainable = _trainable_towers(model)

    # Pass 1: embeddings of the whole batch, no activations kept; RNG state noted per forward.
    start = time.perf_counter()
    rng_states, image_chunks, text_chunks = [], [], []
    with torch.no_grad(), autocast(device, autocast_dtype):
        for lo, hi in spans:
            image_state = _capture_rng(device)
            image_chunks.append(model.encode_image(images[lo:hi]))  # (chunk, D)
            text_state = _capture_rng(device)
            text_chunks.append(model.encode_text(tokens[lo:hi]))  # (chunk, D)
            rng_states.append((image_state, text_state))
    image_features = torch.cat(image_chunks).requires_grad_(image_trainable)  # (B, D)
    text_features = torch.cat(text_chunks).requires_grad_(text_trainable)  # (B, D)
    del image_chunks, text_chunks

    # Loss of the whole batch; backward stops at the embeddings (and the loss's own parameters).
    embedded = time.perf_counter()
    loss = loss_fn(image_features, text_features)
    _backward(loss, scale_loss)
    loss_done = time.perf_counter()

    # Pass 2: each chunk again, with gradients, fed the cached embedding gradients.
    norm_buffers = _batchnorm_buffers(model)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        for (lo, hi), (image_state, text_state) in zip(spans, rng_states):
            outputs, grads = [], []
            towers = ((model.encode_image, images, image_features, image_state),
                      (model.encode_text, tokens, text_features, text_state))
            for encode, inputs, features, rng_state in towers:
                if features.grad is None:
                    continue
                _restore_rng(device, rng_state)  # the same dropout/augmentation draws as pass 1
                with autocast(device, autocast_dtype):
                    chunk_features = encode(inputs[lo:hi])
                outputs.append(chunk_features)
                grads.append(features.grad[lo:hi].to(chunk_features.dtype))
            pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    for buffer, saved in norm_buffers:  # pass 1 already updated the running statistics
        buffer.copy_(saved)
    done = time.perf_counter()
    stats = {"chunks": float(len(spans)), "embed_s": embedded - start, "loss_s": loss_done - embedded,
             "backward_s": done - loss_done}
    return loss.detach(), stats


def _trainable_towers(model: nn.Module) -> tuple[bool, bool]:
    """Whether the image / text tower has trainable parameters (OpenAI layout: ``visual.*``)."""
    if not hasattr(model, "visual"):
        return True, True
    image, text = False, False
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            image |= param.requires_grad
        elif name not in ("logit_scale", "logit_bias"):
            text |= param.requires_grad
    return image, text


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Snapshots of BatchNorm running statistics of layers in training mode."""
    return [
        (buffer, buffer.clone())
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        for buffer in module.buffers()
    ]


def _capture_rng(device: torch.device):
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _restore_rng(device: torch.device, state) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
