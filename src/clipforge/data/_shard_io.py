"""Reading a tar shard's bytes: a local file, an http(s) URL or a ``pipe:`` command's output,
with every failure as one line naming the shard (ShardReadError), and counting a shard's samples
from its headers (a file cut between two members is caught, not read as a shorter shard)."""
from __future__ import annotations

import http.client
import re
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips members named like __meta__
TIMEOUT_S = 60  # an http(s) server that sends nothing for this long fails the shard
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, http.client.HTTPException, zlib.error)  # I/O, damage, lost link
_SIGPIPE_STATUSES = (-signal.SIGPIPE, 128 + signal.SIGPIPE)  # we stopped reading first (directly / via sh)


class ShardReadError(ValueError):
    """A shard that cannot be read; one line: ``shard URL: problem``."""

    def __init__(self, url: str, problem: str):
        self.url = url
        super().__init__(f"shard {url}: {problem}")

    def at_start(self, when: str) -> ValueError:
        """This error for start-up, with what was expected and why the shard was read (``when``)."""
        what = "a command writing a tar file to stdout" if self.url.startswith("pipe:") else "a tar file of samples"
        return ValueError(f"{self}; expected {what} ({when})")


def require_webdataset():
    """The ``webdataset`` package (an optional dependency), or an ImportError saying how to get it."""
    try:
        import webdataset
    except ImportError:
        raise ImportError("tar shards need the webdataset package: pip install 'clipforge[train]'") from None
    return webdataset


def is_remote(url: str) -> bool:
    """Whether ``url`` is a ``pipe:`` command or an http(s) URL rather than a local path."""
    return url.startswith("pipe:") or url.startswith(("http://", "https://"))


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, its end kept when longer than ``limit`` (a command's last words matter)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def problem_text(err: BaseException, stream=None) -> str:
    """What went wrong reading a shard, in words, without webdataset's `` @ <stream object>`` tail."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"the server sent nothing for {TIMEOUT_S} s"
    if isinstance(err, urllib.error.URLError):
        return f"cannot reach the server: {getattr(reason, 'strerror', None) or reason}"
    if isinstance(err, http.client.IncompleteRead):
        return "the server closed the connection before the end of the file"
    text = (str(err.args[0]) if err.args else "").replace(f" @ {stream}", "") or type(err).__name__
    if isinstance(err, (tarfile.TarError, EOFError, zlib.error)):
        return f"damaged or not a tar file: {_one_line(text)}"
    return _one_line(getattr(err, "strerror", None) or text)


@contextmanager
def _open_pipe(url: str):
    """The standard output of ``pipe:COMMAND``; raises ShardReadError with the command's exit
    status and the end of its stderr when it fails (status 0, or SIGPIPE once we stop reading, is fine)."""
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        process, failure = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=stderr), None
        try:
            yield process.stdout
        except _READ_ERRORS as err:
            failure = err
        finally:
            process.stdout.close()  # a command still writing gets SIGPIPE and ends
            try:
                status = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait()
        if status not in (0, *_SIGPIPE_STATUSES):  # the cause, whatever its output looked like
            stderr.seek(0)
            tail = _one_line(stderr.read().decode("utf-8", "replace"))
            raise ShardReadError(url, f"the command exited with status {status}" + (f" ({tail})" * bool(tail)))
        if failure is not None:
            raise ShardReadError(url, f"its output: {problem_text(failure, process.stdout)} (exit status {status})")


@contextmanager
def open_shard(url: str):
    """A readable binary stream of shard ``url``: a local file, an http(s) response or a pipe's output.
    Errors opening or reading it (in the ``with`` block) become a ShardReadError naming the shard and
    the problem: the HTTP status, the pipe's exit status and stderr, the tar damage."""
    if url.startswith("pipe:"):
        with _open_pipe(url) as stream:
            yield stream
        return
    stream, status = None, ""
    try:
        if url.startswith(("http://", "https://")):
            stream = urllib.request.urlopen(url, timeout=TIMEOUT_S)
            status = f" (HTTP {stream.status})"
        else:
            stream = open(url, "rb")
        with stream:
            yield stream
    except _READ_ERRORS as err:
        raise ShardReadError(url, problem_text(err, stream) + status) from None


def count_samples(path: str) -> int:
    """Samples in a tar shard, counted the way webdataset groups members, from headers only
    (ShardReadError, naming the shard, when it cannot be read to its end)."""
    base_plus_ext = require_webdataset().tariterators.base_plus_ext
    count, last_key = 0, None
    with open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            key, _ = base_plus_ext(member.name)
            if key is not None and key != last_key:
                count, last_key = count + 1, key
        if not is_remote(path) and getattr(tar.fileobj, "comptype", None) == "tar":
            _check_archive_end(path, tar.offset)
    return count


def _check_archive_end(path: str, end: int) -> None:
    """ShardReadError unless the local, uncompressed shard ``path`` has tar's end-of-archive block (512
    zero bytes) at byte ``end``, after its last member: tarfile reads a file cut between two members,
    or garbage after one, as a shorter tar, and the lost samples would go uncounted."""
    with open(path, "rb") as file:
        file.seek(end)
        block = file.read(tarfile.BLOCKSIZE)
    if block != bytes(tarfile.BLOCKSIZE):
        raise ShardReadError(path, f"damaged or not a tar file: no end-of-archive block after its last member "
                                   f"(byte {end}); the file was cut short or overwritten")
