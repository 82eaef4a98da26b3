"""Running the command-line entry points in-process, as the tests of the CLIs do."""

from __future__ import annotations

from typing import Callable, Optional


def run_main(main: Callable[[Optional[list[str]]], None], argv: list[str], capsys):
    """`main(argv)` with pytest's `capsys`: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
