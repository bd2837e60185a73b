"""Typed export errors. Messages are one line and say what to do next; the CLI prints them as they are."""

from __future__ import annotations

from reformer.messages import first_line  # noqa: F401  (exporters import it from here)


class ExportError(Exception):
    """An export that could not be written (bad arguments, a graph the exporter cannot build, an invalid file)."""


class VerificationError(ExportError):
    """An exported graph whose outputs differ from eager PyTorch beyond tolerance.

    report: the `exporters.verification_report.VerificationReport` with every row's numbers and failures."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report



class ExportRequestError(ExportError):
    """A request that cannot be carried out as given (bad option, unusable device or output path)."""
