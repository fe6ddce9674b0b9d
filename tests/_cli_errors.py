"""Reading a command's one-line error from captured stderr."""


def one_error_line(capsys, command: str = "train") -> str:
    """The single ``clipforge COMMAND: error: ...`` line on stderr; fails on a traceback or on more than one."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"clipforge {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``clipforge argv``; argparse's exit counts as a status."""
    from clipforge.cli import main

    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    """stderr without the random-weights warning and progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and "RANDOM weights" not in line
            and "it/s" not in line and "img/s" not in line]
