"""Error messages are one line: the CLI prints them as they are."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none): library errors
    span many lines, our messages one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
