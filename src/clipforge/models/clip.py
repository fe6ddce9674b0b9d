"""The CLIP model: an image tower, a causal text transformer, and a learnable temperature.

Attribute names are OpenAI's, so ``model.state_dict()`` has exactly the keys (and shapes) of a
released OpenAI checkpoint: ``visual.*``, ``transformer.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection`` (width x embed) and ``logit_scale``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig, check_patch_dropout
from .layers import LayerNorm, Transformer, builds_graph
from .resnet import ModifiedResNet
from .vit import VisionTransformer

TEXT_LENGTH_GROUPS = 4  # most groups of similar caption length the text tower runs a batch in
GROUP_COST = 0.1  # each extra group must save more than 10 % of the one-group padded tokens,
MIN_GROUP_SAVING_FLOPS = 2e9  # and this much forward compute: a group costs ~20 kernel calls a layer
# (demo-rn's 2-layer, 128-wide text tower at batch 64 ran 0.83x as fast with groups; ViT-B/32's gains)


class CLIP(nn.Module):
    """Two towers mapping images and texts into one embedding space; see Radford et al. 2021."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        vision, text = config.vision, config.text
        if vision.is_resnet:
            self.visual = ModifiedResNet(vision, config.embed_dim)
        else:
            self.visual = VisionTransformer(vision, config.embed_dim, config.quick_gelu)
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        # Run the text tower only up to the last end-of-text token in the batch; exact under the
        # causal mask (later positions cannot reach the pooled one). Off for fixed-shape tracing.
        self.trim_text = True
        # With trimming, captions of very different lengths run in up to this many groups of
        # similar length, each trimmed to its own longest (exact: captions never interact).
        self.text_length_groups = TEXT_LENGTH_GROUPS
        # In training, the text tower's projections and MLPs run on the real tokens only, packed
        # (exact, see _encode_tokens); attention still sees the padded batch.
        self.pack_text = True
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation as in OpenAI's ``initialize_parameters``."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.visual.init_weights()
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; inputs are cast to it (fp16 weights take fp32 images)."""
        return self.text_projection.dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from pixels ``(N, 3, H, W)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        features = self.visual(images.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``, pooled at end-of-text."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must have shape (N, L) with L <= {self.context_length}, got {tuple(tokens.shape)}; "
                "tokenize for this model with clipforge.tokenize(texts, context_length=model.context_length)"
            )
        eot_positions = tokens.argmax(dim=-1)  # the end-of-text id is the largest id
        if not self.trim_text or tokens.shape[0] == 0:
            features = self._encode_tokens(tokens, eot_positions)
        else:
            text = self.config.text
            token_flops = 24 * text.width ** 2 * text.layers  # forward, per token: 12 width^2 weights a layer
            lengths = eot_positions + 1
            longest = int(lengths.max())
            packed = self._packs_text(lengths, longest, token_flops)
            groups = None if packed else length_groups(lengths, self.text_length_groups,
                                                       MIN_GROUP_SAVING_FLOPS / token_flops)
            if groups is None or len(groups) == 1:  # one batch trimmed to its longest caption (N, L')
                features = self._encode_tokens(tokens[:, :longest], eot_positions, packed=packed)
            else:
                parts = [self._encode_tokens(tokens[rows, : int(eot_positions[rows].max()) + 1], eot_positions[rows])
                         for rows in groups]  # each (n_g, embed_dim), trimmed to its own longest caption
                features = torch.cat(parts)[torch.cat(groups).argsort()]  # (N, embed_dim), input order
        return F.normalize(features, dim=-1) if normalize else features

    def _packs_text(self, lengths: torch.Tensor, longest: int, token_flops: float) -> bool:
        """Whether training runs this batch's captions packed (see ``_encode_tokens``): the text tower
        builds a graph, no compiler (packing has data-dependent shapes), and the padding it drops is
        worth ``MIN_GROUP_SAVING_FLOPS`` (a small tower runs faster padded)."""
        if not self.pack_text or self.transformer.layers < 1 or not builds_graph(*self.transformer.parameters()):
            return False
        padding = longest * len(lengths) - int(lengths.sum())  # tokens after the end-of-text
        return 0 < padding and padding * token_flops >= MIN_GROUP_SAVING_FLOPS and not torch.compiler.is_compiling()

    def _encode_tokens(self, tokens: torch.Tensor, eot_positions: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` of ``tokens`` (N, L) as given, pooled at ``eot_positions``.

        ``packed``: every layer's projections and MLP run on the real tokens alone (up to each
        caption's end-of-text), attention on the padded batch; exact, as nothing causally after an
        end-of-text token reaches it. Training only: length groups do the same job without a
        graph, and exported graphs keep fixed shapes."""
        batch, seq = tokens.shape
        packing = None
        if packed:
            real = torch.arange(seq, device=tokens.device) <= eot_positions[:, None]  # (N, L): up to end-of-text
            index = real.view(-1).nonzero().squeeze(1)  # (T,): flat positions n * L + t of the real tokens
            x = self.token_embedding(tokens.reshape(-1)[index]).to(self.dtype)  # (T, width)
            x = x + self.positional_embedding[index % seq].to(self.dtype)
            packing = (index, batch, seq)
        else:
            x = self.token_embedding(tokens).to(self.dtype)  # (N, L, width)
            x = x + self.positional_embedding[:seq].to(self.dtype)
        pooled = self.transformer(x, causal=True, pool_at=eot_positions, packing=packing)  # (N, width): end-of-text tokens only
        return self.ln_final(pooled) @ self.text_projection  # (N, embed_dim)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)``: scaled cosine similarities, as OpenAI's."""
        return pair_logits(self, images, tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory (both towers)."""
        self.transformer.grad_checkpointing = enable
        target = self.visual.transformer if hasattr(self.visual, "transformer") else self.visual
        target.grad_checkpointing = enable

    def set_patch_dropout(self, share: float) -> None:
        """FLIP patch dropout: drop ``share`` of each image's patch tokens in training mode (ViT only).

        Recorded in ``config.vision.patch_dropout`` so checkpoints keep it; evaluation (``eval()``)
        always sees every patch. Raises ValueError for a share outside [0, 1) or a ResNet tower.
        """
        check_patch_dropout(share, self.config.vision.is_resnet)
        if not self.config.vision.is_resnet:
            self.visual.set_patch_dropout(share)
        self.config.vision.patch_dropout = float(share)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay: gains, biases, embeddings, temperature."""
        return {
            name for name, param in self.named_parameters()
            if param.ndim < 2 or "embedding" in name or name == "logit_scale"
        }

    def lock_image_tower(self) -> None:
        """Freeze the image tower (no gradients, BatchNorm statistics kept)."""
        for param in self.visual.parameters():
            param.requires_grad_(False)
        self.image_locked = True
        self.visual.eval()

    def train(self, mode: bool = True) -> "CLIP":
        """As ``nn.Module.train``, but a locked image tower stays in eval mode."""
        super().train(mode)
        if getattr(self, "image_locked", False):
            self.visual.eval()
        return self

    def lock_text_tower(self) -> None:
        """Freeze the text tower: transformer, embeddings, final norm and projection."""
        for name, param in self.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                param.requires_grad_(False)


def length_groups(lengths: torch.Tensor, max_groups: int, min_saving_tokens: float = 0.0) -> list[torch.Tensor]:
    """Row indices of ``lengths`` (N,) in at most ``max_groups`` groups of similar length.

    The groups minimise the padded tokens (each group runs at its longest length) plus, for each
    group past the first, the larger of ``GROUP_COST`` of the one-group cost and
    ``min_saving_tokens``, so a batch of similar lengths (or a small tower) stays whole. Dynamic
    programming over the distinct lengths (at most the context length). One group: ``[arange(N)]``.
    """
    rows = torch.arange(len(lengths), device=lengths.device)
    if max_groups <= 1 or len(lengths) < 2:
        return [rows]
    values, counts = torch.unique(lengths.cpu(), sorted=True, return_counts=True)
    values, below = values.tolist(), [0, *torch.cumsum(counts, 0).tolist()]  # below[i]: rows shorter than values[i]
    penalty = max(GROUP_COST * values[-1] * below[-1], min_saving_tokens)
    if values[-1] * below[-1] - sum(v * c for v, c in zip(values, counts.tolist())) <= penalty:
        return [rows]  # even one group per length would not save one group's cost
    # best[g][j]: cheapest cost of the rows with the j shortest distinct lengths in g groups; cut[g][j]:
    # where the last of them starts. seg[i, j]: one group of distinct lengths i..j-1 (inf unless i < j).
    m = len(values)
    count_below = torch.tensor(below, dtype=torch.float64)  # (m + 1,)
    longest = torch.tensor([0.0, *values], dtype=torch.float64)  # (m + 1,): longest[j] = values[j - 1]
    seg = longest[None, :] * (count_below[None, :] - count_below[:, None])  # (m + 1, m + 1)
    seg = seg.masked_fill(~torch.ones(m + 1, m + 1, dtype=torch.bool).triu(1), math.inf)
    best = [torch.tensor([0.0] + [math.inf] * m, dtype=torch.float64)]
    cut = [torch.zeros(m + 1, dtype=torch.long)]
    for g in range(1, max_groups + 1):
        total = best[-1][:, None] + seg + (penalty if g > 1 else 0.0)  # (m + 1, m + 1): previous groups + last
        row, where = total.min(dim=0)  # (m + 1,) each
        row[0] = 0.0
        best.append(row)
        cut.append(where)
    groups_used = min(range(1, max_groups + 1), key=lambda g: (float(best[g][m]), g))
    if groups_used == 1:
        return [rows]
    edges, j = [], m
    for g in range(groups_used, 0, -1):
        j = int(cut[g][j])
        edges.append(values[j])  # the shortest length of group g
    group_of = torch.bucketize(lengths, torch.tensor(sorted(edges)[1:], device=lengths.device), right=True)  # (N,)
    return [rows[group_of == g] for g in range(groups_used) if bool((group_of == g).any())]


def pair_logits(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_per_image, logits_per_text)`` of any model with ``encode_image``, ``encode_text`` and
    ``logit_scale``: ``exp(logit_scale)`` times the cosine similarities (the ONNX model shares it)."""
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    logits_per_image = model.logit_scale.exp() * image_features @ text_features.t()  # (N_img, N_txt)
    return logits_per_image, logits_per_image.t()
