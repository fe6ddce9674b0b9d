"""A wall-clock budget for a run (``minutes``): the total step count is re-planned from the measured
step rate, so that the run ends after about that long on whatever machine it lands on.

A step count fixed from a speed measured at the start is off by whatever the machine does later:
the demo's runs measured 530 samples/s in their first steps and then averaged 420 over the run
(shared cores, evaluations, checkpoints), ending up to a fifth past their budget. Here after every
step the loop asks :meth:`TimeBudget.replan` for the total: the steps done so far plus the seconds
left times the steps per second measured since this session's first ``WARM_STEPS`` steps (slowed
by allocation and worker start, so left out). Evaluations and checkpoints during the run are part
of the measured time, so they are budgeted too. The cosine learning-rate schedule follows the
current total, so it still reaches zero at the run's last step.

Every process must stop at the same step: the clocks are averaged over processes and the step
counts are the same everywhere, so each computes the same total. Per step that costs a clock read,
and with several processes an 8-byte all-reduce beside the step's gradient all-reduce. A
checkpoint stores the seconds spent and the total at that step; a resumed run goes on with the
same budget. Budgeted runs are not reproducible step for step (the plan depends on the
machine's speed); a fixed ``steps`` is.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist

WARM_STEPS = 5  # steps of each session before the speed is measured


class TimeBudget:
    """Plans the total optimizer steps of a run that should last ``seconds`` of training-loop time."""

    def __init__(self, seconds: float, spent: float = 0.0, device: "torch.device | str" = "cpu",
                 clock: Callable[[], float] = time.perf_counter):
        if not seconds > 0:
            raise ValueError(f"minutes must be > 0, got {seconds / 60:g}")
        self.seconds = seconds  # the whole run's budget
        self.spent_before = spent  # seconds spent before this process started (a resumed run)
        self.device = device  # where the all-reduce's tensor lives (CUDA for nccl)
        self.clock = clock
        self.started = clock()
        self.first_step: int | None = None  # the first step this session re-planned after
        self.rate_from: tuple[int, float] | None = None  # (step, seconds since start) where the speed is timed from

    def spent(self) -> float:
        """Seconds of the budget used so far, this process's clock (earlier sessions included)."""
        return self.spent_before + self.clock() - self.started

    def replan(self, step: int, planned: int) -> int:
        """The run's total steps after optimizer step ``step`` (``planned`` until a speed is measured,
        but never ending the run before it is).

        Never below ``step``: a spent budget ends the run at the step just taken. Collective when
        several processes run: call it after every step on all of them.
        """
        elapsed = self.clock() - self.started
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
            dist.all_reduce(agreed)  # gloo and nccl both sum; divided below, the same on every process
            elapsed = agreed.item() / dist.get_world_size()
        spent = self.spent_before + elapsed  # spent_before comes from the same checkpoint everywhere
        if spent >= self.seconds:
            return step
        if self.first_step is None:
            self.first_step = step
        if self.rate_from is None:
            if step - self.first_step >= WARM_STEPS:
                self.rate_from = (step, elapsed)
            return max(planned, step + 1)
        first_step, first_elapsed = self.rate_from
        steps_per_second = (step - first_step) / max(elapsed - first_elapsed, 1e-9)
        return step + max(0, math.floor((self.seconds - spent) * steps_per_second))
