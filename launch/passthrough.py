"""The launchers' command lines: their own options, then `--`, then the arguments of the program they start."""
from __future__ import annotations


def split_at_separator(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's own arguments, everything after the first `--`); no `--`: all are the launcher's."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
