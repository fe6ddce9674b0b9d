"""FLIP patch dropout: a random subset of patch tokens per image while training, every patch in
evaluation, the same masks in both passes of gradient caching and after a resume."""
import copy
import shutil

import pytest
import torch

import clipforge
from clipforge.loss import contrastive_loss
from clipforge.models import VisionConfig
from clipforge.train import TrainConfig, apply_overrides, train, validate
from clipforge.train.grad_cache import contrastive_step

SOT, EOT = 49406, 49407


def _model(share: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = clipforge.create_model("tiny-vit")  # 64 px, patch 16: 16 patch tokens
    model.set_patch_dropout(share)
    return model


def _tokens(n: int) -> torch.Tensor:
    tokens = torch.zeros(n, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4] = SOT, torch.arange(1, 4) * 7 + torch.arange(n)[:, None]
    tokens[:, 4] = EOT
    return tokens


def _tokens_seen(model, images) -> int:
    """Tokens per image that reach the vision transformer."""
    seen = []
    handle = model.visual.ln_pre.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    model.encode_image(images)
    handle.remove()
    return seen[0]


def test_training_mode_keeps_the_class_token_and_a_random_subset_per_image():
    model = _model(0.5).train()
    images = torch.randn(1, 3, 64, 64).expand(6, -1, -1, -1)  # six identical images
    assert _tokens_seen(model, images) == 1 + 8
    features = model.encode_image(images)
    # identical images, different subsets: different embeddings (one shared mask would give equal rows)
    assert len({tuple(row.tolist()) for row in features.detach()}) == 6
    assert _tokens_seen(_model(0.75).train(), images) == 1 + 4


def test_evaluation_sees_every_patch_and_matches_the_model_without_dropout():
    images = torch.randn(4, 3, 64, 64)
    with_dropout, without = _model(0.5).eval(), _model(0.0).eval()
    assert _tokens_seen(with_dropout, images) == 1 + 16
    with torch.no_grad():
        assert torch.equal(with_dropout.encode_image(images), without.encode_image(images))
    assert with_dropout.config.vision.patch_dropout == 0.5  # kept in the config that checkpoints save


def test_chunked_step_draws_the_same_masks_as_the_direct_step():
    images, tokens = torch.randn(8, 3, 64, 64), _tokens(8)
    direct, chunked = _model(0.5), _model(0.5)
    grads = []
    for model, chunk_size in ((direct, None), (chunked, 3)):
        torch.manual_seed(11)
        loss, _ = contrastive_step(model, images, tokens, lambda i, t, m=model: contrastive_loss(i, t, m.logit_scale),
                                   chunk_size)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, expected in grads[0].items():
        error = (grads[1][name] - expected).abs().max().item()
        assert error <= 1e-5 * max(expected.abs().max().item(), 1e-6), name
    # and the masks matter: other draws give other gradients
    torch.manual_seed(12)
    other = copy.deepcopy(_model(0.5))
    contrastive_step(other, images, tokens, lambda i, t: contrastive_loss(i, t, other.logit_scale), None)
    assert not torch.allclose(other.visual.conv1.weight.grad, grads[0]["visual.conv1.weight"])


def test_bad_shares_and_resnets_are_refused_with_one_line():
    for share in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"patch_dropout must lie in \[0, 1\)"):
            VisionConfig(patch_dropout=share)
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        clipforge.create_model("tiny-rn").set_patch_dropout(0.5)
    with pytest.raises(ValueError, match=r"patch_dropout must lie in \[0, 1\)"):
        validate(apply_overrides(TrainConfig(), ["data.train=x.csv", "model.patch_dropout=1"]))
    config = apply_overrides(TrainConfig(), ["data.train=x.csv", "model.name=tiny-rn", "model.patch_dropout=0.5"])
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        train(config)


def test_resume_with_patch_dropout_is_exact(tmp_path):
    from _train_data import make_shapes

    data = make_shapes(tmp_path / "data", 16)
    def settings(run_dir, steps, *extra):
        return ["model.name=tiny-vit", "model.patch_dropout=0.5", "device=cpu", "batch_size=8", f"steps={steps}",
                "data.workers=0", "optim.warmup_steps=1", "run.progress=false", "run.checkpoint_every=2",
                "run.keep=0", f"run.run_dir={run_dir}", f"data.train={data}", *extra]
    whole = train(apply_overrides(TrainConfig(), settings(tmp_path / "whole", 4)))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")  # the run as it was after step 2
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000004")
    resumed = train(apply_overrides(TrainConfig(), settings(tmp_path / "split", 4, "run.resume=latest")))
    assert resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)
    expected, got = clipforge.load_model(whole.checkpoint), clipforge.load_model(resumed.checkpoint)
    assert expected.config.vision.patch_dropout == 0.5
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # and patch dropout changed the run at all
    plain = train(apply_overrides(TrainConfig(), settings(tmp_path / "plain", 4, "model.patch_dropout=0")))
    assert plain.losses[1:] != pytest.approx(whole.losses[1:], abs=1e-4)
