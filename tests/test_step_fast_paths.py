"""The training step's exact shortcuts around the matrix multiplies: the fused QuickGELU MLP, the
patch embedding as one matrix multiply, sparse token-embedding gradients added into a dense
buffer, and the gradient norm measured without a pass that multiplies by 1. Each against the
formulation it replaces, values and gradients in float64."""
import pytest
import torch

import clipforge
from clipforge.models.layers import ResidualAttentionBlock, _fused_mlp_applies, run_mlp
from clipforge.train.optim import gradient_norm_, sparse_token_gradients


def _grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("needs", ["all", "weights", "input"])
def test_fused_quick_gelu_mlp_equals_the_modules_values_and_gradients(needs):
    torch.manual_seed(0)
    mlp = ResidualAttentionBlock(16, 2).double().mlp
    weights = list(mlp.parameters())
    for weight in weights:
        weight.requires_grad_(needs != "input")
    x = (torch.randn(3, 5, 16, dtype=torch.float64) * 3).requires_grad_(needs != "weights")
    grad_out = torch.randn(3, 5, 16, dtype=torch.float64)
    assert _fused_mlp_applies(x, mlp)
    results = []
    for forward in (lambda: run_mlp(mlp, x), lambda: mlp(x)):
        x.grad = None
        for weight in weights:
            weight.grad = None
        out = forward()
        out.backward(grad_out)
        results.append((out.detach(), _grads([x, *weights])))
    (fused, fused_grads), (plain, plain_grads) = results
    assert fused.shape == (3, 5, 16)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    for ours, reference in zip(fused_grads, plain_grads):
        assert (ours is None) == (reference is None)
        if reference is not None:
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_fused_mlp_stands_aside_for_inference_autocast_and_exact_gelu():
    mlp = ResidualAttentionBlock(16, 2).mlp
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        assert not _fused_mlp_applies(x, mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fused_mlp_applies(x, mlp)
    assert not _fused_mlp_applies(x, ResidualAttentionBlock(16, 2, quick_gelu=False).mlp)
    assert not _fused_mlp_applies(x.double(), mlp)  # weights of another dtype: the module casts
    assert _fused_mlp_applies(x, mlp)


def test_patch_embedding_as_a_matrix_multiply_equals_the_convolution():
    torch.manual_seed(0)
    visual = clipforge.create_model("tiny-vit").double().visual
    size = visual.input_resolution
    images = torch.randn(3, 3, size, size, dtype=torch.float64)
    grad_out = torch.randn(3, (size // visual.conv1.kernel_size[0]) ** 2, visual.conv1.out_channels, dtype=torch.float64)
    results = []
    for pixels in (images, images.contiguous(memory_format=torch.channels_last)):
        for forward in (visual._embed_patches, lambda p: visual.conv1(p).flatten(2).transpose(1, 2)):
            visual.conv1.weight.grad = None
            tokens = forward(pixels)
            tokens.backward(grad_out)
            results.append((tokens.detach(), visual.conv1.weight.grad.clone()))
    reference = results[1]
    for tokens, weight_grad in results:
        torch.testing.assert_close(tokens, reference[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(weight_grad, reference[1], rtol=0, atol=1e-12)
    with torch.no_grad():  # inference keeps the convolution (exported graphs are unchanged)
        torch.testing.assert_close(visual._embed_patches(images), reference[0], rtol=0, atol=1e-12)


def _train_steps(model, images, tokens, steps=3, chunks=2):
    """``steps`` AdamW steps, each accumulating ``chunks`` backwards; parameters and the embedding
    gradient's storage after each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for rows in torch.arange(len(tokens)).chunk(chunks):
            logits, _ = model(images[rows], tokens[rows])
            logits.logsumexp(1).sum().backward()
        grad = model.token_embedding.weight.grad
        assert not grad.is_sparse and grad.shape == model.token_embedding.weight.shape
        history.append((grad.clone(), grad.data_ptr()))
        optimizer.step()
    return history, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sparse_token_gradients_equal_the_dense_backward_over_steps_and_chunks():
    torch.manual_seed(0)
    dense = clipforge.create_model("tiny-vit").double().train()
    sparse = clipforge.create_model("tiny-vit").double().train()
    sparse.load_state_dict(dense.state_dict())
    sparse_token_gradients(sparse)
    images = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    # Different words in each chunk and step: rows a later chunk touches must be summed, and rows
    # of the previous step cleared.
    tokens = clipforge.tokenize(["a dog", "two cats on a mat", "x", "a frog", "a red apple", "the dog and the frog"],
                                context_length=dense.context_length)
    dense_history, dense_params = _train_steps(dense, images, tokens)
    sparse_history, sparse_params = _train_steps(sparse, images, tokens)
    for (ours, _), (reference, _) in zip(sparse_history, dense_history):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert len({pointer for _, pointer in sparse_history}) == 1  # one buffer, never reallocated
    for name, reference in dense_params.items():
        torch.testing.assert_close(sparse_params[name], reference, rtol=0, atol=1e-12, msg=name)


def test_sparse_token_gradients_leave_a_frozen_text_tower_alone():
    model = clipforge.create_model("tiny-vit")
    model.lock_text_tower()
    sparse_token_gradients(model)
    assert not model.token_embedding.sparse


@pytest.mark.parametrize("max_norm", [None, 0.0, 1e9, 0.5])
def test_gradient_norm_equals_clip_grad_norm_and_only_scales_when_clipping(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(7, 3), (5,), (2, 2, 2)]]
    params.append(torch.nn.Parameter(torch.randn(4)))  # no gradient: left out of the norm, as torch does
    for p in params[:3]:
        p.grad = torch.randn_like(p) * 3
    before = [p.grad.clone() for p in params[:3]]
    reference = [p.detach().clone().requires_grad_() for p in params]
    for ours, theirs in zip(params[:3], reference):
        theirs.grad = ours.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm or float("inf"))

    norm = gradient_norm_(params, max_norm)
    assert float(norm) == float(expected) > 0.5
    for ours, theirs, old in zip(params, reference, before):
        assert torch.equal(ours.grad, theirs.grad)
        if max_norm == 0.5:
            assert not torch.equal(ours.grad, old)  # clipped: the norm is above 0.5
        else:
            assert torch.equal(ours.grad, old)
    assert params[3].grad is None
    if max_norm == 0.5:
        assert float(torch.nn.utils.get_total_norm([p.grad for p in params[:3]])) == pytest.approx(0.5, rel=1e-5)
