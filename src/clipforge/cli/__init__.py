"""The ``clipforge`` command: parses arguments, then calls the library.

Each sub-command lives in its own module here with ``register(subparsers)``, which adds its parser
and sets ``func`` to a function taking the parsed namespace and returning an exit code.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .._version import __version__
from ..files import DiskFullError

# One module per command group, in the order ``clipforge --help`` lists them.
COMMANDS = ["models", "convert", "shards", "classify", "eval", "overlap", "train", "embed", "index", "serve", "demo"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP models: load, convert, train, evaluate.")
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    """The parser of sub-command ``command``, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


# Errors about a path the user gave or the space to write it: one line, not a traceback.
_PATH_ERRORS = (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError, FileNotFoundError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP}


def is_user_os_error(err: OSError) -> bool:
    """Whether ``err`` is about the user's files (named, or a permission, space, read-only problem).

    Others (an ``OSError`` naming no file, e.g. out of memory or an I/O error inside a library)
    stay crashes with a traceback: they point at a bug or a broken machine, not at an argument.
    """
    return (isinstance(err, (_PATH_ERRORS, DiskFullError)) or err.filename is not None
            or err.errno in _USER_ERRNOS)


def os_error_line(err: OSError) -> str:
    """``err`` as one line: ``Permission denied: /data/val`` (``a -> b`` for a rename)."""
    if err.filename is None or not err.strerror:
        return " ".join(str(err).split()) or type(err).__name__
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    return f"{err.strerror}: {err.filename}{target}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # shown with the sub-command's usage, not the top-level one
        command = _subcommand_parser(parser, args.command) or parser
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `clipforge ... | head -1`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, ValueError) as err:
        print(f"clipforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_user_os_error(err):
            raise  # no file named, not a permission or space problem: a bug worth its traceback
        print(f"clipforge {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
