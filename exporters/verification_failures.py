"""Why a verification failed, typed: each kind carries its numbers, and `message()` is the one line the report,
its summary table and the CLI's error print.

A row is checked in order (exporters.verify): the runtime runs the graph (`RuntimeFailure`), the outputs are
the spec's (`NamesFailure`, `CountFailure`), with eager's shapes (`ShapesFailure`), the replayed outputs within
tolerance and without NaN (`ValuesFailure`), and every bucket disagreement a certified near-tie
(`CertificateFailure`). A graph with LSH layers needs its verification twin (`NoTwinFailure`), which must hold
every node kind of the shipped graph (`TwinMismatchFailure`). A quantized graph is judged by its task verdict
(`AccuracyFailure`, exporters.task_verdict)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

from .task_verdict import TaskVerdict
from .twin_difference import twin_difference_text


class VerificationFailure(ABC):
    """One reason a row or a report fails; `kind` names the check that failed."""

    kind: ClassVar[str]

    @abstractmethod
    def message(self) -> str:
        """The one line users see."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "message": self.message()}


@dataclass
class RuntimeFailure(VerificationFailure):
    """The runtime raised running the graph (a shape it cannot run, a file it cannot load)."""

    kind: ClassVar[str] = "runtime"
    error: str  # the error's first line

    def message(self) -> str:
        return f"runtime error: {self.error}"


@dataclass
class NamesFailure(VerificationFailure):
    """The graph names its outputs otherwise than the spec."""

    kind: ClassVar[str] = "names"
    actual: list[str]
    expected: list[str]

    def message(self) -> str:
        return f"the graph's outputs are {self.actual}, the spec's {self.expected}"


@dataclass
class CountFailure(VerificationFailure):
    """The graph returns another number of outputs than expected (where its format names none): `what` it
    returns, and `reference`, who expects `expected` of them."""

    kind: ClassVar[str] = "names"
    returned: int
    expected: int
    what: str = "outputs"
    reference: str = "the spec names"

    def message(self) -> str:
        return f"the graph returns {self.returned} {self.what}, {self.reference} {self.expected}"


@dataclass
class ShapesFailure(VerificationFailure):
    """An output whose shape is not eager's (the first such, in output order)."""

    kind: ClassVar[str] = "shapes"
    output: str
    actual: tuple[int, ...]
    expected: tuple[int, ...]

    def message(self) -> str:
        return f"{self.output} has shape {self.actual}, eager {self.expected}"


@dataclass
class ValuesFailure(VerificationFailure):
    """The judged outputs (the twin's with eager's buckets forced where `replayed`, else the graph's own) differ
    from eager's by `max_abs` > `tolerance`; a max_abs of NaN: an output holds NaN where eager's does not."""

    kind: ClassVar[str] = "values"
    max_abs: float
    tolerance: float
    replayed: bool = False

    def message(self) -> str:
        if math.isnan(self.max_abs):
            return "runtime output holds NaN"
        what = "replayed outputs" if self.replayed else "outputs"
        return (f"{what} differ by {self.max_abs:.3g} > tolerance {self.tolerance:.2g}"
                + (" with eager's buckets in every LSH layer: the graph computes something else"
                   if self.replayed else ""))


@dataclass
class CertificateFailure(VerificationFailure):
    """Bucket disagreements with eager that are not near-ties (exporters.near_ties): the graph hashes
    differently. `worst`: the one furthest past its bound, with its margin and bound."""

    kind: ClassVar[str] = "certificate"
    uncertified: int
    disagreements: int
    worst_margin: float | None
    worst_bound: float | None
    worst: str

    def message(self) -> str:
        return (f"{self.uncertified} of {self.disagreements} bucket disagreements are not near-ties, the graph "
                f"hashes differently; worst: {self.worst}")


@dataclass
class NoTwinFailure(VerificationFailure):
    """A graph with LSH layers verified without its twin: the layers cannot be checked apart from their hashing."""

    kind: ClassVar[str] = "twin"
    lsh_layers: int

    def message(self) -> str:
        return "no verification twin given: LSH layers cannot be checked apart from their hashing"


@dataclass
class TwinMismatchFailure(VerificationFailure):
    """The twin lacks node kinds of the shipped graph (`missing`, with their counts): it is another graph."""

    kind: ClassVar[str] = "twin"
    missing: dict[str, int]

    def message(self) -> str:
        return f"the verification twin is not the shipped graph: {twin_difference_text({}, self.missing)}"


@dataclass
class AccuracyFailure(VerificationFailure):
    """A quantized graph that fails its task verdict on `runtime` (exporters.task_verdict, whose bounds the
    numbers are measured against); `reasons`: the verdict's, one line."""

    kind: ClassVar[str] = "accuracy"
    runtime: str
    reasons: str
    relative_error: dict[str, float]
    bits_per_token_change: float | None
    decided_top1_agreement: float | None
    decided_changes: int

    @classmethod
    def of(cls, verdict: TaskVerdict) -> AccuracyFailure:
        return cls(verdict.runtime, verdict.note, dict(verdict.relative_error), verdict.bits_per_token_change,
                   verdict.decided_top1_agreement, verdict.decided_changes)

    def message(self) -> str:
        return f"the quantized graph fails its task on {self.runtime}: {self.reasons}"
