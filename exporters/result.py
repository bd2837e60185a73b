"""What exporters.api.run_export returns: where the export went, what it applied, how long each step took,
the verification report, as a summary table for people and a dict for the JSON report."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass, field

from .formats import FORMATS
from .request import ExportRequest

# What a report records the versions of; ONNX Runtime comes as either package (both provide `onnxruntime`).
REPORTED_DISTRIBUTIONS = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu")


@dataclass
class ExportResult:
    request: ExportRequest
    model: str  # one line: name, origin, whether the weights are random
    task: str
    output: str | None  # where the file is; None when verification failed and it was removed
    size_bytes: int
    settings: dict  # what the export applied (exporters.api.applied_settings)
    # What the user should know about the graph (exporters.api.export_notes).
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, export (aoti: and compile), verify
    verification: object | None = None  # exporters.verify.VerificationReport, None without verification

    @property
    def passed(self) -> bool:
        """False only when verification ran and failed."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        return {
            "request": asdict(self.request),
            "model": self.model,
            "task": self.task,
            "output": self.output,
            "size_bytes": self.size_bytes,
            "settings": self.settings,
            "notes": self.notes,
            "versions": library_versions(),
            "seconds": self.seconds,
            "verified": self.verification is not None,
            "passed": self.passed,
            "verification": None if self.verification is None else self.verification.to_dict(),
        }

    def summary_table(self) -> str:
        settings = self.settings
        options = f"{settings['format']}, {settings['dtype']}, {settings['device']}"
        options += f", max length {settings['max_length']}"
        options += FORMATS[settings["format"]].summary(settings)
        if settings.get("quantize"):
            options += f", {settings['quantize']} (dynamic{quantize_recipe_summary(settings)}; LSH hashing in fp32)"
        if settings.get("with_buckets"):
            options += ", with bucket outputs"
        if self.verification is None:
            verdict = "skipped (--no-verify)"
        else:
            verdict = "passed" if self.passed else "FAILED" + ("" if self.output else ": output removed")
        rows = [
            ("model", self.model),
            ("task", self.task),
            ("export", options),
            ("output", f"{self.output} ({self.size_bytes / 1e6:.2f} MB)" if self.output else "(none)"),
            ("time", ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())),
            ("verification", verdict),
        ] + [("note", note) for note in self.notes]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        if self.verification is not None:
            lines += ["", self.verification.summary_table()]
        return "\n".join(lines)


def library_versions() -> dict[str, str | None]:
    """Python's version and the installed versions of REPORTED_DISTRIBUTIONS (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def quantize_recipe_summary(settings: dict) -> str:
    """", " and how the recipe settings name quantizes (exporters.quantize.RECIPES); "" where none is named (a
    decoder export whose verification failed)."""
    from .quantize import RECIPES

    recipe = settings.get("quantize_recipe")
    return "" if recipe is None else f", {RECIPES[recipe].summary}"
