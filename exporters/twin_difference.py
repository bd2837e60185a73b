"""The verification twin against the shipped graph, node kind by node kind. The twin may add the nodes that
take eager's buckets in and return its own; a shipped node kind the twin lacks means the twin is another graph,
and verification through it says nothing about the shipped one (exporters.verify)."""

from __future__ import annotations

import collections

from .formats import GRAPH_FORMATS


def twin_node_difference(path: str, twin_path: str, fmt: str) -> tuple[collections.Counter, collections.Counter]:
    """(node kinds only the twin has, node kinds only the shipped graph has), with their counts."""
    node_kinds = GRAPH_FORMATS[fmt].node_kinds
    shipped, twin = node_kinds(path), node_kinds(twin_path)
    return twin - shipped, shipped - twin


def twin_difference_text(extra: dict[str, int], missing: dict[str, int]) -> str:
    listed = lambda counts: ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))  # noqa: E731
    parts = ([f"adds {listed(extra)} (taking the forced buckets, returning its own)"] if extra else []) + (
        [f"lacks {listed(missing)} of the shipped graph"] if missing else [])
    return "; ".join(parts)
