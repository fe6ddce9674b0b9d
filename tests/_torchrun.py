"""Launch ``python -m torch.distributed.run`` for a test: processes on this machine, with
torchelastic's scratch folders kept inside the test's own temporary folder (a plain launch leaves a
``/tmp/torchelastic_*`` folder behind each time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(args: list[str], scratch: Path, nproc: int = 2, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=nproc ARGS`` (``-m clipforge.cli ...`` or a script
    and its arguments); its temporary files go under ``scratch``. Output is captured as text."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**(env if env is not None else os.environ), "TMPDIR": str(scratch)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def failure(done: subprocess.CompletedProcess) -> str:
    """The tails of a finished launch's output, for an assertion message."""
    return done.stdout[-3000:] + done.stderr[-3000:]
