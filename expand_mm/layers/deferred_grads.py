"""Deferred factor gradients: the factors get their gradients once a backward pass ends.

In deferred online mode an expanded layer runs its conv on a detached copy (a
leaf) of its composed weight. The main backward pass then only produces the
compact-sized gradient of that leaf; the composition's backward into the
factors -- several times the compact parameters -- runs at the end of the
pass, after the activations are freed. This module is that machinery: the
queue the leaves report to (:class:`_DeferredFactorGrads`) and the helpers that
DDP and a failed backward pass need; the switch around a training step is
:func:`~expand_mm.layers.deferral.deferred_factor_grads`. :class:`~expand_mm.layers.ExpandedLayer` only
reports its leaves here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import ExpandedLayer


class _DeferredFactorGrads:
    """Back-propagates composed weights into their factors once a backward pass ends.

    When a leaf's gradient is accumulated, the leaf and the composed weight it
    stands for are queued here, and a callback queued on the autograd engine
    runs the composition's backward for every queued weight at the end of the
    pass. For a layer used once per pass the factor gradients are bit for bit
    the ones plain autograd gives (the same operations); for a layer used
    several times, the compact gradients are summed before the composition's
    backward instead of after (equal up to rounding). The callback is the
    autograd engine's ``queue_callback``, which ``DistributedDataParallel``
    uses the same way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (graph task, layer, composed weight, its leaf), and the graph tasks
        # that have a flush queued. Keyed by task so that a backward pass that
        # failed half-way (an exception in a hook, an out-of-memory error that
        # the caller survives) cannot keep later passes from queueing theirs.
        self._pending: list[tuple[int, ExpandedLayer, Tensor, Tensor]] = []
        self._queued: set[int] = set()

    def leaf_ready(self, layer: ExpandedLayer, composed: Tensor, leaf: Tensor) -> None:
        """Queue ``composed`` for ``leaf.grad``, and the flush of this backward pass."""
        task = _current_backward_pass()
        with self._lock:
            self._pending.append((task, layer, composed, leaf))
        self.queue_flush()

    def queue_flush(self) -> None:
        """Queue the flush of the current backward pass, once per pass.

        Called inside a backward pass (post-accumulate hooks only fire there,
        where the engine takes callbacks). Callbacks run in the order they are
        queued: calling this at the start of a pass puts the flush before the
        callbacks that others queue later in the pass (DDP's static-graph
        reduction, see ``ExpandNetDistributedDataParallel``).
        """
        task = _current_backward_pass()
        with self._lock:
            if task in self._queued:
                return
            self._queued.add(task)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self.flush(task))

    def flush(self, task: int) -> None:
        """Run the queued compositions' backward of backward pass ``task``."""
        with self._lock:
            self._queued.discard(task)
            pending = [entry for entry in self._pending if entry[0] == task]
            self._pending = [entry for entry in self._pending if entry[0] != task]
        outputs, grads = [], []
        for _, layer, composed, leaf in pending:
            grads.append(leaf.grad)
            leaf.grad = None
            outputs.append(composed)
            # The next forward composes anew: these factors get their update now.
            layer.release_deferred_leaf(leaf)
        if outputs:
            # retain_graph: a main graph kept for a second backward reaches
            # these compositions again; their graphs go with the leaves.
            torch.autograd.backward(outputs, grads, retain_graph=True)

    def discard(self, layers: Iterable[ExpandedLayer]) -> int:
        """Drop what failed backward passes left queued for ``layers``.

        Meant for the end of a training step, when no backward pass of these
        layers can be running: entries left then belong to a pass that raised,
        whose gradients a caller that goes on will zero anyway. They hold the
        composed weights' graphs, so they are freed here.

        Returns:
            How many queued compositions were dropped.
        """
        layers = {id(layer) for layer in layers}
        with self._lock:
            kept = [entry for entry in self._pending if id(entry[1]) not in layers]
            dropped = [entry for entry in self._pending if id(entry[1]) in layers]
            self._pending = kept
            live = {entry[0] for entry in kept}
            self._queued &= live
        for _, layer, _, leaf in dropped:
            layer.release_deferred_leaf(leaf)  # its cache holds the same leaf and graph
        return len(dropped)


def _current_backward_pass() -> int:
    """Id of the autograd graph task (backward pass) running in this thread."""
    return torch._C._current_graph_task_id()


def deferral_unsupported_reason() -> str | None:
    """Why this torch build cannot defer factor gradients, or ``None`` when it can.

    Deferral keys its queue on ``torch._C._current_graph_task_id`` (private, in
    torch since 2.1) and hooks leaves with ``register_post_accumulate_grad_hook``
    (public since 2.1); a torch that lacks either trains with plain autograd.

    Returns:
        A sentence naming the missing torch functions, or ``None``.
    """
    missing = []
    if not callable(getattr(torch._C, '_current_graph_task_id', None)):
        missing.append('torch._C._current_graph_task_id')
    if not callable(getattr(torch.Tensor, 'register_post_accumulate_grad_hook', None)):
        missing.append('torch.Tensor.register_post_accumulate_grad_hook')
    if not missing:
        return None
    return f'torch {torch.__version__} lacks {" and ".join(missing)}'


_DEFERRED_GRADS = _DeferredFactorGrads()


def defer_leaf_gradient(layer: ExpandedLayer, composed: Tensor, leaf: Tensor) -> None:
    """Have ``composed`` receive ``leaf``'s gradient at the end of each backward pass.

    Args:
        layer: The layer whose cache holds ``leaf`` (released after the flush).
        composed: The composed weight or bias, attached to the factors' graph.
        leaf: Its detached copy that the layer's conv runs on.
    """
    # The hook holds the composed tensor, so its graph lives as long as the
    # leaf: until the main graph and the layer's cache drop it.
    leaf.register_post_accumulate_grad_hook(
        lambda t: _DEFERRED_GRADS.leaf_ready(layer, composed, t))


def discard_deferred_factor_grads(layers: Iterable[ExpandedLayer]) -> int:
    """Drop deferred factor gradients of ``layers`` that no backward pass will flush.

    What a backward pass that raised left queued (see
    :meth:`_DeferredFactorGrads.discard`).

    Returns:
        How many queued compositions were dropped.
    """
    return _DEFERRED_GRADS.discard(layers)


def flush_deferred_factor_grads_first(loss: Tensor) -> None:
    """In ``loss``'s backward pass, flush the deferred factor gradients before later callbacks.

    Queues the flush when the pass starts (a pre-hook on ``loss.grad_fn``)
    instead of when the first deferred weight gets its gradient, so it runs
    before any callback that something reached later in the pass queues --
    ``DistributedDataParallel`` with ``static_graph=True`` queues the reduction
    of every gradient from its output node and must see the factors' ones.
    """
    if loss.grad_fn is not None:
        loss.grad_fn.register_prehook(lambda grad_outputs: _DEFERRED_GRADS.queue_flush())
