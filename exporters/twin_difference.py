"""The verification twin against the shipped graph, node kind by node kind. The twin may add the nodes that
take eager's buckets in and return its own; a shipped node kind the twin lacks means the twin is another graph,
and verification through it says nothing about the shipped one (exporters.verify)."""

from __future__ import annotations

import collections

import torch


def twin_node_difference(path: str, twin_path: str, fmt: str) -> tuple[collections.Counter, collections.Counter]:
    """(node kinds only the twin has, node kinds only the shipped graph has), with their counts."""
    shipped, twin = node_kinds(path, fmt), node_kinds(twin_path, fmt)
    return twin - shipped, shipped - twin


def node_kinds(path: str, fmt: str) -> collections.Counter:
    if fmt == "onnx":
        import onnx

        model = onnx.load(path, load_external_data=False)
        return collections.Counter(node.op_type for node in model.graph.node)
    if fmt == "aoti":  # the compiled package holds no graph; its description counts the exported program's ops
        from .aoti import load_metadata

        return collections.Counter(load_metadata(path)["program_ops"])
    from .torchscript import legacy_jit, node_kinds as torchscript_node_kinds

    with legacy_jit():
        return collections.Counter(torchscript_node_kinds(torch.jit.load(path, map_location="cpu")))


def twin_difference_text(extra: dict[str, int], missing: dict[str, int]) -> str:
    listed = lambda counts: ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))  # noqa: E731
    parts = ([f"adds {listed(extra)} (taking the forced buckets, returning its own)"] if extra else []) + (
        [f"lacks {listed(missing)} of the shipped graph"] if missing else [])
    return "; ".join(parts)
