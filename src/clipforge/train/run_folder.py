"""One training per run folder: the folder lock, the refusal to mix two runs, and leftover clean-up.

- :class:`RunFolderLock` is an advisory ``fcntl.flock`` on ``run_dir/.lock``, which holds the pid
  and host of its owner. The lock belongs to the open file descriptor, so it is released on any
  exit, a SIGKILL included, and a crashed run leaves nothing that blocks the next one. A second
  training into the same folder refuses with one line naming the first.
- :func:`check_fresh_start` refuses a new run (no ``--resume``) in a folder that already holds
  one, unless ``overwrite``; :func:`start_over` then moves the old run's files aside (into
  ``run_dir/replaced-<time>/``), so old and new checkpoints are never mixed.
- :func:`remove_leftovers` deletes the temporary checkpoint folders (``.tmp_step_*``,
  ``.stale_step_*``) of processes that died while writing. It runs with the lock held, so no live
  process of another run can own them.

Only rank 0 writes to the run folder, so only rank 0 takes the lock.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path

from .log import CURVES_FILE, METRICS_FILE
from .resume import checkpoint_dir, list_checkpoints

LOCK_FILE = ".lock"
_LEFTOVER_PATTERNS = (".tmp_step_*", ".stale_step_*")
# What a run leaves in its folder; --overwrite moves these aside.
_RUN_FILES = ("checkpoints", METRICS_FILE, CURVES_FILE, "tensorboard", "train_config.json")


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock; the message names it."""


class RunFolderLock:
    """Hold ``run_dir/.lock`` exclusively for the life of a training; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_owner(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another training ({owner or 'owner unknown'}); "
                    "wait for it to finish, stop it, or pass another --run-dir") from None
            return self  # a filesystem without flock (some network mounts): train unlocked
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            # Unlock before closing: data-loader workers forked during the training share the open
            # file (and so the flock) until they exit, which can be after this training returns.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def check_fresh_start(run_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one (checkpoints or metrics), unless ``overwrite``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir}: is a file; expected a folder for checkpoints and metrics")
    if overwrite or not run_dir.exists():
        return
    found = list_checkpoints(run_dir)
    if found:
        step = int(found[-1].name.rsplit("_", 1)[1])
        what = f"holds a run at step {step}"
    elif (run_dir / METRICS_FILE).is_file() and (run_dir / METRICS_FILE).stat().st_size:
        what = f"holds a run's {METRICS_FILE} (no checkpoint yet)"
    else:
        return
    raise ValueError(f"{run_dir} {what}: pass --resume latest to continue, or --overwrite to start again")


def start_over(run_dir: str | os.PathLike) -> Path | None:
    """Move the previous run's files into ``run_dir/replaced-<time>/``; returns that folder (None: nothing)."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in _RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while aside.exists():
        aside, suffix = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    return aside


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint folders left by dead processes (call with the lock held)."""
    folder = checkpoint_dir(run_dir)
    removed = []
    if folder.is_dir():
        for pattern in _LEFTOVER_PATTERNS:
            for path in folder.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
