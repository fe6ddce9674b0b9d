"""AdamW with the paper's decay exclusions, and the cosine learning-rate schedule with linear warmup."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from .config import OptimSection


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups, with and without decay, over the trainable parameters of ``modules``.

    ``modules`` are the model and any loss that owns parameters (SigLIP's bias). A module's
    ``no_weight_decay()`` names the parameters it excludes (the CLIP model: gains, biases,
    embeddings, logit_scale); a module without one excludes its tensors of fewer than two
    dimensions. Frozen parameters (locked towers) are left out.
    """
    decay, plain = [], []
    for module in modules:
        names = module.no_weight_decay() if hasattr(module, "no_weight_decay") else None
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            excluded = name in names if names is not None else param.ndim < 2
            (plain if excluded else decay).append(param)
    if not decay and not plain:
        raise ValueError("nothing to train: every parameter is frozen")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(modules: Iterable[nn.Module], config: OptimSection) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over ``modules`` with the settings of ``config``.

    Uses the fused implementation (one kernel per step, on CPU and CUDA): on CPU the default
    per-tensor loop is ~15x slower, enough to dominate a small model's step. Falls back to the
    default where fusing is unsupported (older torch, unusual devices).
    """
    groups = param_groups(modules, config.weight_decay)
    settings = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **settings)


def sparse_token_gradients(model: nn.Module) -> None:
    """Let the token embedding's backward touch only the rows a batch uses, with the same dense
    ``.grad`` for the optimizer afterwards.

    The dense embedding backward allocates and zero-fills the whole table's gradient every step
    (ViT-B/32: 49,408 x 512 floats, 101 MB; 70-145 ms of a 6.5 s CPU step, mostly page faults
    on the fresh allocation). Here the backward yields a sparse gradient, and a hook adds it into
    one dense buffer that lives as long as the model: zeroed in place each step, never
    reallocated. The values equal the dense backward's (the same sums per row); further
    backwards of the same step (gradient caching's chunks) add into that dense ``.grad``.
    """
    embedding = getattr(model, "token_embedding", None)
    if not isinstance(embedding, nn.Embedding) or not embedding.weight.requires_grad:
        return
    dense = torch.zeros_like(embedding.weight)  # (vocab, width), reused every step

    def densify(weight: torch.Tensor) -> None:
        grad = weight.grad
        if grad is not None and grad.is_sparse:
            dense.zero_()
            dense.index_add_(0, grad._indices()[0], grad._values())  # (vocab, width): summed per row
            weight.grad = dense

    embedding.sparse = True
    embedding.weight.register_post_accumulate_grad_hook(densify)


def gradient_norm_(params: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' total 2-norm; with ``max_norm`` set, gradients are scaled down to it as
    ``torch.nn.utils.clip_grad_norm_`` does.

    Without ``max_norm`` this only measures: ``clip_grad_norm_(params, inf)`` would also multiply
    every gradient by 1.0, a full pass over them (about 25 ms a step for ViT-B/32 on two cores).
    """
    params = list(params)
    get_total_norm = getattr(nn.utils, "get_total_norm", None)  # torch >= 2.6
    if max_norm or get_total_norm is None:
        return nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return get_total_norm([p.grad for p in params if p.grad is not None])


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Rises linearly to 1 over ``warmup_steps`` (the first step already gets 1/warmup), then follows
    half a cosine down to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: "int | Callable[[], int]") -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler applying :func:`cosine_with_warmup`; call ``step()`` after every optimizer step.

    ``total_steps`` may be a function, read at every step: a ``minutes`` run re-plans its length.
    """
    total = total_steps if callable(total_steps) else lambda: total_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total())
    )
