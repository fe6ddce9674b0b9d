"""One training per run folder: the folder lock, the refusal to mix two runs, and leftover clean-up.

- :class:`RunFolderLock` is an advisory POSIX record lock (``fcntl.lockf``) on ``run_dir/.lock``,
  which holds the pid and host of its owner. The lock belongs to the process, not to the open
  file: the kernel drops it when the process exits, a SIGKILL included, and processes forked
  from it (data-loader workers, which may outlive it by seconds) never hold it, so a crashed run
  leaves nothing that blocks the next one. A second training into the same folder refuses with
  one line naming the first.
- :func:`check_fresh_start` refuses a new run (no ``--resume``) in a folder that already holds
  one, unless ``overwrite``; :func:`start_over` then moves the old run's files aside (into
  ``run_dir/replaced-<time>/``), so old and new checkpoints are never mixed.
- :func:`set_aside_later` does the same for a run resumed from an earlier checkpoint: the
  abandoned run's later checkpoints move aside, with a copy of its logs, so the folder holds one
  history and ``--resume latest`` never picks the abandoned one up again.
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

    # Lock files this process holds. A POSIX lock is the process's: a second acquire from the same
    # process would succeed, and closing any descriptor of the file would drop the lock, so a second
    # lock in this process is refused before the file is even opened.
    _held: set[str] = set()

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise :class:`RunFolderBusy` naming its owner; returns ``self``."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in RunFolderLock._held:
            raise RunFolderBusy(f"{self.path.parent} is in use by another training in this process "
                                f"(pid {os.getpid()}); wait for it to finish or pass another --run-dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a record lock on the whole file
        except OSError as err:
            owner = _read_owner(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(
                    f"{self.path.parent} is in use by another training ({owner or 'owner unknown'}); "
                    "wait for it to finish, stop it, or pass another --run-dir") from None
            return self  # a filesystem without locks (some network mounts): train unlocked
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd, self._key = fd, key
        RunFolderLock._held.add(key)
        return self

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        if self.fd is not None:
            import fcntl

            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            RunFolderLock._held.discard(self._key)
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
        raise ValueError(f"{run_dir} holds a run at step {step}: pass --resume latest to continue, "
                         "or --overwrite to start again")
    if stopped_before_first_checkpoint(run_dir):
        raise ValueError(f"{run_dir} holds a run that stopped before its first checkpoint, so there is nothing "
                         f"to resume: pass --overwrite to start again (its {METRICS_FILE} is moved into replaced-*/)")


def stopped_before_first_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run's metrics but no checkpoint (it stopped before its first)."""
    metrics = Path(run_dir) / METRICS_FILE
    return not list_checkpoints(run_dir) and metrics.is_file() and metrics.stat().st_size > 0


def start_over(run_dir: str | os.PathLike) -> Path | None:
    """Move the previous run's files into ``run_dir/replaced-<time>/``; returns that folder (None: nothing)."""
    run_dir = Path(run_dir)
    present = [run_dir / name for name in _RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    aside = _new_aside_folder(run_dir)
    for path in present:
        os.replace(path, aside / path.name)
    return aside


def set_aside_later(run_dir: str | os.PathLike, step: int) -> tuple[Path, list[Path]] | None:
    """Resuming at ``step``: move the checkpoints past it into ``run_dir/replaced-<time>/checkpoints/``.

    The run files beside them (metrics, curves, config, TensorBoard) are copied there too, as the
    abandoned run left them, since the resumed run rewrites them from ``step`` on. Returns the
    folder and the checkpoints moved, or None when no checkpoint is past ``step``.
    """
    run_dir = Path(run_dir)
    later = [path for path in list_checkpoints(run_dir) if int(path.name.rsplit("_", 1)[1]) > step]
    if not later:
        return None
    aside = _new_aside_folder(run_dir)
    for name in _RUN_FILES:  # copies first: a failed copy (a full disk) leaves every checkpoint in place
        source = run_dir / name
        if name == "checkpoints" or not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, aside / name)
        else:
            shutil.copy2(source, aside / name)
    (aside / "checkpoints").mkdir()
    for path in later:
        os.replace(path, aside / "checkpoints" / path.name)
    return aside, later


def _new_aside_folder(run_dir: Path) -> Path:
    """A new, empty ``run_dir/replaced-<time>[-n]/`` folder."""
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while aside.exists():
        aside, suffix = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
    aside.mkdir()
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
