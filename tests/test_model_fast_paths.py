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
    """Every block over every token, then the token at ``positions``: the formulation replaced."""
    for block in transformer.resblocks:
        x = block(x, causal=causal)
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


def test_model_training_loss_and_gradients_equal_the_full_token_formulation():
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
        torch.testing.assert_close(fast[1][name], slow[1][name], rtol=1e-9, atol=1e-12, msg=name)


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
