"""The tiled losses equal the naive N x N formulation: values and all gradients, any N and tile."""
import math

import pytest
import torch

from clipforge.loss import (
    LOGIT_SCALE_MAX,
    ClipLoss,
    SigLipLoss,
    clamp_logit_scale_,
    contrastive_loss,
    naive_contrastive_loss,
    naive_sigmoid_loss,
    sigmoid_loss,
)


def _pairs(n: int, dim: int, seed: int, dtype=torch.float32, noise: float = 0.8):
    """Image/text rows; ``noise`` < ~1 makes matching pairs stand out, large values make them random."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=generator, dtype=dtype)
    text = image + noise * torch.randn(n, dim, generator=generator, dtype=dtype)
    return image.requires_grad_(), text.requires_grad_()


def _value_and_grads(loss_fn, *inputs):
    loss = loss_fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, floor: float = 0.0) -> None:
    """Max abs error <= rel x max(max |expected|, floor); ``floor`` scales all-zero expectations."""
    error = (actual.double() - expected.double()).abs().max().item()
    size = expected.double().abs().max().item()
    assert error <= rel * max(size, floor), f"max abs error {error:.3g} > {rel} x max |expected| {size:.3g}"


def _fp64(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


CASES = [  # (N, tile): N below, at, not divisible by and a multiple of the tile; tile of 1
    (1, 4), (5, 8), (8, 8), (37, 8), (64, 16), (13, 1), (100, 33),
]


# Two references: the naive loss in fp32 (the same arithmetic, so equal within 1e-5 even where a
# saturated softmax leaves gradients at the fp32 noise floor) and the naive loss in fp64 (the
# truth, on unrelated pairs). Against fp64, a gradient that cancels to below 1e-2 (the logit
# scale's, at scale 1) is held to 1e-7 absolute: fp32 summands of size 1 allow no better.
def _grad_floor(n: int, reference: str) -> float:
    return 1.0 if n == 1 else {"fp32": 1e-6, "fp64": 1e-2}[reference]


@pytest.mark.parametrize("n,tile", CASES)
@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07), LOGIT_SCALE_MAX])
@pytest.mark.parametrize("noise,reference", [(0.8, "fp32"), (100.0, "fp64")])
def test_contrastive_loss_matches_naive_values_and_grads(n, tile, logit_scale, noise, reference):
    image, text = _pairs(n, 12, seed=n + tile, noise=noise)
    scale = torch.tensor(logit_scale, requires_grad=True)
    loss, grads = _value_and_grads(lambda i, t, s: contrastive_loss(i, t, s, tile_size=tile), image, text, scale)
    inputs = [image, text, scale] if reference == "fp32" else _fp64([image, text, scale])
    expected_loss, expected_grads = _value_and_grads(naive_contrastive_loss, *inputs)
    _assert_rel_close(loss, expected_loss, floor=1.0)  # N = 1: the loss is 0
    for grad, expected in zip(grads, expected_grads):
        _assert_rel_close(grad, expected, floor=_grad_floor(n, reference))


@pytest.mark.parametrize("n,tile", CASES)
@pytest.mark.parametrize("logit_scale,logit_bias", [(math.log(10), -10.0), (0.0, 0.0), (LOGIT_SCALE_MAX, 3.0)])
@pytest.mark.parametrize("noise,reference", [(0.8, "fp32"), (100.0, "fp64")])
def test_sigmoid_loss_matches_naive_values_and_grads(n, tile, logit_scale, logit_bias, noise, reference):
    image, text = _pairs(n, 12, seed=n * tile, noise=noise)
    scale = torch.tensor(logit_scale, requires_grad=True)
    bias = torch.tensor(logit_bias, requires_grad=True)
    loss, grads = _value_and_grads(
        lambda i, t, s, b: sigmoid_loss(i, t, s, b, tile_size=tile), image, text, scale, bias
    )
    inputs = [image, text, scale, bias] if reference == "fp32" else _fp64([image, text, scale, bias])
    expected_loss, expected_grads = _value_and_grads(naive_sigmoid_loss, *inputs)
    _assert_rel_close(loss, expected_loss, floor=1.0)
    for grad, expected in zip(grads, expected_grads):
        _assert_rel_close(grad, expected, floor=_grad_floor(n, reference))


def test_gradcheck_in_double_precision():
    image, text = _pairs(11, 5, seed=0, dtype=torch.float64)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: contrastive_loss(i, t, s, tile_size=4), (image, text, scale))
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: sigmoid_loss(i, t, s, b, tile_size=3), (image, text, scale, bias)
    )


def test_rows_far_below_the_global_maximum_stay_exact_at_large_scale():
    # Image 0 is anti-aligned with every text: its logits sit 2 x scale below the rest, a range
    # that a single shared exponent shift would underflow in fp32.
    image, text = _pairs(9, 6, seed=3)
    with torch.no_grad():
        text[:, 0] = text[:, 0].abs() + 3.0
        image[0] = 0.0
        image[0, 0] = -1.0
    scale = torch.tensor(6.0, requires_grad=True)  # exp(6) = 403, beyond the usual clamp
    loss, grads = _value_and_grads(lambda i, t, s: contrastive_loss(i, t, s, tile_size=4), image, text, scale)
    exact_loss, exact_grads = _value_and_grads(naive_contrastive_loss, *_fp64([image, text, scale]))
    assert torch.isfinite(loss)
    _assert_rel_close(loss, exact_loss, floor=1.0)
    for grad, exact in zip(grads, exact_grads):
        _assert_rel_close(grad, exact)


def test_bf16_autocast_inputs_are_computed_in_fp32():
    image, text = _pairs(40, 16, seed=1)
    image_bf16, text_bf16 = image.detach().bfloat16(), text.detach().bfloat16()
    scale = torch.tensor(2.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(image_bf16, text_bf16, scale, tile_size=16)
        siglip = sigmoid_loss(image_bf16, text_bf16, scale, -5.0, tile_size=16)
    assert loss.dtype == torch.float32 and siglip.dtype == torch.float32
    _assert_rel_close(loss, naive_contrastive_loss(image_bf16.float(), text_bf16.float(), scale))
    _assert_rel_close(siglip, naive_sigmoid_loss(image_bf16.float(), text_bf16.float(), scale, -5.0))


def test_frozen_text_features_get_no_gradient_and_images_stay_exact():
    image, text = _pairs(21, 8, seed=2)
    text = text.detach()
    grad = torch.autograd.grad(contrastive_loss(image, text, 2.0, tile_size=8), image)[0]
    expected = torch.autograd.grad(naive_contrastive_loss(image, text, 2.0), image)[0]
    _assert_rel_close(grad, expected)


def test_already_normalised_inputs_and_normalize_false_agree():
    image, text = _pairs(17, 8, seed=4)
    unit_image, unit_text = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    a = contrastive_loss(image, text, 1.0)
    b = contrastive_loss(unit_image, unit_text, 1.0)
    c = contrastive_loss(unit_image, unit_text, 1.0, normalize=False)
    _assert_rel_close(a, b)
    _assert_rel_close(a, c)


def test_modules_equal_the_papers_formulas():
    """The modules against the loss written out here (not against the functions they wrap)."""
    image, text = _pairs(10, 8, seed=5)
    unit_image = torch.nn.functional.normalize(image.double(), dim=-1)
    unit_text = torch.nn.functional.normalize(text.double(), dim=-1)
    logits = math.exp(1.5) * unit_image @ unit_text.t()  # (10, 10)
    labels = torch.arange(10)
    clip = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    _assert_rel_close(ClipLoss(tile_size=4)(image, text, 1.5), clip.float())
    signs = 2 * torch.eye(10, dtype=torch.float64) - 1  # +1 on matching pairs, -1 elsewhere
    sigmoid = -torch.nn.functional.logsigmoid(signs * (logits - 2.0)).sum() / 10
    _assert_rel_close(SigLipLoss(tile_size=4)(image, text, 1.5, -2.0), sigmoid.float())


def test_clamp_logit_scale_caps_the_scale_at_100():
    logit_scale = torch.nn.Parameter(torch.tensor(5.0))
    clamp_logit_scale_(logit_scale)
    assert logit_scale.item() == pytest.approx(math.log(100.0))
    assert logit_scale.exp().item() == pytest.approx(100.0)


def test_bad_inputs_raise_with_the_shapes():
    image = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3, 8\)"):
        contrastive_loss(image, torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="tile_size"):
        contrastive_loss(image, image, 1.0, tile_size=0)
    with pytest.raises(ValueError, match="logit_bias"):
        sigmoid_loss(image, image, 1.0, torch.zeros(2))
