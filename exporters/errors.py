"""Typed export errors. Messages are one line and say what to do next; the CLI prints them as they are."""

from __future__ import annotations


class ExportError(Exception):
    """An export that could not be written (bad arguments, a graph the exporter cannot build, an invalid file)."""


class VerificationError(ExportError):
    """An exported graph whose outputs differ from eager PyTorch beyond tolerance.

    report: the `exporters.verify.VerificationReport` with every row's numbers."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none): library errors
    span many lines, our messages one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
