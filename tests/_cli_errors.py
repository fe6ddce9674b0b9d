"""Reading a command's one-line error from captured stderr."""


def one_error_line(capsys, command: str = "train") -> str:
    """The single ``clipforge COMMAND: error: ...`` line on stderr; fails on a traceback or on more than one."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"clipforge {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]
