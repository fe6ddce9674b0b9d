"""The training step's exact shortcuts: QuickGELU's one-kernel backward, and the towers' last block
computed only at the pooled token (class token / end-of-text), explicit attention for short CPU
sequences. Each is checked against the plain
formulation it replaces (every token through every block, then pick the pooled one; autograd of
``x * sigmoid(1.702 x)``), values and every parameter gradient."""
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.loss import Objective
from clipforge.models.layers import _CPU_EXPLICIT_ATTENTION_MAX_TOKENS, QuickGELU, Transformer, _attend


def _plain_quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def test_quick_gelu_forward_is_bitwise_the_formula_and_backward_its_derivative():
    torch.manual_seed(0)
    x = (torch.randn(64, 300) * 4).requires_grad_()  # includes large |x|, where sigmoid saturates
    ours = QuickGELU()(x)
    assert torch.equal(ours, _plain_quick_gelu(x.detach()))
    grad = torch.randn_like(x)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (plain_grad,) = torch.autograd.grad(_plain_quick_gelu(x), x, grad)
    assert (ours_grad - plain_grad).abs().max() <= 1e-6 * max(1.0, plain_grad.abs().max().item())
    double = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (double,))


def test_quick_gelu_without_grad_takes_the_plain_path():
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert QuickGELU()(x.requires_grad_()).grad_fn is None


def _reference_pooled(transformer: Transformer, x, causal, positions):
    """Every block over every token, then the token at ``positions``: the formulation replaced
    (the MLP through its modules, not the fused training function)."""
    for block in transformer.resblocks:
        x = x + block.attn(block.ln_1(x), causal=causal)
        x = x + block.mlp(block.ln_2(x))
    return x[torch.arange(x.shape[0]), positions]  # (B, C)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_pooled_last_block_equals_full_blocks_values_and_gradients(causal, checkpointing):
    torch.manual_seed(0)
    transformer = Transformer(width=32, layers=3, heads=4).double()
    transformer.init_weights()
    transformer.grad_checkpointing = checkpointing
    x = torch.randn(5, 9, 32, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([8, 0, 3, 8, 5]) if causal else torch.zeros(5, dtype=torch.long)
    grad_out = torch.randn(5, 32, dtype=torch.float64)

    def run(forward):
        transformer.zero_grad()
        x.grad = None
        out = forward()
        out.backward(grad_out)
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in transformer.named_parameters()}

    fast = run(lambda: transformer(x, causal=causal, pool_at=positions))
    slow = run(lambda: _reference_pooled(transformer, x, causal, positions))
    assert fast[0].shape == (5, 32)
    with torch.no_grad():  # inference: the fused query/key/value projection, read at the pooled rows
        torch.testing.assert_close(transformer(x, causal=causal, pool_at=positions), slow[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=1e-12)
    assert fast[2].keys() == slow[2].keys()
    for name in slow[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], rtol=0, atol=1e-12, msg=name)


def _reference_features(model, images, tokens):
    """OpenAI's encode_image / encode_text: all tokens through all blocks, pooled afterwards."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (N, grid*grid, width)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = _reference_pooled(visual.transformer, visual.ln_pre(x), False, torch.zeros(x.shape[0], dtype=torch.long))
    image_features = visual.ln_post(x) @ visual.proj
    eot = tokens.argmax(dim=-1)
    t = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[1]]
    t = _reference_pooled(model.transformer, t, True, eot)
    return image_features, model.ln_final(t) @ model.text_projection


def test_model_training_loss_and_gradients_equal_the_full_token_formulation(monkeypatch):
    import clipforge.models.clip as clip_module

    monkeypatch.setattr(clip_module, "MIN_GROUP_SAVING_FLOPS", 0.0)  # length groups on, as in large towers
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").double().train()
    images = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    tokens = clipforge.tokenize(["a dog", "a red apple on a table", "two cats", "a very long caption about a "
                                 "bicycle leaning on a wall", "x", "a frog"], context_length=model.context_length)
    objective = Objective("clip").double()

    def run(features):
        model.zero_grad()
        image_features, text_features = features()
        loss = objective(image_features, text_features, model.logit_scale)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = run(lambda: (model.encode_image(images), model.encode_text(tokens)))
    slow = run(lambda: _reference_features(model, images, tokens[:, : int(tokens.argmax(-1).max()) + 1]))
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-12)
    assert fast[1].keys() == slow[1].keys() and len(fast[1]) == len(list(model.parameters()))
    for name in slow[1]:
        _assert_grad_close(fast[1][name], slow[1][name], name)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_cpu_attention_equals_sdpa_values_and_gradients(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None if causal else torch.rand(3, 1, 1, 17) < 0.7
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    grad = torch.randn(3, 4, 17, 8, dtype=torch.float64)
    outputs = []
    for attend in (_attend, lambda *a, **kw: F.scaled_dot_product_attention(*a, attn_mask=kw["mask"],
                                                                           is_causal=kw["causal"])):
        out = attend(q, k, v, causal=causal, mask=mask)
        outputs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    assert 17 <= _CPU_EXPLICIT_ATTENTION_MAX_TOKENS  # so the explicit path is the one compared
    for ours, reference in zip(*outputs):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_length_groups_cover_every_row_once_and_never_cost_more_padding():
    from clipforge.models.clip import length_groups

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(2, 78, (int(torch.randint(1, 200, (1,), generator=generator)),), generator=generator)
        groups = length_groups(lengths, 4)
        assert 1 <= len(groups) <= 4
        assert torch.equal(torch.cat(groups).sort().values, torch.arange(len(lengths)))
        padded = sum(int(lengths[g].max()) * len(g) for g in groups)
        assert padded <= int(lengths.max()) * len(lengths)
    import itertools

    from clipforge.models.clip import GROUP_COST

    for _ in range(30):  # the chosen groups cost the least of every split into runs of sorted lengths
        lengths = torch.randint(2, 40, (int(torch.randint(2, 12, (1,), generator=generator)),), generator=generator)
        values = sorted(set(lengths.tolist()))
        penalty = GROUP_COST * max(values) * len(lengths)

        def cost(groups):
            return sum(int(lengths[g].max()) * len(g) for g in groups) + penalty * (len(groups) - 1)

        cheapest = min(cost([torch.nonzero((lengths >= lo) & (lengths < hi)).flatten()
                             for lo, hi in zip((0, *cuts), (*cuts, 10**9))])
                       for k in range(4) for cuts in itertools.combinations(values[1:], k))
        assert cost(length_groups(lengths, 4)) == pytest.approx(cheapest)
    similar = torch.tensor([13, 14, 14, 15, 14, 13, 14, 14])  # splitting saves under 10 %: one group
    assert len(length_groups(similar, 4)) == 1
    assert [len(g) for g in length_groups(torch.tensor([5, 5, 5, 77]), 4)] == [3, 1]
    assert len(length_groups(torch.tensor([5, 77]), 1)) == 1
    assert len(length_groups(torch.tensor([5, 5, 5, 77]), 4, min_saving_tokens=1000)) == 1  # a small tower


def test_text_in_length_groups_equals_one_trimmed_batch_values_and_gradients(monkeypatch):
    import clipforge.models.clip as clip_module

    monkeypatch.setattr(clip_module, "MIN_GROUP_SAVING_FLOPS", 0.0)  # group even this tiny tower
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").double().train()
    captions = ["a very long caption about a bicycle leaning on a wall beside a red door in the rain", "x",
                "two cats on a mat", "a dog", "a small boat on a lake at dawn", "an apple", "a", "a frog"]
    tokens = clipforge.tokenize(captions, context_length=model.context_length)
    from clipforge.models.clip import length_groups

    order = torch.cat(length_groups(tokens.argmax(-1) + 1, model.text_length_groups))
    assert not torch.equal(order, order.argsort())  # several groups, in an order that is not its own inverse
    grad_out = torch.randn(len(captions), model.config.embed_dim, dtype=torch.float64)

    model.pack_text = False  # training would pack instead of grouping

    def run(groups):
        model.text_length_groups = groups
        model.zero_grad()
        out = model.encode_text(tokens)
        out.backward(grad_out)
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    encode = model._encode_tokens
    monkeypatch.setattr(model, "_encode_tokens", lambda *a, **k: calls.append(a[0].shape) or encode(*a, **k))
    grouped, whole = run(4), run(1)
    assert len(calls) == 3 + 1 and len({shape[1] for shape in calls[:3]}) == 3  # three trimmed groups, then one
    torch.testing.assert_close(grouped[0], whole[0], rtol=0, atol=1e-12)
    assert grouped[1].keys() == whole[1].keys()
    for name in whole[1]:
        _assert_grad_close(grouped[1][name], whole[1][name], name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_text_equals_one_trimmed_batch_values_and_gradients(monkeypatch, checkpointing):
    import clipforge.models.clip as clip_module

    monkeypatch.setattr(clip_module, "MIN_GROUP_SAVING_FLOPS", 0.0)  # pack even this tiny tower
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").double().train()
    model.set_grad_checkpointing(checkpointing)
    captions = ["a very long caption about a bicycle leaning on a wall beside a red door in the rain", "x",
                "two cats on a mat", "a dog", "a small boat on a lake at dawn", "an apple", "a", "a frog"]
    tokens = clipforge.tokenize(captions, context_length=model.context_length)
    grad_out = torch.randn(len(captions), model.config.embed_dim, dtype=torch.float64)
    packed_calls = []
    encode = model._encode_tokens

    def record(tokens, eot_positions, packed=False):
        if packed:
            packed_calls.append(tokens.shape)
        return encode(tokens, eot_positions, packed=packed)

    monkeypatch.setattr(model, "_encode_tokens", record)

    def run(pack):
        model.pack_text = pack
        model.text_length_groups = 1
        model.zero_grad()
        out = model.encode_text(tokens)
        out.backward(grad_out)
        return out.detach(), {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}

    packed, padded = run(True), run(False)
    assert packed_calls == [(len(captions), int(tokens.argmax(-1).max()) + 1)]  # packed once, trimmed first
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-12)
    assert packed[1].keys() == padded[1].keys() and "token_embedding.weight" in padded[1]
    for name in padded[1]:
        _assert_grad_close(packed[1][name], padded[1][name], name)


def test_text_packs_only_when_training_a_tower_worth_it(monkeypatch):
    import clipforge.models.clip as clip_module

    model = clipforge.create_model("tiny-vit").train()
    tokens = clipforge.tokenize(["a long caption with many words in it to pad the others", "a", "b"],
                                context_length=model.context_length)
    lengths = tokens.argmax(-1) + 1
    flops = 24 * model.config.text.width ** 2 * model.config.text.layers
    assert not model._packs_text(lengths, int(lengths.max()), flops)  # the padding saves less than MIN_GROUP_SAVING_FLOPS
    monkeypatch.setattr(clip_module, "MIN_GROUP_SAVING_FLOPS", 0.0)
    assert model._packs_text(lengths, int(lengths.max()), flops)
    with torch.no_grad():
        assert not model._packs_text(lengths, int(lengths.max()), flops)  # inference runs length groups
    assert not model._packs_text(torch.tensor([5, 5, 5]), 5, flops)  # nothing to drop
    model.lock_text_tower()
    assert not model._packs_text(lengths, int(lengths.max()), flops)  # a frozen text tower builds no graph


def _assert_grad_close(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Float64 gradients equal to 1e-12; LayerNorm's to float32 rounding, as it computes in fp32
    (OpenAI's LayerNorm) and rows in other groups change the order of its sums."""
    atol = 2e-6 * reference.abs().max().item() if ".ln_" in f".{name}" else 1e-12
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=atol, msg=name)
