"""Writing output files safely: atomically, with the usual permissions, one line on a full disk.

Every file clipforge writes for a user (models, reports, plots, configs, shards, embeddings) goes
through :func:`atomic_path` or :func:`write_text_atomic`: the content is written to a temporary
name beside the target and renamed into place, so a reader sees the old file or the whole new one,
and a failure (full disk, a kill) leaves the previous file intact and no partial file. The result
gets the permissions of a plain ``open()`` under the process umask (``torch.save``'s), not the
0600 of a temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator


def _current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode a new file (0666) or folder (0777) gets under the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_current_umask())


class DiskFullError(OSError):
    """Writing an output failed for lack of space; the message names the file."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a full disk or quota.

    Writers wrap the OS error: safetensors as ``SafetensorError(... os error 28)``, ``torch.save``
    into an open file as a ``RuntimeError`` whose context is the ``OSError``.
    """
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "os error 28" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def why_missing(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened, for an error message: a symlink loop, a dangling symlink, or absent."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno == errno.EACCES:
            return "cannot be read (permission denied)"
        return "no such file or folder"
    return "exists"


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    On any error the temporary file is removed and ``path`` is left as it was; a full disk is
    raised as :class:`DiskFullError` with one line naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        normal_permissions(temporary)
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            full = DiskFullError(f"no space left on the device writing {path} (the previous file, if any, is intact)")
            full.errno = errno.ENOSPC
            raise full from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def read_utf8(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; a one-line ValueError naming the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
