"""Small assertions shared by the CLI-facing tests."""

from __future__ import annotations


def one_line_error(capsys, rc: int, code: int) -> str:
    """Assert the command returned `code` with exactly one `evalsuite: error:` line and no traceback."""
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("evalsuite: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
