"""Building blocks shared by both towers: fp32 LayerNorm, QuickGELU, attention, transformer.

Parameter names follow OpenAI's CLIP exactly (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1`` ...)
so released state dicts load without renaming. Activations are batch-first, ``(B, T, C)``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


_QUICK_GELU_SCALE = 1.702  # QuickGELU(x) = x sigmoid(1.702 x)


def builds_graph(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` records autograd history: the test every training-only fast path
    (fused MLP, pooled queries, patch matmul, QuickGELU's backward) takes before standing in."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _QuickGELUFunction(torch.autograd.Function):
    """x * sigmoid(1.702 x) with a one-kernel backward: with z = 1.702 x, d/dx = sigmoid(z) (1 + z (1 -
    sigmoid(z))), which is exactly SiLU's derivative at z. Saves z alone (autograd would save x and
    the sigmoid, and run five elementwise kernels backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        z = _QUICK_GELU_SCALE * x
        ctx.save_for_backward(z)
        return x * torch.sigmoid(z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, z)


class _QuickGELUMLPFunction(torch.autograd.Function):
    """``c_proj(quick_gelu(c_fc(x)))`` for ``x`` (N, C) with one elementwise pass over the hidden
    activations each way. With z = 1.702 (x W1^T + b1), quick_gelu = silu(z) / 1.702: the 1.702s ride
    on the matrix multiplies' alpha and beta (free in the BLAS call), so the forward runs one SiLU
    where the module runs a multiply, a sigmoid and a multiply, and backward one ``silu_backward``.
    Saves x, z and silu(z), as the module path saves x, z and its output."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        c = _QUICK_GELU_SCALE
        z = torch.addmm(b1, x, w1.t(), beta=c, alpha=c)  # (N, H): c (x W1^T + b1)
        s = F.silu(z)  # (N, H): c quick_gelu(x W1^T + b1)
        ctx.save_for_backward(x, w1, w2, z, s)
        return torch.addmm(b2, s, w2.t(), alpha=1.0 / c)  # (N, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # grad (N, C)
        x, w1, w2, z, s = ctx.saved_tensors
        c, nothing = _QUICK_GELU_SCALE, grad.new_zeros(())
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_w2 = torch.addmm(nothing, grad.t(), s, beta=0, alpha=1.0 / c) if need_w2 else None  # (C, H)
        grad_b2 = grad.sum(0) if need_b2 else None
        grad_z = torch.ops.aten.silu_backward(torch.addmm(nothing, grad, w2, beta=0, alpha=1.0 / c), z)  # (N, H)
        grad_x = torch.addmm(nothing, grad_z, w1, beta=0, alpha=c) if need_x else None  # (N, C)
        grad_w1 = torch.addmm(nothing, grad_z.t(), x, beta=0, alpha=c) if need_w1 else None  # (H, C)
        grad_b1 = grad_z.sum(0).mul_(c) if need_b1 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _fused_mlp_applies(x: torch.Tensor, mlp: nn.Module) -> bool:
    """Whether ``_QuickGELUMLPFunction`` may stand in for ``mlp``: a QuickGELU MLP in a step that
    builds a graph, weights of ``x``'s dtype, no autocast (its casts are the module's business) and
    no compiler (inductor fuses the module path itself)."""
    if not isinstance(mlp.gelu, QuickGELU) or not builds_graph(x, mlp.c_fc.weight, mlp.c_proj.weight):
        return False
    if x.dtype != mlp.c_fc.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    return not torch.compiler.is_compiling()


def run_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for ``x`` (..., C): the fused QuickGELU MLP when it applies, the module otherwise."""
    if not _fused_mlp_applies(x, mlp):
        return mlp(x)
    flat = x.reshape(-1, x.shape[-1])  # (N, C)
    out = _QuickGELUMLPFunction.apply(flat, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)
    return out.view(*x.shape[:-1], out.shape[-1])  # (..., C)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if builds_graph(x):
            return _QuickGELUFunction.apply(x)
        return x * torch.sigmoid(_QUICK_GELU_SCALE * x)


# On CPU, sequences up to this length attend faster through two plain matmuls and a softmax than
# through SDPA's flash kernel (ViT-B/32's 50 tokens: 14 vs 16 ms per layer, forward and backward;
# the demo's 17: 0.9 vs 1.9 ms); longer ones (197, 577 tokens) are faster with flash.
_CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 64


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
            mask: "torch.Tensor | None" = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [masked]) v for (B, heads, Tq, d) queries and (B, heads, Tk, d) keys/values;
    ``causal`` aligns query i with key i (Tq == Tk), ``mask`` is boolean, True where a key may be seen."""
    if q.device.type != "cpu" or k.shape[2] > _CPU_EXPLICIT_ATTENTION_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, heads, Tq, Tk)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()  # (Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)  # (B, heads, Tq, d)


def _unpack_rows(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Packed rows ``(N, D)`` back into ``(total, D)``: row ``index[i]`` holds ``rows[i]``, the others are zero."""
    return rows.new_zeros(total, rows.shape[-1]).index_copy(0, index, rows)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's fused parameter layout (see ``_attend``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        return self.out_proj(self._attend_projected(qkv, causal))

    def _attend_projected(self, qkv: torch.Tensor, causal: bool) -> torch.Tensor:
        """Attention of projected ``qkv`` (B, T, 3C), before the output projection: (B, T, C)."""
        batch, seq, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.view(batch, seq, 3, self.heads, width // self.heads)  # (B, T, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        out = _attend(q, k, v, causal=causal)  # (B, heads, T, head_dim)
        return out.transpose(1, 2).reshape(batch, seq, width)  # (B, T, C)

    def forward_packed(self, x: torch.Tensor, index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """Causal attention over sequences packed token by token: ``x`` (N, C) holds the tokens of a
        ``(batch, seq)`` batch at the flat positions ``index`` (N,), each row's tokens a prefix of it.
        Returns (N, C), equal to ``forward(causal=True)`` on the padded batch there: a padded slot is
        zero and comes after every real token of its row, so no real query sees it."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, 3C)
        qkv = _unpack_rows(qkv, index, batch * seq).view(batch, seq, qkv.shape[-1])  # (B, T, 3C)
        out = self._attend_projected(qkv, causal=True).view(batch * seq, x.shape[-1])[index]  # (N, C): real tokens
        return self.out_proj(out)

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The attention output at one position per row, ``(B, 1, C)``: keys and values of every token
        of ``x`` (B, T, C), attention only for the queries at ``positions`` (B,). Equals
        ``forward(x, causal)`` there."""
        batch, seq, width = x.shape
        head_dim = width // self.heads
        rows = torch.arange(batch, device=x.device)
        if builds_graph(x, self.in_proj_weight):
            # Training: queries projected at the pooled positions only (no zero-filled gradient of
            # the other tokens' queries either); split, not sliced, so backward concatenates.
            w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
            b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
            q = F.linear(x[rows, positions], w_q, b_q).view(batch, self.heads, 1, head_dim)  # (B, heads, 1, head_dim)
            kv = F.linear(x, w_kv, b_kv).view(batch, seq, 2, self.heads, head_dim)  # (B, T, 2, heads, head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # views, each (B, heads, T, head_dim)
        else:
            # Inference and export: one projection with the whole fused weight (exported graphs keep
            # one quantisable MatMul per block), queries then read at the pooled positions only.
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
            qkv = qkv.view(batch, seq, 3, self.heads, head_dim)  # (B, T, 3, heads, head_dim)
            q = qkv[rows, positions, 0].unsqueeze(2)  # (B, heads, 1, head_dim)
            k, v = qkv[:, :, 1:].permute(2, 0, 3, 1, 4).unbind(0)  # views, each (B, heads, T, head_dim)
        mask = None
        if causal:  # the query at position p sees keys 0..p, as row p of the causal mask
            mask = (torch.arange(seq, device=x.device) <= positions[:, None]).view(batch, 1, 1, seq)  # (B, 1, 1, T)
        out = _attend(q, k, v, mask=mask)  # (B, heads, 1, head_dim)
        return self.out_proj(out.reshape(batch, 1, width))  # (B, 1, C)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False, pool_at: "torch.Tensor | None" = None,
                packing: "tuple[torch.Tensor, int, int] | None" = None) -> torch.Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``; with ``pool_at`` (B,) positions, only those tokens' outputs
        ``(B, 1, C)``, computed without the other tokens' attention and MLP (exact: nothing else reads them).

        ``packing`` = (index, B, T): ``x`` is ``(N, C)``, the tokens at flat positions ``index`` of a
        causal ``(B, T)`` batch (see ``Attention.forward_packed``), and so is the output; with
        ``pool_at`` the batch is unpacked (zeros at padding) for the pooled block."""
        if packing is not None:
            index, batch, seq = packing
            if pool_at is None:
                x = x + self.attn.forward_packed(self.ln_1(x), index, batch, seq)
                return x + run_mlp(self.mlp, self.ln_2(x))
            x = _unpack_rows(x, index, batch * seq).view(batch, seq, x.shape[-1])  # (B, T, C)
        if pool_at is None:
            x = x + self.attn(self.ln_1(x), causal=causal)
            return x + run_mlp(self.mlp, self.ln_2(x))
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_at].unsqueeze(1)  # (B, 1, C)
        pooled = pooled + self.attn.forward_at(self.ln_1(x), pool_at, causal=causal)
        return pooled + run_mlp(self.mlp, self.ln_2(pooled))


class Transformer(nn.Module):
    """A stack of residual attention blocks (``resblocks``), optionally gradient-checkpointed."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = True):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def init_weights(self) -> None:
        """OpenAI's initialisation: std scaled by width and depth."""
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, causal: bool = False, pool_at: "torch.Tensor | None" = None,
                packing: "tuple[torch.Tensor, int, int] | None" = None) -> torch.Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``, or with ``pool_at`` (B,) the ``(B, C)`` outputs at those positions
        only (the towers pool one token: the last block then skips every other token's attention and MLP).
        ``packing``: ``x`` is ``(N, C)``, packed causal tokens (see ``ResidualAttentionBlock.forward``)."""
        last = len(self.resblocks) - 1
        for index, block in enumerate(self.resblocks):
            at = pool_at if index == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, at, packing, use_reentrant=False)
            else:
                x = block(x, causal=causal, pool_at=at, packing=packing)
        return x if pool_at is None or last < 0 else x.squeeze(1)  # (B, C) when pooled
