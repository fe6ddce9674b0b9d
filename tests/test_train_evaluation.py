"""Evaluation while training: zero-shot and held-out sets scored on rank 0 at the due steps."""
import json
import shutil

import pytest
from PIL import Image

from clipforge import load
from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot, load_image_folder, load_retrieval_data
from clipforge.train import TrainConfig, apply_overrides, train
from clipforge.train.log import read_metrics

from _torchrun import failure, torchrun
from _train_data import make_shapes

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Training pairs, a held-out listing and a class folder per shape, all real image files."""
    root = tmp_path_factory.mktemp("evalsets")
    train_file = make_shapes(root / "train", 16)
    heldout = make_shapes(root / "heldout", 8)
    classes = root / "classes"
    for path in sorted((root / "heldout" / "images").iterdir()):
        index = int(path.stem.split("_")[1])
        shape = ("circle", "square", "triangle")[index // 4 % 3]
        (classes / shape).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, classes / shape / path.name)
    return train_file, heldout, classes


def _overrides(run_dir, sets, steps=4, every=2) -> list[str]:
    train_file, heldout, classes = sets
    zeroshot = [{"name": "shapes", "data": str(classes), "templates": ["a {}", "a photo of a {}"]}]
    retrieval = [{"name": "heldout", "data": str(heldout)}]
    return ["model.name=tiny-vit", "device=cpu", "batch_size=8", f"steps={steps}", "data.workers=0",
            "optim.warmup_steps=1", "run.progress=false", "run.log_every=1", f"run.run_dir={run_dir}",
            f"data.train={train_file}", f"eval.zeroshot={json.dumps(zeroshot)}",
            f"eval.retrieval={json.dumps(retrieval)}", f"eval.every_steps={every}", "eval.batch_size=16"]


def _eval_rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)}


def test_sets_are_scored_at_the_due_steps_as_a_separate_evaluation_would(tmp_path, sets):
    result = train(apply_overrides(TrainConfig(), _overrides(tmp_path / "run", sets)))
    rows = _eval_rows(tmp_path / "run")
    assert sorted(rows) == [2, 4]
    last = rows[4]
    model, preprocess = load(result.checkpoint)
    zeroshot = evaluate_zeroshot(model, load_image_folder(sets[2]), None, ["a {}", "a photo of a {}"], preprocess,
                                 cache_dir=None, progress=False)
    assert last["eval/shapes/top1"] == pytest.approx(zeroshot.metrics["top1"], abs=1e-6)
    retrieval = evaluate_retrieval(model, load_retrieval_data(sets[1]), preprocess, cache_dir=None, progress=False)
    for key in ("image_to_text_recall@1", "text_to_image_recall@5"):
        assert last[f"eval/heldout/{key}"] == pytest.approx(retrieval["metrics"][key], abs=1e-6)
    assert 0 < last["eval/heldout/loss"] < 10 and last["eval/heldout/loss"] != rows[2]["eval/heldout/loss"]
    with Image.open(tmp_path / "run" / "curves.png") as curves:  # a third panel: the evaluation metrics
        assert curves.width == 1500


def test_a_failing_set_is_logged_and_training_goes_on(tmp_path, sets):
    train_file, heldout, classes = sets
    broken = tmp_path / "broken"
    shutil.copytree(classes, broken)
    config = apply_overrides(TrainConfig(), _overrides(tmp_path / "run", (train_file, heldout, broken), steps=2))
    for image in broken.rglob("*.*"):
        image.write_bytes(b"not an image any more")  # readable folder, unreadable images: fails when scored
    result = train(config)
    assert result.steps == 2
    rows = _eval_rows(tmp_path / "run")
    assert "none of the 8 images could be read" in rows[2]["eval/shapes/error"]
    assert "eval/shapes/top1" not in rows[2] and "eval/heldout/loss" in rows[2]


def test_bad_eval_entries_are_refused_before_training(tmp_path, sets):
    base = _overrides(tmp_path / "run", sets)
    with pytest.raises(FileNotFoundError, match=r"eval.zeroshot\[0\]: data .*missing does not exist"):
        train(apply_overrides(TrainConfig(), base + ['eval.zeroshot=[{"data": "missing"}]']))
    with pytest.raises(ValueError, match=r"eval.retrieval\[0\]: unknown key 'split'"):
        train(apply_overrides(TrainConfig(), base + [f'eval.retrieval=[{{"data": "{sets[1]}", "split": "x"}}]']))
    with pytest.raises(ValueError, match="eval.zeroshot must be a JSON list"):
        apply_overrides(TrainConfig(), base + ["eval.zeroshot={not json"])


@pytest.mark.distributed
def test_rank_zero_evaluates_while_the_other_waits(tmp_path, sets):
    args = ["train"] + [a for item in _overrides(tmp_path / "pair", sets) for a in ("--set", item)]
    done = torchrun(["-m", "clipforge.cli", *args], tmp_path / "scratch")
    assert done.returncode == 0, failure(done)
    rows = [r for r in read_metrics(tmp_path / "pair" / "metrics.jsonl") if "eval/seconds" in r]
    assert [r["step"] for r in rows] == [2, 4]  # once per due step: rank 0 alone writes
    model, preprocess = load(tmp_path / "pair" / "checkpoints" / "step_00000004")
    zeroshot = evaluate_zeroshot(model, load_image_folder(sets[2]), None, ["a {}", "a photo of a {}"], preprocess,
                                 cache_dir=None, progress=False)
    assert rows[-1]["eval/shapes/top1"] == pytest.approx(zeroshot.metrics["top1"], abs=1e-6)
