"""What a verification found (exporters.verify, exporters.decoder_verification): one row per runtime and shape
with its numbers and typed failures (exporters.verification_failures), and the report over them, which renders
the summary table, the JSON report and the one-line failure message."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from .task_verdict import TaskVerdict
from .twin_difference import twin_difference_text
from .verification_failures import AccuracyFailure, TwinMismatchFailure, VerificationFailure


@dataclass
class VerificationRow:
    runtime: str
    device: str
    shape: tuple[int, int]  # batch, length
    dtype: str  # precision: fp32 (strict), tf32 or fp16
    tolerance: float = float("nan")
    # Judged: the twin with eager's buckets forced (the shipped graph itself when there is nothing to replay).
    replay_max_abs: float = float("nan")
    replay_max_rel: float = float("nan")
    # Near-tie certificates: disagreements with eager's buckets (the twin's, every layer, and the shipped
    # graph's first LSH layer), how many are certified, and the one closest to (or past) its bound.
    disagreements: int = 0
    certified: int = 0
    worst_margin: float | None = None
    worst_bound: float | None = None
    worst_disagreement: str = ""
    # Information: the shipped graph running freely.
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    flipped_buckets: int = 0
    total_buckets: int = 0
    first_layer_flipped: int = 0
    first_layer_total: int = 0
    replayed: bool = False
    passed: bool = False
    note: str = ""  # a failed row's failures, one line; a passed row's information
    failures: list[VerificationFailure] = field(default_factory=list)

    @property
    def flips(self) -> str:
        """Flipped of total bucket assignments, exactly: a percentage would round a few flips away."""
        return f"{self.flipped_buckets}/{self.total_buckets}" if self.total_buckets else "-"

    def conclude(self, failures: Sequence[VerificationFailure], information: str = "") -> None:
        """The row's verdict: failed for `failures` (the note lists them), else passed with `information` as
        its note."""
        self.failures = list(failures)
        self.passed = not self.failures
        self.note = "; ".join(failure.message() for failure in self.failures) or information

    def to_dict(self) -> dict:
        return {**asdict(self), "failures": [failure.to_dict() for failure in self.failures]}


@dataclass
class VerificationReport:
    format: str
    path: str
    rows: list[VerificationRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # runtimes not present, with the reason
    twin_extra_nodes: dict[str, int] = field(default_factory=dict)  # node kinds only the twin has
    twin_missing_nodes: dict[str, int] = field(default_factory=dict)  # shipped node kinds the twin lacks
    # Quantized graphs only: one per runtime (exporters.task_verdict), judged instead of the rows' tolerance.
    task_verdicts: list[TaskVerdict] = field(default_factory=list)

    @property
    def failures(self) -> list[VerificationFailure]:
        """The report's own failures, beside its rows': a twin that is not the shipped graph, failed task
        verdicts."""
        twin = [TwinMismatchFailure(dict(self.twin_missing_nodes))] if self.twin_missing_nodes else []
        return twin + [AccuracyFailure.of(verdict) for verdict in self.task_verdicts if not verdict.passed]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows) and not self.failures

    def to_dict(self) -> dict:
        return {"format": self.format, "path": self.path, "passed": self.passed,
                "rows": [row.to_dict() for row in self.rows], "skipped": list(self.skipped),
                "twin_extra_nodes": dict(self.twin_extra_nodes), "twin_missing_nodes": dict(self.twin_missing_nodes),
                "task_verdicts": [asdict(verdict) for verdict in self.task_verdicts],
                "failures": [failure.to_dict() for failure in self.failures]}

    def summary_table(self) -> str:
        header = ("runtime", "device", "shape", "dtype", "replay abs", "replay rel", "tolerance", "near-ties",
                  "worst margin/bound", "free abs", "free flips", "result")
        lines = [header]
        for row in self.rows:
            certified = f"{row.certified}/{row.disagreements}" if row.replayed else "-"
            worst = "-" if row.worst_margin is None else f"{abs(row.worst_margin):.1e}/{row.worst_bound:.1e}"
            lines.append((row.runtime, row.device, f"{row.shape[0]}x{row.shape[1]}", row.dtype,
                          f"{row.replay_max_abs:.2e}", f"{row.replay_max_rel:.2e}",
                          f"{row.tolerance:.2g}" if row.tolerance == row.tolerance else "-",
                          certified, worst, f"{row.max_abs:.2e}", row.flips, "pass" if row.passed else "FAIL"))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text += [f"{row.runtime} {row.device} {row.shape[0]}x{row.shape[1]}: {row.note}"
                 for row in self.rows if row.note]
        if self.twin_extra_nodes or self.twin_missing_nodes:
            text.append(f"verification twin: {twin_difference_text(self.twin_extra_nodes, self.twin_missing_nodes)}")
        if self.task_verdicts:
            text.append("int8 graph: its replayed and free-running errors and bucket disagreements (certified within "
                        "fp32 rounding / all) are information; the task verdict judges it")
        text += [verdict.summary() for verdict in self.task_verdicts]
        text += [f"skipped {reason}" for reason in self.skipped]
        return "\n".join(text)

    def failure_message(self) -> str:
        """One line from the failures: the twin's, else the worst failing row's with its numbers, else the first
        failed task verdict's ('' when the report passed)."""
        failures = self.failures  # the twin's first
        failing = [row for row in self.rows if not row.passed]
        if failures and (isinstance(failures[0], TwinMismatchFailure) or not failing):
            return failures[0].message()
        if not failing:
            return "" if self.rows else "verification ran on no runtime"
        worst = max(failing, key=lambda row: row.replay_max_abs / row.tolerance
                    if row.replay_max_abs == row.replay_max_abs else float("inf"))
        reasons = "; ".join(failure.message() for failure in worst.failures)
        return (f"{len(failing)} of {len(self.rows)} checks failed; worst: {worst.runtime} {worst.device} "
                f"{worst.shape[0]}x{worst.shape[1]} {worst.dtype}: {reasons}")
