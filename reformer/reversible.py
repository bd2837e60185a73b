"""Training-only reversible backward: activations are recomputed layer by layer from the outputs instead of
being stored, so activation memory does not grow with depth (Reformer section 3, RevNet)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .layers import ReformerLayer


@dataclass
class RandomState:
    """The random state before a block ran, so that its recomputation draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RandomState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def replay(self):
        """Run a block with this random state, leaving the surrounding random state untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class LayerRecord:
    attention_state: RandomState
    feed_forward_state: RandomState
    buckets: torch.Tensor | None


class ReversibleStack(torch.autograd.Function):
    """Runs `layers` without keeping activations; backward rebuilds each layer's inputs from its outputs.
    Returns Y1, Y2 and the buckets of every LSH layer (not differentiable)."""

    @staticmethod
    def forward(ctx, x1, x2, attention_mask, lsh_unchunked, layers: nn.ModuleList, all_hidden_states: list | None):
        records = []
        for layer in layers:
            if all_hidden_states is not None:
                all_hidden_states.append(x2)
            attention_state = RandomState.capture(x2.device)
            attended, buckets = layer.attention(x2, attention_mask, lsh_unchunked)
            feed_forward_states = []
            x1, x2 = layer.add_residuals(
                x1, x2, attended, lambda y1: feed_forward_states.append(RandomState.capture(y1.device)))
            records.append(LayerRecord(attention_state, feed_forward_states[0], buckets))
        if all_hidden_states is not None:
            all_hidden_states.append(x2)
        ctx.layers, ctx.records = layers, records
        ctx.masks = (attention_mask, lsh_unchunked)
        ctx.save_for_backward(x1, x2)
        buckets = tuple(record.buckets for record in records if record.buckets is not None)
        ctx.mark_non_differentiable(*buckets)
        return (x1, x2, *buckets)

    @staticmethod
    def backward(ctx, grad_y1, grad_y2, *_bucket_grads):  # buckets are not differentiable
        y1, y2 = ctx.saved_tensors
        for layer, record in zip(reversed(ctx.layers), reversed(ctx.records)):
            y1, y2, grad_y1, grad_y2 = backward_through_layer(
                layer, record, ctx.masks, y1, y2, grad_y1, grad_y2
            )
        return grad_y1, grad_y2, None, None, None, None


def backward_through_layer(
    layer: ReformerLayer,
    record: LayerRecord,
    masks: tuple[torch.Tensor, torch.Tensor],
    y1: torch.Tensor,
    y2: torch.Tensor,
    grad_y1: torch.Tensor,
    grad_y2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a layer's outputs and their gradients, recompute its inputs and their gradients, and accumulate
    the gradients of its parameters."""
    with torch.enable_grad():
        y1 = y1.detach().requires_grad_(True)
        with record.feed_forward_state.replay():
            feed_forward_out = layer.feed_forward(y1)
        torch.autograd.backward(feed_forward_out, grad_y2)
    with torch.no_grad():
        x2 = y2 - feed_forward_out  # X2 = Y2 - FeedForward(Y1)
        grad_y1 = grad_y1 + y1.grad
    with torch.enable_grad():
        x2 = x2.detach().requires_grad_(True)
        with record.attention_state.replay():
            # The forward's buckets: rehashing the recomputed X2 could flip a near-tie.
            attended, _ = layer.attention(x2, *masks, record.buckets)
        torch.autograd.backward(attended, grad_y1)
    with torch.no_grad():
        x1 = y1 - attended  # X1 = Y1 - Attention(X2)
        grad_x2 = grad_y2 + x2.grad
    return x1.detach(), x2.detach(), grad_y1, grad_x2
