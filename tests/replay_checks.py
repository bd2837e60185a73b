"""A candidate's outputs (the `transformers` reference's, an exported graph's) against our eager model run with
the candidate's own LSH buckets: the verifier's judgement (exporters/verify.py) with the roles swapped, eager
replaying the candidate's buckets instead of a twin graph replaying eager's, so that any candidate can be judged
without a twin.

Hashing is the one step where rounding changes a discrete choice: at a near-tie between two rotated projections
one program picks one bucket and another program the other, and every later value differs. So:
1. eager runs with the candidate's buckets forced in every LSH layer; what is left between the two is arithmetic,
   and the candidate's outputs must be within the first-order rounding bound of that run (tests/rounding.py),
   per-position outputs where the mask keeps the position (tests/reformer/test_parity.py says why);
2. every kept bucket the candidate chose differently from eager's own hashing in that run (of the same vectors
   up to rounding) must be a certified near-tie (exporters.near_ties, with the verifier's fp32 precision), or
   the candidate hashed something else.
Where the candidate's buckets equal eager's own, step 1 is the plain comparison and step 2 finds nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporters.near_ties import PRECISIONS, certify, lsh_layers, recorded_hash_inputs
from exporters.specs import TaskSpec
from rounding import assert_within, rounding_bound


@dataclass
class Replay:
    """Eager's run with one set of forced buckets: its output, each LSH layer's input, the outputs' bounds."""

    buckets: tuple[torch.Tensor, ...]  # those it used: the forced ones, or its own
    output: object
    hash_inputs: list[torch.Tensor]
    bounds: dict


class ReplayedEager:
    """Our eager `model` at one input, judging candidates. Candidates mostly hash alike, so each replay (and its
    rounding bound, the costly part) is kept and reused for the next candidate with the same buckets."""

    def __init__(self, model, spec: TaskSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.spec = model, spec
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.replays: list[Replay] = []

    def replay(self, forced: tuple[torch.Tensor, ...] | None) -> Replay:
        """Eager's run with `forced` buckets (None: its own), kept for any later candidate with the same."""
        for replay in self.replays:
            if forced is not None and same_buckets(replay.buckets, forced):
                return replay
        arguments = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, forced_buckets=forced)
        with torch.no_grad(), recorded_hash_inputs(self.model) as hash_inputs:
            output = self.model(**arguments)
        bounds = rounding_bound(lambda: self.model(**arguments))
        self.replays.append(Replay(tuple(output.buckets) if forced is None else forced, output, hash_inputs, bounds))
        return self.replays[-1]

    def assert_matches(self, outputs, buckets, label: str) -> int:
        """`outputs`: the candidate's, in the order of the spec's output names; `buckets`: the B, H, N, L buckets
        of each of its LSH layers (None or empty: it hashed nothing, and eager runs its own). Returns the number
        of certified near-ties."""
        forced = tuple(buckets) if buckets else None
        replay = self.replay(forced)
        own_buckets, keep = replay.output.buckets, self.attention_mask.bool()
        assert forced is None or len(forced) == len(own_buckets), f"{label}: {len(forced)} bucket tensors"
        disagreements = [
            disagreement
            for index, (layer, hash_input, own) in enumerate(zip(lsh_layers(self.model), replay.hash_inputs,
                                                                 own_buckets))
            for disagreement in certify(layer, index, hash_input, own, own if forced is None else forced[index],
                                        keep, PRECISIONS["fp32"])
        ]
        uncertified = [disagreement.describe() for disagreement in disagreements if not disagreement.certified]
        assert not uncertified, f"{label}: buckets that are no near-tie: {len(uncertified)}, first {uncertified[0]}"
        for name, got in zip(self.spec.output_names, outputs, strict=True):
            want = getattr(replay.output, name)
            assert got.dtype == want.dtype, f"{label} {name}: {got.dtype}, eager {want.dtype}"
            assert_within(got, want, replay.bounds[name], f"{label} {name}",
                          keep if self.spec.per_position(name) else None)
        return len(disagreements)


def same_buckets(first: tuple, second: tuple) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
