"""The rules of generation shared by eager PyTorch (`reformer.generation`) and ONNX Runtime
(`reformer.runtime`): choosing the next token (greedy, top-k, top-p), stopping at the end-of-sequence token,
and the length limit. numpy only, so both pick the same tokens from the same logits and seed."""

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
    # A row that produced eos_token_id continues with pad_token_id (the eos id when None).
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)
    finished: np.ndarray | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits B, V (any float dtype) -> token ids B (int64)."""
        tokens = self.choose(np.asarray(logits, dtype=np.float64))
        if self.eos_token_id is None:
            return tokens
        if self.finished is None:
            self.finished = np.zeros(tokens.shape, dtype=bool)
        filler = self.eos_token_id if self.pad_token_id is None else self.pad_token_id
        tokens = np.where(self.finished, filler, tokens)
        self.finished |= tokens == self.eos_token_id
        return tokens

    @property
    def all_finished(self) -> bool:
        """Every row has produced the eos token: generation can stop."""
        return self.finished is not None and bool(self.finished.all())

    def choose(self, logits: np.ndarray) -> np.ndarray:
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


def check_generation_length(max_position_embeddings: int, prompt_length: int, max_new_tokens: int) -> None:
    """The last new token is predicted from position P + max_new_tokens - 2, which must have an embedding."""
    if prompt_length < 1:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_length + max_new_tokens - 1 > max_position_embeddings:
        raise ValueError(
            f"a prompt of {prompt_length} tokens plus {max_new_tokens} new tokens needs "
            f"{prompt_length + max_new_tokens - 1} positions; max_position_embeddings is {max_position_embeddings}"
        )
