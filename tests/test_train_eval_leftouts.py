"""Evaluation while training, the left-outs: ``eval.every_steps`` without a set to evaluate is refused,
and under torchrun the processes that wait for rank 0's evaluation outlast the process group's
timeout (a long evaluation does not kill the run), up to ``eval.wait_minutes``.

The torchrun tests run this file as the worker script: the worker joins the process group itself
with a timeout of a few seconds (gloo's default is 30 minutes) and makes rank 0's evaluation sleep
longer than that.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from _demo_subset import demo_subset

# The process group's timeout in the torchrun tests: short, yet above the ranks' ordinary skew on a
# loaded machine (rank 0 drawing curves.png and saving a checkpoint while rank 1 waits in the next
# collective), which 4 s was not beside another training run
PG_TIMEOUT_S = 10
EVAL_SLEEP_S = 2 * PG_TIMEOUT_S  # rank 0's first evaluation takes at least this long: more than the timeout


def _overrides(run_dir, data: dict, steps: int = 4, every: int = 2, extra=()) -> list[str]:
    zeroshot = [{"name": "fluent", "data": str(data["fluent"]), "templates": ["a {}", "an emoji of a {}"]}]
    retrieval = [{"name": "heldout", "data": str(data["heldout"])}]
    return ["model.name=tiny-vit", "device=cpu", "batch_size=8", f"steps={steps}", "data.workers=0",
            "optim.warmup_steps=1", "run.progress=false", "run.log_every=1", "run.checkpoint_every=2",
            "run.keep=0", f"run.run_dir={run_dir}", f"data.train={data['train']}",
            f"eval.zeroshot={json.dumps(zeroshot)}", f"eval.retrieval={json.dumps(retrieval)}",
            f"eval.every_steps={every}", "eval.batch_size=16", *extra]


# ---------------------------------------------------------------- eval.every_steps without sets


def test_every_steps_without_any_eval_set_is_refused_at_validation():
    from clipforge.train import TrainConfig, apply_overrides
    from clipforge.train.config import validate

    base = ["data.train=train.jsonl"]
    with pytest.raises(ValueError, match=r"eval.every_steps=5 evaluates nothing: no eval.zeroshot or "
                                         r"eval.retrieval set is given"):
        validate(apply_overrides(TrainConfig(), base + ["eval.every_steps=5"]))
    with pytest.raises(ValueError, match=r"eval.every_steps must be >= 0 \(0: only after the last step\), got -1"):
        validate(apply_overrides(TrainConfig(), base + ["eval.every_steps=-1"]))
    validate(apply_overrides(TrainConfig(), base + ["eval.every_steps=0"]))  # the default: nothing to evaluate
    for bad in ("0", "-1.5", "nan"):
        with pytest.raises(ValueError, match=r"eval.wait_minutes must be a positive number of minutes"):
            validate(apply_overrides(TrainConfig(), base + [f"eval.wait_minutes={bad}"]))


def test_the_command_line_refuses_every_steps_without_sets_with_one_line(tmp_path, capsys):
    from clipforge.cli import main

    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "caption": "a"}\n')
    status = main(["train", "--data", str(tmp_path / "train.jsonl"), "--run-dir", str(tmp_path / "run"),
                   "--set", "eval.every_steps=100"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "eval.every_steps=100 evaluates nothing" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_steps_beyond_the_run_evaluates_after_the_last_step_only():
    from clipforge.train.evaluation import PeriodicEvaluation

    evaluation = PeriodicEvaluation.__new__(PeriodicEvaluation)
    evaluation.sets, evaluation.every_steps, evaluation.times = [object()], 50, 0
    assert [step for step in range(1, 11) if evaluation.due(step, 10)] == [10]
    evaluation.every_steps = 0
    assert [step for step in range(1, 11) if evaluation.due(step, 10)] == [10]
    evaluation.every_steps = 3
    assert [step for step in range(1, 11) if evaluation.due(step, 10)] == [3, 6, 9, 10]


def test_eval_times_spaces_evaluations_over_the_total_read_at_each_step():
    from clipforge.train.evaluation import PeriodicEvaluation

    evaluation = PeriodicEvaluation.__new__(PeriodicEvaluation)
    evaluation.sets, evaluation.every_steps, evaluation.times, evaluation._reached = [object()], 0, 4, None
    assert [step for step in range(1, 101) if evaluation.due(step, 100)] == [25, 50, 75, 100]
    evaluation._reached = None
    assert [step for step in range(1, 11) if evaluation.due(step, 10)] == [3, 5, 8, 10]  # crossings of 2.5, 5, 7.5, 10
    # a minutes run that planned 400 steps and is re-planned to 240 after step 100: the evaluations
    # follow the new length (the old spacing, every 100, would give 100 and 200 and the last only)
    totals = {step: 400 if step <= 100 else 240 for step in range(1, 241)}
    evaluation._reached = None  # a new run
    assert [step for step in range(1, 241) if evaluation.due(step, totals[step])] == [100, 120, 180, 240]


def test_eval_times_keeps_its_count_when_the_total_shrinks_at_every_step():
    from clipforge.train.evaluation import PeriodicEvaluation

    # a fresh-clone demo run: planned 5,709 steps, re-planned a little lower after each step of a
    # machine that kept slowing, ended at 3,378; comparing each step with the one before under the
    # current total missed two of the eight evaluations
    def total(step: int) -> int:
        return max(step, round(5709 - 2331 * step / 3378))

    evaluation = PeriodicEvaluation.__new__(PeriodicEvaluation)
    evaluation.sets, evaluation.every_steps, evaluation.times, evaluation._reached = [object()], 0, 8, None
    steps = [step for step in range(1, 3379) if evaluation.due(step, total(step))]
    assert len(steps) == 8 and steps[-1] == 3378, steps
    # resumed at step 2,000: the fractions passed before are not evaluated again
    evaluation._reached = None
    resumed = [step for step in range(2001, 3379) if evaluation.due(step, total(step))]
    assert resumed == [step for step in steps if step > 2000]


def test_eval_times_is_validated_like_every_steps():
    from clipforge.train import TrainConfig, apply_overrides
    from clipforge.train.config import validate

    base = ["data.train=train.csv"]
    sets = base + ['eval.retrieval=[{"name": "val", "data": "val.csv"}]']
    with pytest.raises(ValueError, match=r"eval.times=3 evaluates nothing: no eval.zeroshot"):
        validate(apply_overrides(TrainConfig(), base + ["eval.times=3"]))
    with pytest.raises(ValueError, match=r"eval.times must be >= 0 \(0: use eval.every_steps\), got -2"):
        validate(apply_overrides(TrainConfig(), sets + ["eval.times=-2"]))
    with pytest.raises(ValueError, match=r"eval.times=3 and eval.every_steps=5 both space the evaluations"):
        validate(apply_overrides(TrainConfig(), sets + ["eval.times=3", "eval.every_steps=5"]))
    validate(apply_overrides(TrainConfig(), sets + ["eval.times=3"]))


# ---------------------------------------------------------------- a long evaluation under torchrun


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """32 training rows, a held-out listing of 12 pairs and 4 Fluent 3D classes, from the demo's data."""
    return demo_subset(tmp_path_factory.mktemp("leftouts"), 32, 12, 4)


@pytest.mark.slow
def test_a_period_beyond_the_run_is_said_and_the_last_step_evaluated(tmp_path, demo, capsys):
    from clipforge.train import TrainConfig, apply_overrides, train
    from clipforge.train.log import read_metrics

    train(apply_overrides(TrainConfig(), _overrides(tmp_path / "run", demo, steps=2, every=50)))
    assert "note: eval.every_steps=50 is beyond the run's 2 steps: the sets are evaluated after the last step " \
           "only" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/seconds" in r] == [2]


def _launch(tmp_path, overrides: list[str]):
    from _torchrun import torchrun

    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    return torchrun([__file__, str(tmp_path / "overrides.json")], tmp_path / "scratch", timeout=300)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_evaluation_longer_than_the_group_timeout_does_not_kill_the_run(tmp_path, demo):
    from clipforge import load
    from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot, load_image_folder, load_retrieval_data
    from clipforge.train.log import read_metrics

    from _torchrun import failure

    done = _launch(tmp_path, _overrides(tmp_path / "run", demo))
    assert done.returncode == 0, failure(done)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/seconds" in r}
    assert sorted(rows) == [2, 4]
    assert rows[2]["eval/seconds"] >= EVAL_SLEEP_S  # rank 1 waited longer than the group's timeout
    # the failed set is logged, not fatal, and the other set of the same evaluation still scored
    assert rows[2]["eval/heldout/error"] == "OSError: the held-out images went away"
    assert "step 2: evaluation of heldout failed" in done.stdout + done.stderr
    templates = ["a {}", "an emoji of a {}"]
    for step in (2, 4):  # each logged figure is that step's checkpoint's, as a separate evaluation scores it
        model, preprocess = load(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
        zeroshot = evaluate_zeroshot(model, load_image_folder(demo["fluent"]), None, templates, preprocess,
                                     cache_dir=None, progress=False)
        assert rows[step]["eval/fluent/top1"] == pytest.approx(zeroshot.metrics["top1"], abs=1e-6)
    retrieval = evaluate_retrieval(model, load_retrieval_data(demo["heldout"]), preprocess, cache_dir=None,
                                   progress=False)
    for key, value in retrieval["metrics"].items():
        assert rows[4][f"eval/heldout/{key}"] == pytest.approx(float(value), abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_evaluation_longer_than_eval_wait_minutes_stops_the_run_naming_the_setting(tmp_path, demo):
    from _torchrun import failure

    done = _launch(tmp_path, _overrides(tmp_path / "run", demo, extra=["eval.wait_minutes=0.05"]))
    assert done.returncode != 0, failure(done)
    assert "waited 0.05 minutes for rank 0's evaluation after step 2" in done.stderr, failure(done)
    assert "raise eval.wait_minutes" in done.stderr


def _worker(overrides_path: str) -> None:
    """One torchrun process: join with a short timeout, slow down and break rank 0's evaluation, train."""
    import torch.distributed as dist

    from clipforge.train import TrainConfig, apply_overrides, train
    from clipforge.train.evaluation import PeriodicEvaluation

    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    real_evaluate, calls = PeriodicEvaluation._evaluate, []

    def evaluate(self, model, eval_set):
        calls.append(eval_set.name)
        if len(calls) == 1:  # the first set of the first evaluation: longer than the group's timeout
            time.sleep(EVAL_SLEEP_S)
        if len(calls) == 2:  # the second set of the first evaluation fails
            raise OSError("the held-out images went away")
        return real_evaluate(self, model, eval_set)

    PeriodicEvaluation._evaluate = evaluate
    try:
        train(apply_overrides(TrainConfig(), json.loads(Path(overrides_path).read_text())))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
