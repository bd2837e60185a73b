"""A graph's outputs against eager's, the steps the task graphs' and the decoder's verification share: output
names, then shapes (each a typed failure), then values over the positions the mask keeps, bucket flips, near-tie
certificates, and the row's verdict from them (exporters/verify.py describes the protocol)."""

from __future__ import annotations

from .errors import first_line
from .near_ties import Disagreement
from .runners import Runner
from .specs import TaskSpec
from .verification_failures import (
    CertificateFailure,
    CountFailure,
    NamesFailure,
    RuntimeFailure,
    ShapesFailure,
    ValuesFailure,
    VerificationFailure,
)
from .verification_report import VerificationRow


def run_checked(runner: Runner, inputs: list, names: list[str], expected: list, row: VerificationRow,
                buckets_optional: bool = False):
    """The runner's outputs, or None with the row failed: a runtime error, output names (or their number) that
    are not the spec's, or a shape that is not eager's (`expected`; values are the caller's). `names`: the task
    outputs then the bucket outputs, which a deployment graph may leave out (`buckets_optional`)."""
    try:
        outputs = runner.run(inputs)
    except Exception as error:  # a runtime that cannot run a shape fails that row, with its reason
        row.conclude([RuntimeFailure(first_line(error))])
        return None
    if buckets_optional and len(outputs) == len(expected):
        names = names[:len(expected)]
    failure = None
    if runner.output_names is not None and runner.output_names != names:
        failure = NamesFailure(runner.output_names, names)
    elif len(outputs) != len(names):
        failure = CountFailure(len(outputs), len(names))
    else:
        failure = shape_mismatch(names, expected, outputs)
    if failure is not None:
        row.conclude([failure])
        return None
    return outputs


def shape_mismatch(names, expected, actual) -> ShapesFailure | None:
    """None when every tensor has eager's shape, else the first that does not."""
    for name, want, got in zip(names, expected, actual):
        if got.shape != want.shape:
            return ShapesFailure(name, tuple(got.shape), tuple(want.shape))
    return None


def output_error(spec: TaskSpec, expected, actual, keep) -> tuple[float, float]:
    """Max abs error over every output (NaN if any runtime value is NaN where eager's is not) and the output
    scale: the largest eager magnitude, at least 1, both at the positions `keep` (B, L) selects in per-position
    outputs."""
    max_abs, scale = 0.0, 1.0
    for name, want, got in zip(spec.output_names, expected, actual):
        want, got = want.double(), got.double()
        if spec.per_position(name):
            want, got = want[keep], got[keep]
        if want.numel():
            error = (want - got).abs().max().item()
            max_abs = error if error != error else max(max_abs, error)  # NaN stays NaN
            scale = max(scale, want.abs().max().item())
    return max_abs, scale


def count_bucket_flips(row: VerificationRow, expected, actual, keep) -> None:
    """Bucket assignments (B, H, N, L per LSH layer) that differ from eager at kept positions."""
    flips = []
    for want, got in zip(expected, actual):
        want = want.cpu()
        kept = keep[:, None, None, :].expand_as(want)
        flips.append((int((got != want)[kept].sum()), int(kept.sum())))
    row.first_layer_flipped, row.first_layer_total = flips[0]
    row.flipped_buckets = sum(flipped for flipped, _ in flips)
    row.total_buckets = sum(total for _, total in flips)


def record_certificates(row: VerificationRow, disagreements: list[Disagreement]) -> None:
    row.disagreements = len(disagreements)
    row.certified = sum(disagreement.certified for disagreement in disagreements)
    if disagreements:
        worst = max(disagreements, key=lambda disagreement: disagreement.ratio)
        row.worst_margin, row.worst_bound, row.worst_disagreement = worst.margin, worst.bound, worst.describe()


def judged_failures(row: VerificationRow) -> list[VerificationFailure]:
    """Every reason a compared row fails: NaN in any output, judged outputs past the tolerance, and bucket
    disagreements that are not certified near-ties."""
    if row.max_abs != row.max_abs or row.replay_max_abs != row.replay_max_abs:  # NaN compares false
        return [ValuesFailure(float("nan"), row.tolerance, row.replayed)]
    failures = []
    if row.replay_max_abs > row.tolerance:
        failures.append(ValuesFailure(row.replay_max_abs, row.tolerance, row.replayed))
    if row.certified < row.disagreements:
        failures.append(CertificateFailure(row.disagreements - row.certified, row.disagreements, row.worst_margin,
                                           row.worst_bound, row.worst_disagreement))
    return failures


def agreement_note(row: VerificationRow) -> str:
    """Why a row with flips or bucket disagreements passed ('' when it has neither)."""
    if row.flipped_buckets:
        return (f"free-running: {row.flipped_buckets} of {row.total_buckets} bucket assignments flipped "
                f"({row.first_layer_flipped} in the first LSH layer), max abs {row.max_abs:.3g}; every disagreement "
                f"with eager is a certified near-tie and the replayed outputs match")
    if row.disagreements:
        return (f"{row.disagreements} bucket disagreements with eager, every one a certified near-tie; free-running "
                f"max abs {row.max_abs:.3g}, the replayed outputs match")
    return ""


def mark_as_information(row: VerificationRow, information: str = "") -> None:
    """A quantized graph's row: its numbers are information (the task verdict judges the graph), and it fails
    only on NaN; it is judged against no tolerance."""
    row.tolerance, row.dtype = float("nan"), "int8"
    holds_nan = row.max_abs != row.max_abs or row.replay_max_abs != row.replay_max_abs  # NaN compares false
    row.conclude([ValuesFailure(float("nan"), row.tolerance, row.replayed)] if holds_nan else [], information)
