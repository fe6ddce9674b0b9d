"""``minutes``: a run re-plans its step count from the speed it measures and ends within its budget,
with the learning rate decayed at its last step, the same on every process, and a resumed run goes
on with the budget it had left."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from clipforge.train import TrainConfig, apply_overrides, train
from clipforge.train.config import validate
from clipforge.train.budget import WARM_STEPS, TimeBudget
from clipforge.train.resume import list_checkpoints, read_training_state

from _torchrun import failure, torchrun
from _train_data import make_shapes

FIRST_PLAN = 100_000  # far more steps than fit in the budget: only the budget can end these runs
LR, WARMUP = 5e-4, 2
# The budget of the real runs: long enough for a dozen tiny steps after the untimed warm steps even
# on a loaded machine (3 s fitted only 2-4 steps there, and the schedule never ran down).
MINUTES = 0.1
BUDGET_S = 60 * MINUTES


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_replan_uses_the_speed_measured_after_the_first_steps():
    clock = _Clock()
    budget = TimeBudget(100.0, clock=clock)
    clock.now += 1.0
    assert budget.replan(1, planned=500) == 500
    clock.now += 4.0  # the first WARM_STEPS steps (start-up included) are not timed
    assert budget.replan(1 + WARM_STEPS, planned=500) == 500
    clock.now += 10.0  # 20 steps in 10 s since: 2 steps/s, 85 s left
    assert budget.replan(26, planned=500) == 26 + 170
    clock.now += 50.0  # 100 steps in 60 s: 5/3 steps/s, 35 s left
    assert budget.replan(106, planned=196) == 106 + 58
    clock.now += 40.0  # spent: the run ends at the step just taken
    assert budget.replan(170, planned=164) == 170
    assert budget.spent() == pytest.approx(105.0)


def test_a_short_first_plan_lasts_until_the_speed_is_measured():
    clock = _Clock()
    budget = TimeBudget(100.0, clock=clock)
    for step in range(1, WARM_STEPS + 2):
        clock.now += 0.5
        assert budget.replan(step, planned=2) == max(2, step + 1)
    clock.now += 0.5  # one step in 0.5 s: 2 steps/s, 96.5 s left
    assert budget.replan(WARM_STEPS + 2, planned=WARM_STEPS + 2) == WARM_STEPS + 2 + 193


def test_a_resumed_budget_counts_the_seconds_spent_before():
    clock = _Clock()
    budget = TimeBudget(60.0, spent=50.0, clock=clock)
    clock.now += 2.0
    assert budget.replan(201, planned=400) == 400  # no speed measured in this session yet
    clock.now += 1.0
    assert budget.replan(201 + WARM_STEPS, planned=400) == 400
    clock.now += 4.0  # 8 steps in 4 s: 2 steps/s, 3 s left
    assert budget.replan(209 + WARM_STEPS, planned=400) == 209 + WARM_STEPS + 6
    assert budget.spent() == pytest.approx(57.0)
    clock.now += 3.0
    assert budget.replan(216, planned=220) == 216
    with pytest.raises(ValueError, match="minutes must be > 0"):
        TimeBudget(0.0)


def _settings(run_dir, data, minutes, *extra) -> list[str]:
    return ["model.name=tiny-vit", "device=cpu", "batch_size=8", f"steps={FIRST_PLAN}", f"minutes={minutes}",
            "data.workers=1", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", "run.progress=false",
            "run.log_every=2", "run.keep=0", f"run.run_dir={run_dir}", f"data.train={data}", *extra]


def _lr_lines(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in records if "lr" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("budget") / "data", 32)


def test_the_budget_ends_the_run_with_the_schedule_run_down(tmp_path, data):
    # 2.5x the others' budget: the schedule can only run down once the speed is measured, after the
    # warm steps and the loader worker's start, which took the whole 6 s under CI-like load
    minutes = 2.5 * MINUTES
    result = train(apply_overrides(TrainConfig(), _settings(tmp_path / "run", data, minutes,
                                                            "run.checkpoint_every=1000000")))
    assert 4 <= result.steps < FIRST_PLAN
    final = list_checkpoints(tmp_path / "run")[-1]  # the last step is always saved
    assert final.name == f"step_{result.steps:08d}"
    state = read_training_state(final)
    assert state["total_steps"] == result.steps
    # ends when the plan's last step is taken (within a step of the budget), not earlier
    assert 0.8 * 60 * minutes <= state["budget_spent_s"] < 60 * minutes + 30
    lrs = _lr_lines(tmp_path / "run")
    assert lrs[-1][0] == result.steps
    assert max(lr for _, lr in lrs) > 0.5 * LR  # the schedule peaked...
    assert lrs[-1][1] < 0.5 * LR  # ...and ran down towards the re-planned end, not the first plan's


def test_resume_goes_on_with_the_budget_left_and_refuses_a_spent_one(tmp_path, data):
    settings = _settings(tmp_path / "run", data, MINUTES, "run.checkpoint_every=4")
    first = train(apply_overrides(TrainConfig(), settings))
    found = list_checkpoints(tmp_path / "run")
    assert len(found) >= 2, "the run must have a checkpoint before its end"
    # resume from the first checkpoint, as after a kill there: later ones gone
    for later in found[1:]:
        shutil.rmtree(later)
    spent_then = read_training_state(found[0])["budget_spent_s"]
    assert 0 < spent_then < BUDGET_S
    resumed = train(apply_overrides(TrainConfig(), settings + ["run.resume=latest"]))
    state = read_training_state(list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == state["total_steps"] == resumed.steps > int(found[0].name[5:])
    assert 0.8 * BUDGET_S <= state["budget_spent_s"] < BUDGET_S + 30
    assert first.steps >= 4
    with pytest.raises(ValueError, match="minutes"):  # spent: nothing left to train
        train(apply_overrides(TrainConfig(), settings + ["run.resume=latest"]))
    more = train(apply_overrides(TrainConfig(), _settings(tmp_path / "run", data, 2 * MINUTES,
                                                          "run.checkpoint_every=4", "run.resume=latest")))
    assert more.steps > resumed.steps
    assert read_training_state(list_checkpoints(tmp_path / "run")[-1])["budget_spent_s"] >= 0.8 * 2 * BUDGET_S


def test_minutes_on_the_command_line_is_checked():
    done = subprocess.run([sys.executable, "-m", "clipforge.cli", "train", "--minutes", "0", "--print-config"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--minutes: must be a number above 0, got 0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "clipforge.cli", "train", "--minutes", "2.5", "--print-config"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["minutes"] == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match=f"minutes must be a positive number of minutes, got {bad}"):
            validate(apply_overrides(TrainConfig(), [f"minutes={bad}"]))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_end_at_the_same_step(tmp_path, data):
    run_dir = tmp_path / "pair"
    # No loader worker: this tiny set runs an epoch every few steps, and re-forking workers in the
    # threaded ranks at each epoch boundary is where a CPython fork deadlock hung this test once
    # (clipforge.data.loader._let_ending_queue_threads_finish); the budget does not depend on it.
    args = ["train"] + [arg for item in _settings(run_dir, data, 0.05, "run.checkpoint_every=1000000",
                                                  "data.workers=0") for arg in ("--set", item)]
    done = torchrun(["-m", "clipforge.cli", *args], tmp_path / "scratch")
    assert done.returncode == 0, failure(done)
    state = read_training_state(list_checkpoints(run_dir)[-1])
    assert state["step"] == state["total_steps"] < FIRST_PLAN  # a rank that planned otherwise would hang
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert torch.isfinite(torch.tensor(_lr_lines(run_dir)[-1][1]))
