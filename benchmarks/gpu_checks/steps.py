"""How the run goes on: progress on stderr, steps whose failure is recorded instead of ending the run, and the
time budget after which work not yet started is skipped."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.gpu_checks.plan import Plan
    from benchmarks.gpu_checks.report import Results

STARTED = time.perf_counter()


class RuntimeUnavailable(Exception):
    """A runtime that cannot run here (no CUDA provider, a session that fell back to the CPU, a library
    missing): the step is skipped with a note, not counted as a failure."""


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start (to plan runs under a time limit)."""
    print(f"[{seconds_since_start():6.0f} s] {message}", file=sys.stderr, flush=True)


def seconds_since_start() -> float:
    return time.perf_counter() - STARTED


def skipped_for_time(results: Results, step: str, plan: Plan) -> bool:
    """Whether the plan's time budget (from the start of the run) is spent; if so `step` gets a note and is not
    to start. A note, not a failure: what was measured stays and the exit status does not change."""
    if plan.budget_minutes is None or seconds_since_start() < plan.budget_minutes * 60:
        return False
    results.notes.append(f"{step}: skipped, time budget of {plan.budget_minutes:g} minutes spent")
    return True


def run_step(results: Results, step: str, action, plan: Plan) -> None:
    """Run one step unless the time budget is spent; a failure is recorded (traceback on stderr) and the run
    goes on. Results are saved after."""
    if not skipped_for_time(results, step, plan):
        try:
            action()
        except RuntimeUnavailable as error:
            results.notes.append(f"{step}: skipped, {error}")
        except Exception as error:  # one failing export or runtime must not cost the other measurements
            results.fail(step, error)
    results.save()
