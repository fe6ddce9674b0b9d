"""The training loop on tiny models and small real image files: learning, accumulation, safety stops."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.checkpoints import save as save_model_folder
from clipforge.train import TrainConfig, TrainingStopped, train
from clipforge.loss import Objective

from _train_data import make_shapes

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """24 drawn-shape images (JPEG/PNG) with captions."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), 24)


def _config(data: Path, run_dir: Path, **fields) -> TrainConfig:
    # CPU unless a test asks for CUDA: the exactness checks here are about the algorithm, not GPU kernels.
    config = TrainConfig(**{"batch_size": 8, "steps": 3, "device": "cpu", **fields})
    config.data.train = str(data)
    config.data.workers = 0
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 1
    config.run.run_dir = str(run_dir)
    config.run.progress = False
    return config


def _final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.checkpoint / "model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_loss_decreases_on_real_images(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps=24)
    config.optim.warmup_steps = 6  # without warmup a fresh CLIP can collapse to the uniform (chance) loss
    config.run.log_every = 6
    result = train(config)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-4:]) / 4
    assert last < first - 0.4, result.losses
    assert last < math.log(8) - 0.2, "should beat chance (ln 8) on batches of 8"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12, 18, 24]
    assert {"loss", "lr", "logit_scale", "samples_per_s", "grad_norm"} <= records[-1].keys()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 24
    model, _ = clipforge.load(result.checkpoint)  # a checkpoint is a model folder evaluation can load
    assert math.exp(model.logit_scale.item()) <= 100


def test_chunked_batch_reaches_the_same_weights_as_the_full_batch(shapes, tmp_path):
    """Gradient accumulation keeps contrastive semantics: 4 chunks of 2 == one batch of 8."""
    full = train(_config(shapes, tmp_path / "full"))
    chunked = train(_config(shapes, tmp_path / "chunked", chunk_size=2))
    assert full.losses == pytest.approx(chunked.losses, rel=1e-5)
    # Adam turns float noise in near-zero gradients into steps of up to lr * noise / eps: 9e-6 here,
    # 1.0e-5 with another torch build. A chunk-local loss would move weights by about lr (5e-4).
    assert _max_difference(_final_weights(full), _final_weights(chunked)) < 5e-5


def test_resnet_channels_last_default_on_cpu_trains_like_the_plain_layout(shapes, tmp_path, monkeypatch):
    import clipforge.train.main as train_main

    layouts = []
    original = train_main._use_channels_last
    monkeypatch.setattr(train_main, "_use_channels_last",
                        lambda *args: layouts.append(original(*args)) or layouts[-1])
    def config(name, folder, channels_last=None, steps=3):
        built = _config(shapes, tmp_path / folder, steps=steps)
        built.model.name, built.model.channels_last = name, channels_last
        return built

    default = train(config("tiny-rn", "default"))
    plain = train(config("tiny-rn", "plain", channels_last=False))
    assert layouts == [True, False]  # None means channels-last for a ResNet on the CPU
    assert default.losses[0] == pytest.approx(plain.losses[0], rel=1e-5)  # same weights; conv sums in another order
    assert default.losses == pytest.approx(plain.losses, rel=1e-4)  # then Adam amplifies float noise
    # (weights are not compared: Adam turns the float noise of near-zero gradients into steps of up to lr)
    vit = train(config("tiny-vit", "vit", channels_last=True, steps=1))
    assert layouts[-1] is False and vit.losses  # a ViT tower has no convolution stack to reorder


def _nan_after(monkeypatch, first_bad_call: int, last_bad_call: int = 10**9):
    """Make the objective return NaN on calls first_bad_call..last_bad_call (1-based)."""
    calls = {"n": 0}
    original = Objective.forward

    def forward(self, image_features, text_features, logit_scale):
        calls["n"] += 1
        loss = original(self, image_features, text_features, logit_scale)
        return loss * float("nan") if first_bad_call <= calls["n"] <= last_bad_call else loss

    monkeypatch.setattr(Objective, "forward", forward)


def test_nonfinite_step_is_skipped_and_training_continues(shapes, tmp_path, monkeypatch):
    _nan_after(monkeypatch, 2, 2)
    result = train(_config(shapes, tmp_path / "run", steps=4))
    assert result.skipped_steps == 1 and math.isnan(result.losses[1])
    assert all(torch.isfinite(t).all() for t in _final_weights(result).values())
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "nonfinite_step" and e["step"] == 2 for e in events)


def test_run_stops_after_nonfinite_steps_in_a_row_with_last_checkpoint_intact(shapes, tmp_path, monkeypatch):
    _nan_after(monkeypatch, 3)
    config = _config(shapes, tmp_path / "run", steps=10)
    config.run.checkpoint_every = 2
    config.run.max_nonfinite_in_row = 3
    with pytest.raises(TrainingStopped, match="stopped at step 5: 3 steps in a row had a non-finite") as info:
        train(config)
    assert "Last checkpoint from before the divergence: " in str(info.value)
    assert "step_00000002" in str(info.value)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]  # step 4 came while steps were being skipped: not saved
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())


def _with_bad_samples(shapes: Path, folder: Path) -> Path:
    """The shapes caption file plus three unusable rows: truncated JPEG, text as PNG, missing file."""
    images = shapes.parent / "images"
    good = (images / "shape_000.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "text.png").write_text("not an image\n")
    rows = shapes.read_text().splitlines()
    rows += ["images/truncated.jpg,a broken file", "images/text.png,a text file", "images/missing.jpg,gone"]
    captions = shapes.parent / "captions_with_bad.csv"
    captions.write_text("\n".join(rows) + "\n")
    return captions


def test_bad_samples_are_skipped_counted_and_reported(shapes, tmp_path, caplog):
    captions = _with_bad_samples(shapes, tmp_path)
    config = _config(captions, tmp_path / "run", steps=6)  # two epochs of 27 samples
    config.data.max_skip_fraction = 0.2
    with caplog.at_level("WARNING", logger="clipforge.data"):
        result = train(config)
    assert result.steps == 6 and result.skipped_samples > 0
    reported = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(reported) == result.skipped_samples
    assert all(any(name in m for name in ("truncated.jpg", "text.png", "missing.jpg")) for m in reported)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_samples"] == result.skipped_samples


def test_too_many_bad_samples_stop_the_run_with_a_clear_message(shapes, tmp_path):
    captions = _with_bad_samples(shapes, tmp_path)
    config = _config(captions, tmp_path / "run", steps=6)
    config.data.max_skip_fraction = 0.01
    with pytest.raises(TrainingStopped, match=r"skipped \d+ of \d+ samples .* above the limit of 1.00%"):
        train(config)


def _changed(before: dict, after: dict, prefix: str, inside: bool) -> bool:
    keys = [k for k in before if k.startswith(prefix) == inside]
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_locked_image_tower_with_bf16_and_grad_checkpointing(shapes, tmp_path):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in clipforge.create_model("tiny-vit").state_dict().items()}
    config = _config(shapes, tmp_path / "run", steps=2, precision="bf16")
    config.model.lock_image = True
    config.model.grad_checkpointing = True
    result = train(config)
    final = _final_weights(result)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert not _changed(initial, final, "visual.", inside=True)
    assert _changed(initial, final, "visual.", inside=False)


def test_locked_text_tower_with_siglip_on_a_resnet(shapes, tmp_path):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in clipforge.create_model("tiny-rn").state_dict().items()}
    config = _config(shapes, tmp_path / "run", steps=2)
    config.model.name = "tiny-rn"
    config.model.lock_text = True
    config.loss.kind = "siglip"
    result = train(config)
    final = _final_weights(result)
    assert all(math.isfinite(loss) for loss in result.losses)
    text_keys = [k for k in final if not k.startswith("visual.") and k != "logit_scale"]
    assert all(torch.equal(initial[k], final[k]) for k in text_keys)
    assert _changed(initial, final, "visual.", inside=True)
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert "logit_bias" in state["objective"]


def test_fine_tune_starts_from_the_given_checkpoint(shapes, tmp_path):
    torch.manual_seed(123)
    pretrained = clipforge.create_model("tiny-vit")
    save_model_folder(pretrained, tmp_path / "pretrained")
    config = _config(shapes, tmp_path / "run", steps=1)
    config.model.init_checkpoint = str(tmp_path / "pretrained")
    config.model.name = "not-used-when-fine-tuning"
    config.optim.lr = 1e-12
    final = _final_weights(train(config))
    assert _max_difference(pretrained.state_dict(), final) < 1e-6


def test_logit_scale_is_clamped_to_100(shapes, tmp_path):
    torch.manual_seed(0)
    start = clipforge.create_model("tiny-vit")
    with torch.no_grad():
        start.logit_scale.fill_(math.log(100.0) + 0.5)
    save_model_folder(start, tmp_path / "hot")
    config = _config(shapes, tmp_path / "run", steps=1)
    config.model.init_checkpoint = str(tmp_path / "hot")
    final = _final_weights(train(config))
    assert final["logit_scale"].item() == pytest.approx(math.log(100.0))


def test_tensorboard_events_or_a_clear_error_when_the_package_is_missing(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps=1)
    config.run.tensorboard = True
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train(config)
        assert not (tmp_path / "run").exists()
    else:
        train(config)
        assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(shapes, tmp_path, precision):
    """fp16 runs with a loss scaler whose state is checkpointed; bf16 needs none."""
    result = train(_config(shapes, tmp_path / "run", steps=3, precision=precision, device="cuda"))
    assert all(math.isfinite(loss) for loss in result.losses)
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert (state["scaler"].get("scale", 0) > 0) == (precision == "fp16")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CLIPFORGE_TEST_COMPILE"),
                    reason="torch.compile on CPU takes minutes; set CLIPFORGE_TEST_COMPILE=1 to run")
def test_compiled_towers_train_like_eager_ones(shapes, tmp_path):
    eager = train(_config(shapes, tmp_path / "eager", steps=2))
    config = _config(shapes, tmp_path / "compiled", steps=2)
    config.model.compile = True
    compiled = train(config)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
