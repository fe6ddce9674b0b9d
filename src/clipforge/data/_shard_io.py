"""Reading a tar shard's bytes: a local file, an http(s) URL or a ``pipe:`` command's output,
with every failure as one line naming the shard (ShardReadError); its members (ShardMembers) and
its sample count from its headers. A shard cut between two members (or overwritten after one),
local or streamed, plain or compressed, is caught by its missing end-of-archive block, not read
as a shorter shard."""
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
        self.url, self.problem = url, problem
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
        except (*_READ_ERRORS, ShardReadError) as err:  # a failed command's status says more than its output
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
            problem = failure.problem if isinstance(failure, ShardReadError) else problem_text(failure, process.stdout)
            raise ShardReadError(url, f"its output: {problem} (exit status {status})")


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


class _EndMarkingInfo(tarfile.TarInfo):
    """Marks its TarFile (``ended_at_marker``) when the header block it reads is tar's end-of-archive
    block (512 zero bytes). tarfile ends the member list alike there, at the end of the data (a
    stream cut between two members) and at a block that is no header (garbage after a member)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ended_at_marker = True
            raise


class _MarkedTar(tarfile.TarFile):
    """A TarFile whose ``ended_at_marker`` says whether its member list ended at the end-of-archive block."""

    tarinfo = _EndMarkingInfo
    ended_at_marker = False  # set on the instance by _EndMarkingInfo (also while __init__ reads the first header)


class ShardMembers:
    """The regular members of one shard's tar stream, in order, as webdataset's ``{"fname", "data",
    "__url__"}`` dicts (``data`` None unless ``read_data``), metadata members (``__x__``) left out.
    Compressed streams (``.tar.gz``) are read decompressed. Once they are all read, ``check_end()``
    raises ShardReadError unless the archive ended with its end-of-archive block: checked apart so
    that webdataset's grouping first hands out the last sample read."""

    def __init__(self, stream, url: str, read_data: bool = True):
        self.stream, self.url, self.read_data = stream, url, read_data
        self.end: int | None = None  # byte after the last member (decompressed), once all are read
        self.complete = False  # the read stopped at the end-of-archive block

    def __iter__(self):
        with _MarkedTar.open(fileobj=self.stream, mode="r|*") as tar:
            for member in tar:
                if member.isreg() and not _META_MEMBER.match(member.name):
                    data = tar.extractfile(member).read() if self.read_data else None
                    yield {"fname": member.name, "data": data, "__url__": self.url}
                tar.members = []  # a stream: keep no list of every header read
            self.end, self.complete = tar.offset, tar.ended_at_marker

    def check_end(self) -> None:
        """ShardReadError unless every member was read and the archive's end-of-archive block followed."""
        if self.end is None:
            raise RuntimeError("ShardMembers.check_end() before the members were all read")
        if not self.complete:
            where = "stream" if is_remote(self.url) else "file"
            raise ShardReadError(self.url, f"damaged or not a tar file: no end-of-archive block after its last "
                                           f"member (byte {self.end}); the {where} was cut short or overwritten")


def count_samples(path: str) -> int:
    """Samples in a tar shard, counted the way webdataset groups members, from headers only
    (ShardReadError, naming the shard, when it cannot be read to its end-of-archive block)."""
    base_plus_ext = require_webdataset().tariterators.base_plus_ext
    count, last_key = 0, None
    with open_shard(path) as stream:
        members = ShardMembers(stream, path, read_data=False)
        for member in members:
            key, _ = base_plus_ext(member["fname"])
            if key is not None and key != last_key:
                count, last_key = count + 1, key
        members.check_end()
    return count
