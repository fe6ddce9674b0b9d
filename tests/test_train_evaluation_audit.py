"""Audit of evaluation while training on the demo's real images: protocol sets scored as the eval
CLI scores them, broken prompts and layouts refused before training, module modes and the held-out
loss of a SigLIP run, TensorBoard after a resume, and an evaluation step a resume must not skip."""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from clipforge import load
from clipforge.evaluate import load_classification_data, load_retrieval_data
from clipforge.evaluate.protocols import evaluate_protocol
from clipforge.loss import Objective, contrastive_loss, sigmoid_loss
from clipforge.models import CLIP, get_config
from clipforge.train import TrainConfig, apply_overrides, train
from clipforge.train.config import EvalSection
from clipforge.train.distributed_setup import DistributedContext
from clipforge.train.evaluation import PeriodicEvaluation
from clipforge.train.log import read_metrics

from _demo_subset import demo_subset
from _kill_after_checkpoint import train_and_kill
from _protocol_layouts import make_class_folders, make_wds, wnid_table

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """64 training rows, a held-out listing of 64 pairs and 12 Fluent 3D classes, from the demo's data."""
    return demo_subset(tmp_path_factory.mktemp("demo-eval"), 64, 64, 12)


def _overrides(run_dir, demo, steps=4, every=2, zeroshot=None, retrieval=None, extra=()) -> list[str]:
    zeroshot = zeroshot if zeroshot is not None else [
        {"name": "fluent", "data": str(demo["fluent"]), "templates": ["a {}", "an emoji of a {}"]}]
    retrieval = retrieval if retrieval is not None else [{"name": "heldout", "data": str(demo["heldout"])}]
    return ["model.name=demo-rn", "device=cpu", "batch_size=16", f"steps={steps}", "data.workers=0",
            "optim.warmup_steps=1", "run.progress=false", "run.log_every=1", f"run.run_dir={run_dir}",
            f"data.train={demo['train']}", f"eval.zeroshot={json.dumps(zeroshot)}",
            f"eval.retrieval={json.dumps(retrieval)}", f"eval.every_steps={every}", *extra]


def _rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval/seconds" in r}


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def test_a_protocol_set_is_scored_as_the_eval_cli_scores_it(tmp_path, demo):
    """dataset="wds" reads images inside tars: plain zero-shot scoring could read none of them."""
    wds = tmp_path / "wds"
    make_wds(wds, ["keycap", "flag", "face", "cat", "dog", "car"], per_class=3,
             templates=["an emoji of a {c}.", "a {c}"])
    config = apply_overrides(TrainConfig(), _overrides(
        tmp_path / "run", demo, steps=2, retrieval=[], zeroshot=[{"name": "w", "data": str(wds), "dataset": "wds"}]))
    result = train(config)
    row = _rows(tmp_path / "run")[2]
    assert "eval/w/error" not in row, row["eval/w/error"]
    model, preprocess = load(result.checkpoint)
    expected = evaluate_protocol(model, load_classification_data(wds, dataset="wds"), "subset", None, preprocess,
                                 cache_dir=None, progress=False)  # the dataset's own templates
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert row[f"eval/w/{key}"] == pytest.approx(float(expected.metrics[key]), abs=1e-6)


@pytest.mark.parametrize("entry, message", [
    ({"zeroshot": [{"data": "FLUENT", "templates": "bogus"}]}, r"eval.zeroshot\[0\]: templates 'bogus'"),
    ({"zeroshot": [{"data": "FLUENT", "templates": 5}]}, r"eval.zeroshot\[0\]: templates must be"),
    ({"zeroshot": [{"data": "FLUENT", "classnames": ["a", "b"]}]}, r"eval.zeroshot\[0\]: .*2 class names for 12"),
    ({"zeroshot": [{"data": "INR", "dataset": "imagenet-r"}]}, r"eval.zeroshot\[0\]: .*imagenet-r expects 200"),
    ({"zeroshot": [{"data": "INR", "dataset": "imagenet-r", "classnames": "x"}]},
     r"eval.zeroshot\[0\]: classnames does not apply with dataset"),
    ({"retrieval": [{"data": "HELDOUT", "templates": ["a {}"]}]}, r"eval.retrieval\[0\]: unknown key 'templates'"),
    ({"zeroshot": [{"data": "ONE"}]}, r"eval.zeroshot\[0\]: .*one class .*needs at least two"),
    ({"retrieval": [{"data": "HELDOUT", "name": "val/a"}]}, r"eval.retrieval\[0\]: name 'val/a' must be"),
])
def test_broken_prompts_and_layouts_are_refused_before_training(tmp_path, demo, entry, message):
    """Knowable at the start, so the run stops before its first step, not after the whole training."""
    inr = demo["root"] / "inr"
    if not inr.exists():
        make_class_folders(inr, wnid_table("imagenet_r")[:10])  # 10 of the 200 folders the protocol needs
    one = demo["root"] / "one"  # the folder above a single class folder: every image would be right
    if not one.exists():
        first = sorted(demo["fluent"].iterdir())[0]
        shutil.copytree(first, one / first.name)
    paths = {"FLUENT": str(demo["fluent"]), "INR": str(inr), "HELDOUT": str(demo["heldout"]), "ONE": str(one)}
    sets = {kind: [{k: paths.get(v, v) if isinstance(v, str) else v for k, v in item.items()} for item in items]
            for kind, items in entry.items()}
    config = apply_overrides(TrainConfig(), _overrides(tmp_path / "run", demo, steps=2, zeroshot=sets.get("zeroshot", []),
                                                       retrieval=sets.get("retrieval", [])))
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_leaves_every_module_in_its_mode(demo):
    """A tower put in eval mode by hand (not locked) must not come back in training mode."""
    model = CLIP(get_config("demo-rn")).train()
    model.visual.eval()
    section = EvalSection(retrieval=[{"name": "heldout", "data": str(demo["heldout"])}])
    evaluation = PeriodicEvaluation(section, 16, DistributedContext())
    before = [m.training for m in model.modules()]
    values = evaluation(model)
    assert "eval/heldout/loss" in values
    assert [m.training for m in model.modules()] == before


def test_a_siglip_run_gets_the_siglip_held_out_loss(demo):
    """The held-out loss is documented as computed like the training loss: SigLIP's, with its bias."""
    torch.manual_seed(0)
    model = CLIP(get_config("demo-rn")).eval()
    objective = Objective("siglip")
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
    section = EvalSection(retrieval=[{"name": "heldout", "data": str(demo["heldout"])}])
    got = PeriodicEvaluation(section, 16, DistributedContext(), objective=objective)(model)["eval/heldout/loss"]
    from clipforge.evaluate import encode_images, encode_texts
    from clipforge.transforms import image_transform

    data = load_retrieval_data(demo["heldout"])
    first = {}
    for text, image in zip(data.texts, data.text_to_image):
        first.setdefault(image, text)
    images = encode_images(model, data.image_paths, image_transform(model.config.vision.image_size), progress=False)
    texts = encode_texts(model, [first[i] for i in images.indices.tolist()])
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    image_features, text_features = images.features[order][:16], texts[order][:16]  # 17 images: one batch of 16
    scale = model.logit_scale.detach()
    expected = sigmoid_loss(image_features, text_features, scale, objective.logit_bias.detach(), gather=False)
    clip = contrastive_loss(image_features, text_features, scale, gather=False)
    assert got == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - float(clip)) > 0.1  # the two losses differ: the check can tell them apart


def test_a_siglip_training_logs_the_siglip_held_out_loss(tmp_path, demo):
    config = apply_overrides(TrainConfig(), _overrides(tmp_path / "run", demo, steps=2, zeroshot=[],
                                                       extra=["loss.kind=siglip"]))
    result = train(config)
    model, _ = load(result.checkpoint)
    objective = Objective("siglip")
    state = torch.load(result.checkpoint / "state.pt", map_location="cpu", weights_only=False)["objective"]
    objective.load_state_dict(state)
    section = EvalSection(retrieval=[{"name": "heldout", "data": str(demo["heldout"])}])
    expected = PeriodicEvaluation(section, 16, DistributedContext(), objective=objective)(model)["eval/heldout/loss"]
    assert _rows(tmp_path / "run")[2]["eval/heldout/loss"] == pytest.approx(expected, rel=1e-5)


def _cli_args(run_dir, demo, extra=()) -> list[str]:
    return ["train"] + [a for item in _overrides(run_dir, demo, extra=extra) for a in ("--set", item)]


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(tmp_path, demo):
    """Killed right after checkpoint 3: the resumed writer must hide steps 4.., not step 3 itself."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    extra = ["run.tensorboard=true", "run.checkpoint_every=3"]
    args = _cli_args(tmp_path / "run", demo, extra)
    train_and_kill(args, kill_after=3)
    time.sleep(1.1)  # event files are named by the second they open in: keep the resumed one after the first
    from clipforge.cli import main

    assert main(args + ["--resume", "latest"]) == 0
    logged = dict(_losses(tmp_path / "run"))
    assert sorted(logged) == [1, 2, 3, 4]
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    from_events = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(from_events) == [1, 2, 3, 4]
    assert all(from_events[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)
    assert sorted(e.step for e in events.Scalars("eval/fluent/top1")) == sorted(_rows(tmp_path / "run")) == [2, 4]


def test_a_resume_at_an_evaluation_step_does_not_skip_that_evaluation(tmp_path, demo):
    """Killed after checkpoint 2 and before its evaluation: the resumed run starts at step 3, so the
    evaluation of step 2 is never made unless it comes before the checkpoint."""
    args = _cli_args(tmp_path / "run", demo, ["run.checkpoint_every=2"])
    train_and_kill(args, kill_after=2)
    from clipforge.cli import main

    assert main(args + ["--resume", "latest"]) == 0
    assert sorted(_rows(tmp_path / "run")) == [2, 4]


def test_eval_images_gone_mid_run_are_logged_and_change_no_training_step(tmp_path, demo, monkeypatch):
    """The images of a set vanish after the first evaluation (at checkpoint 3): later ones log the error, training goes on
    with the very losses of a run without evaluation."""
    fluent = tmp_path / "fluent"
    shutil.copytree(demo["fluent"], fluent)
    zeroshot = [{"name": "fluent", "data": str(fluent)}]
    import clipforge.train.loop as loop

    save = loop.save_checkpoint

    def save_then_break(run_dir, model, state, step, keep):
        path = save(run_dir, model, state, step, keep)
        if step == 3 and Path(run_dir).name == "eval":
            shutil.rmtree(fluent)
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_break)
    base = dict(steps=4, every=2, zeroshot=zeroshot, extra=["run.checkpoint_every=1"])
    result = train(apply_overrides(TrainConfig(), _overrides(tmp_path / "eval", demo, **base)))
    assert result.steps == 4
    rows = _rows(tmp_path / "eval")
    assert sorted(rows) == [2, 4]
    assert "eval/fluent/top1" in rows[2] and "eval/fluent/error" in rows[4] and "eval/heldout/loss" in rows[4]
    plain = dict(base, zeroshot=[], retrieval=[], every=0)
    train(apply_overrides(TrainConfig(), _overrides(tmp_path / "plain", demo, **plain)))
    assert _losses(tmp_path / "eval") == _losses(tmp_path / "plain")
