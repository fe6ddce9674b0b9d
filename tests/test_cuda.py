"""CUDA: reference parity in fp32, fp16/bf16 autocast inference of full-size models, the trimmed
text tower, the chunked training step and zero-shot evaluation on the GPU. Skipped without CUDA
(see conftest); run on a lent GPU machine by ``tools/gpu_check.sh``."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _eval_helpers import make_color_folder
from _model_fixtures import load_openclip_fixture

import clipforge
from clipforge.evaluate import evaluate_zeroshot, load_classification_data
from clipforge.loss import contrastive_loss
from clipforge.tokenizer import tokenize
from clipforge.train.grad_cache import contrastive_step

pytestmark = pytest.mark.gpu

CAPTIONS = ["a photo of a dog", "two cats sleeping on a red couch next to a remote control",
            "a plate of food with broccoli, rice and grilled chicken", ""]


@pytest.fixture
def no_tf32():
    """fp32 parity needs true fp32 matrix products and convolutions (cuDNN allows TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_open_clip_fixture_parity_in_fp32_on_cuda(family, no_tf32):
    model, ref = load_openclip_fixture(family)
    model = model.cuda()
    with torch.no_grad():
        image_features = model.encode_image(ref["images"].cuda()).cpu()
        text_features = model.encode_text(ref["tokens"].cuda()).cpu()
    # The CPU test holds 1e-5; GPU kernels sum in another order.
    assert (image_features - ref["image_features"]).abs().max() <= 1e-4
    assert (text_features - ref["text_features"]).abs().max() <= 1e-4


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize("name", ["ViT-B/32", "RN50", "ViT-L/14"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_inference_of_full_size_models_stays_close_to_fp32(name, dtype, no_tf32):
    torch.manual_seed(0)
    model = clipforge.create_model(name).cuda().eval()
    size = model.config.vision.image_size
    images = torch.randn(4, 3, size, size, device="cuda")
    tokens = tokenize(CAPTIONS).cuda()
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(images), model.encode_text(tokens)
        with torch.autocast("cuda", dtype=dtype):
            image, text = model.encode_image(images), model.encode_text(tokens)
            logits_per_image, _ = model(images, tokens)
    assert image.dtype == text.dtype == dtype
    assert torch.isfinite(image).all() and torch.isfinite(text).all() and torch.isfinite(logits_per_image).all()
    floor = 0.999 if dtype == torch.float16 else 0.99  # bf16 keeps 8 bits of mantissa, fp16 11
    assert _cosines(image, ref_image).min() >= floor
    assert _cosines(text, ref_text).min() >= floor


def test_trimmed_text_tower_equals_full_length_on_cuda(no_tf32):
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-B/32").cuda().eval()
    tokens = tokenize(CAPTIONS).cuda()
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.trim_text = False
        full = model.encode_text(tokens)
    assert (trimmed - full).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_step_on_cuda_matches_the_direct_step(dtype, no_tf32):
    torch.manual_seed(0)
    chunked = clipforge.create_model("tiny-vit").cuda()
    direct = copy.deepcopy(chunked)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 64, 64, generator=generator).cuda()
    tokens = tokenize([f"a picture of thing number {i}" for i in range(24)]).cuda()
    loss, _ = contrastive_step(chunked, images, tokens, lambda i, t: contrastive_loss(i, t, chunked.logit_scale),
                               chunk_size=5, autocast_dtype=dtype)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        image_features, text_features = direct.encode_image(images), direct.encode_text(tokens)
    direct_loss = contrastive_loss(image_features, text_features, direct.logit_scale)
    direct_loss.backward()
    tolerance = 1e-4 if dtype is None else 2e-2  # bf16: chunks of 5 and the batch of 24 round differently
    assert loss.item() == pytest.approx(direct_loss.item(), rel=tolerance)
    for (name, a), b in zip(chunked.named_parameters(), direct.parameters()):
        scale = b.grad.abs().max().clamp_min(1e-8)
        assert ((a.grad - b.grad).abs().max() / scale).item() <= 10 * tolerance, name


def test_zero_shot_on_cuda_agrees_with_cpu_in_every_precision(tmp_path):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    on_gpu = copy.deepcopy(model).cuda()
    root = make_color_folder(tmp_path / "data", {"red": ["red", "red"], "blue": ["blue", "blue"]})
    data = load_classification_data(root)
    cpu = evaluate_zeroshot(model, data, templates=None, progress=False).logits
    for precision in ("fp32", "bf16", "fp16"):
        cuda = evaluate_zeroshot(on_gpu, data, templates=None, precision=precision, progress=False).logits
        atol = 1e-3 if precision == "fp32" else 0.2
        torch.testing.assert_close(cuda.float().cpu(), cpu, atol=atol, rtol=0.05)
