"""Choosing the next token from logits: greedy, top-k and top-p sampling. numpy only, so that eager PyTorch
generation (`reformer.generation`) and ONNX Runtime generation (`reformer.runtime`) pick tokens with the same
code and, given the same seed and the same logits, the same tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenChooser:
    """do_sample False: argmax (the first maximum on ties, as torch.argmax). do_sample True: sample from the
    softmax restricted to the `top_k` most likely tokens and then to the smallest set whose probability reaches
    `top_p` (the most likely token is always kept), drawn from a numpy generator seeded with `seed`."""

    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits B, V (any float dtype) -> token ids B (int64)."""
        logits = np.asarray(logits, dtype=np.float64)
        if not self.do_sample:
            return np.argmax(logits, axis=-1).astype(np.int64)
        probs = self.filtered_probabilities(logits)
        # Inverse-CDF sampling: one uniform draw per row.
        cumulative = np.cumsum(probs, axis=-1)
        draws = self.rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
        return np.minimum((cumulative <= draws).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)

    def filtered_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """B, V -> B, V unnormalised probabilities, zero outside the top-k / top-p set."""
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        # Stable descending order: ties keep the lower token id first, as a stable sort would.
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep = np.ones_like(sorted_probs, dtype=bool)
        if self.top_k is not None:
            keep[:, self.top_k:] = False
        if self.top_p is not None:
            kept = np.where(keep, sorted_probs, 0.0)
            mass_before = np.cumsum(kept, axis=-1) - kept
            keep &= mass_before < self.top_p * kept.sum(axis=-1, keepdims=True)
        kept_sorted = np.where(keep, sorted_probs, 0.0)
        filtered = np.empty_like(probs)
        np.put_along_axis(filtered, order, kept_sorted, axis=-1)
        return filtered
