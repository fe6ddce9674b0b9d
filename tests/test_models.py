"""Architectures: exact reference layout and counts, numerical parity with open_clip, invariants."""
import json

import pytest
import torch

import clipforge
from clipforge import ClipConfig
from _model_fixtures import FIXTURES, load_openclip_fixture

OPENAI_NINE = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


def test_available_models_lists_openai_nine_first_and_small_presets():
    names = clipforge.available_models()
    assert names[:9] == OPENAI_NINE
    assert {"tiny-vit", "tiny-rn", "small-vit"} <= set(names)


@pytest.mark.parametrize("name", OPENAI_NINE)
def test_architecture_matches_reference_layout_and_parameter_count(name):
    reference = json.loads((FIXTURES / "openclip_architectures.json").read_text())[name]
    with torch.device("meta"):
        model = clipforge.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == reference["parameters"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference["state_dict"]


def test_paper_parameter_counts():
    expected = {"ViT-B/32": 151_277_313, "RN50": 102_007_137, "ViT-L/14@336px": 427_944_193}
    for name, count in expected.items():
        with torch.device("meta"):
            model = clipforge.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_embeddings_match_open_clip_within_1e5(family):
    model, ref = load_openclip_fixture(family)
    with torch.no_grad():
        image_features = model.encode_image(ref["images"])
        text_features = model.encode_text(ref["tokens"])
        logits_per_image, logits_per_text = model(ref["images"], ref["tokens"])
    assert (image_features - ref["image_features"]).abs().max() <= 1e-5
    assert (text_features - ref["text_features"]).abs().max() <= 1e-5
    assert (logits_per_image - ref["logits_per_image"]).abs().max() <= 1e-4  # scaled by 14.3
    assert torch.equal(logits_per_text, logits_per_image.t())


def test_trimmed_text_tower_equals_full_length():
    model, ref = load_openclip_fixture("vit")
    tokens = ref["tokens"][:3]  # the longest (75 tokens) is excluded so trimming really trims
    positions = []
    model.transformer.register_forward_pre_hook(lambda module, args, kwargs: positions.append(args[0].shape[1]),
                                                with_kwargs=True)
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.trim_text = False
        full = model.encode_text(tokens)
    longest = int(tokens.argmax(dim=-1).max()) + 1  # through the last end-of-text
    assert positions == [longest, model.config.text.context_length] and longest < 40
    assert (trimmed - full).abs().max() <= 1e-5


def test_logit_scale_initialised_to_log_inverse_temperature():
    model = clipforge.create_model("tiny-vit")
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_bf16_autocast_inference_close_to_fp32(name):
    torch.manual_seed(0)
    model = clipforge.create_model(name).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[49406, 320, 1929, 49407] + [0] * 73, [49406, 49407] + [0] * 75])
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    assert img.dtype == torch.bfloat16
    assert (img.float() - ref_img).abs().max() < 0.05
    assert (txt.float() - ref_txt).abs().max() < 0.05


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_identical_gradients(name):
    torch.manual_seed(0)
    model = clipforge.create_model(name)
    model.eval()  # BatchNorm in eval so both passes see the same statistics
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[49406, 320, 49407] + [0] * 74, [49406, 1929, 268, 49407] + [0] * 73])

    def grads():
        model.zero_grad()
        logits, _ = model(images, tokens)
        logits.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name_ in plain:
        assert torch.allclose(plain[name_], checkpointed[name_], atol=1e-6), name_


def test_locking_image_tower_freezes_it_and_keeps_eval_mode():
    model = clipforge.create_model("tiny-rn")
    model.lock_image_tower()
    model.train()
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not model.visual.training and model.transformer.training
    model.lock_text_tower()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["logit_scale"]


def test_no_weight_decay_covers_gains_biases_embeddings_and_scale():
    model = clipforge.create_model("tiny-vit")
    names = model.no_weight_decay()
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding"} <= names
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in names
    assert "text_projection" not in names


def test_bad_inputs_raise_clear_errors():
    model = clipforge.create_model("tiny-vit")
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode_image(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="tokens must have shape"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model 'ViT-Z/99'"):
        clipforge.create_model("ViT-Z/99")


def test_config_round_trips_through_dict():
    config = clipforge.get_config("RN50x4")
    assert ClipConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown ClipConfig fields"):
        ClipConfig.from_dict({"embed_dimm": 3})
