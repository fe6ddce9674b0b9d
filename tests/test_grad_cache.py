"""contrastive_step with chunks gives the gradients of one forward/backward over the whole batch."""
import copy

import pytest
import torch
import torch.nn as nn

import clipforge
from clipforge.loss import contrastive_loss, sigmoid_loss
from clipforge.train.grad_cache import contrastive_step

pytestmark = pytest.mark.slow  # full training steps and traced models: left out of -m 'not slow'

SOT, EOT = 49406, 49407


def _batch(n: int, seed: int, image_size: int = 64, context_length: int = 77):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=generator)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(1, 12, (1,), generator=generator))
        tokens[row, 0] = SOT
        tokens[row, 1 : length + 1] = torch.randint(1, 40000, (length,), generator=generator)
        tokens[row, length + 1] = EOT
    return images, tokens


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return clipforge.create_model("tiny-vit")


def _clip_loss_of(model):
    return lambda image_features, text_features: contrastive_loss(image_features, text_features, model.logit_scale)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        error = (actual[name] - expected[name]).abs().max().item()
        size = expected[name].abs().max().item()
        assert error <= rel * max(size, 1e-6), f"{name}: max abs error {error:.3g}, max |grad| {size:.3g}"


def _full_batch_grads(model, images, tokens, loss_of):
    """The reference: one ordinary forward and backward over the whole batch."""
    loss = loss_of(model)(model.encode_image(images), model.encode_text(tokens))
    loss.backward()
    return loss.detach(), _grads(model)


def test_chunked_step_matches_full_batch_step():
    model = _tiny_model()
    images, tokens = _batch(12, seed=1)
    reference = copy.deepcopy(model)
    expected_loss, expected = _full_batch_grads(reference, images, tokens, _clip_loss_of)
    loss, stats = contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=5)
    assert stats["chunks"] == 3
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert "logit_scale" in expected
    _assert_same_grads(_grads(model), expected)


def test_chunked_step_matches_full_batch_step_with_sigmoid_loss_and_bias():
    model = _tiny_model()
    model.logit_bias = nn.Parameter(torch.tensor(-10.0))  # SigLIP's learnable bias
    images, tokens = _batch(10, seed=2)

    def loss_of(m):
        return lambda i, t: sigmoid_loss(i, t, m.logit_scale, m.logit_bias, tile_size=4)

    reference = copy.deepcopy(model)
    _, expected = _full_batch_grads(reference, images, tokens, loss_of)
    contrastive_step(model, images, tokens, loss_of(model), chunk_size=3)
    assert "logit_bias" in expected
    _assert_same_grads(_grads(model), expected)


def test_gradients_accumulate_and_one_chunk_runs_a_plain_step():
    model = _tiny_model()
    images, tokens = _batch(6, seed=3)
    reference = copy.deepcopy(model)
    _, expected = _full_batch_grads(reference, images, tokens, _clip_loss_of)
    _, stats = contrastive_step(model, images, tokens, _clip_loss_of(model))  # chunk_size=None
    assert stats["chunks"] == 1
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=4)
    _assert_same_grads(_grads(model), {name: 2 * g for name, g in expected.items()})


def test_gradient_checkpointing_and_chunking_compose():
    model = _tiny_model()
    images, tokens = _batch(9, seed=4)
    reference = copy.deepcopy(model)
    _, expected = _full_batch_grads(reference, images, tokens, _clip_loss_of)
    model.set_grad_checkpointing(True)
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=4)
    _assert_same_grads(_grads(model), expected)


def _chunked_with_grad_grads(model, images, tokens, chunk_size, loss_of, autocast_dtype=None):
    """Reference drawing random numbers as the step does: chunk by chunk, image then text."""
    def autocast():  # one region per forward: autocast's cache of bf16 weights is per region
        return torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

    image_chunks, text_chunks = [], []
    for start in range(0, images.shape[0], chunk_size):
        with autocast():
            image_chunks.append(model.encode_image(images[start : start + chunk_size]))
        with autocast():
            text_chunks.append(model.encode_text(tokens[start : start + chunk_size]))
    loss_of(model)(torch.cat(image_chunks), torch.cat(text_chunks)).backward()
    return _grads(model)


def test_bf16_autocast_step_matches_the_same_chunks_run_with_gradients():
    model = _tiny_model()
    images, tokens = _batch(8, seed=5)
    reference = copy.deepcopy(model)
    expected = _chunked_with_grad_grads(reference, images, tokens, 3, _clip_loss_of, torch.bfloat16)
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=3, autocast_dtype=torch.bfloat16)
    _assert_same_grads(_grads(model), expected)


class _DropoutTowers(nn.Module):
    """Two small towers with dropout, so the second pass must replay the first pass's masks."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 16))
        self.token_embedding = nn.Embedding(100, 16)
        self.text_head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 16))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, tokens):
        return self.text_head(self.token_embedding(tokens).mean(dim=1))  # (N, L, 16) -> (N, 16)


def test_dropout_masks_are_replayed_and_the_rng_advances_once():
    torch.manual_seed(0)
    model = _DropoutTowers()
    images, tokens = torch.randn(10, 3, 8, 8), torch.randint(0, 100, (10, 5))
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    expected = _chunked_with_grad_grads(reference, images, tokens, 4, _clip_loss_of)
    state_after_reference = torch.get_rng_state()
    torch.manual_seed(123)
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=4)
    _assert_same_grads(_grads(model), expected)
    assert torch.equal(torch.get_rng_state(), state_after_reference)


def test_locked_image_tower_gets_no_gradient_and_text_gradients_stay_exact():
    model = _tiny_model()
    model.lock_image_tower()
    images, tokens = _batch(8, seed=6)
    reference = copy.deepcopy(model)
    _, expected = _full_batch_grads(reference, images, tokens, _clip_loss_of)
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=3)
    grads = _grads(model)
    assert not any(name.startswith("visual.") for name in grads)
    _assert_same_grads(grads, expected)


def test_batchnorm_running_statistics_are_updated_once():
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-rn")
    images, tokens = _batch(8, seed=7)
    expected = copy.deepcopy(model)
    with torch.no_grad():  # what the first pass alone does to the running statistics
        for start in range(0, 8, 3):
            expected.encode_image(images[start : start + 3])
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=3)
    for (name, buffer), expected_buffer in zip(model.named_buffers(), expected.buffers()):
        assert torch.equal(buffer, expected_buffer), name


def test_scale_loss_scales_every_gradient():
    model = _tiny_model()
    images, tokens = _batch(6, seed=8)
    reference = copy.deepcopy(model)
    contrastive_step(reference, images, tokens, _clip_loss_of(reference), chunk_size=4)
    contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=4, scale_loss=lambda loss: 8 * loss)
    _assert_same_grads(_grads(model), {name: 8 * g for name, g in _grads(reference).items()})


def test_bad_arguments_raise_naming_the_value():
    model = _tiny_model()
    images, tokens = _batch(4, seed=9)
    with pytest.raises(ValueError, match="4 and 3"):
        contrastive_step(model, images, tokens[:3], _clip_loss_of(model), chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_step(model, images, tokens, _clip_loss_of(model), chunk_size=0)
    with pytest.raises(ValueError, match="encode_image"):
        contrastive_step(nn.Linear(2, 2), images, tokens, _clip_loss_of(model), chunk_size=2)
