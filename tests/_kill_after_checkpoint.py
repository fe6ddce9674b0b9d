"""Run ``clipforge`` in a child process that SIGKILLs itself right after writing checkpoint step K.

Deterministic where polling for the checkpoint folder is not: the kill comes from inside, after
the rename that makes the checkpoint complete, before the next step starts.
"""
from __future__ import annotations

import signal
import subprocess
import sys

import torch

_CHILD = """
import os, signal, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import clipforge.train.loop as loop
save, kill_after = loop.save_checkpoint, int(sys.argv[2])
def save_then_die(run_dir, model, state, step, keep):
    path = save(run_dir, model, state, step, keep)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.save_checkpoint = save_then_die
from clipforge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def train_and_kill(args: list[str], kill_after: int, timeout: float = 600) -> str:
    """Run ``clipforge args...`` until it has written checkpoint ``kill_after``; returns its output.

    Raises AssertionError when the child ended any other way. The child uses this process's
    thread count, so its float results equal an in-process run's.
    """
    done = subprocess.run([sys.executable, "-c", _CHILD, str(torch.get_num_threads()), str(kill_after), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == -signal.SIGKILL, f"the child ended with {done.returncode}, not killed:\n{output[-3000:]}"
    return output
