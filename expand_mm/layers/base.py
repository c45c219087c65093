"""Common base of expanded layers: modes, nonlinearity slot, composed-weight cache,
deferred factor gradients."""

from __future__ import annotations

import math
import threading
from typing import Any, Iterable

import torch
from torch import Tensor, nn

MODES = ('online', 'explicit')


class _DeferredFactorGrads:
    """Back-propagates composed weights into their factors once a backward pass ends.

    In deferred online mode a layer runs its conv on a detached copy (a leaf)
    of the composed weight. The main backward pass then only produces the
    compact-sized gradient of that leaf; when the leaf's gradient is
    accumulated, the leaf and the composed weight it stands for are queued
    here, and a callback queued on the autograd engine runs the composition's
    backward for every queued weight at the end of the pass. The factor
    gradients -- several times the compact parameters -- are thus allocated
    after the activations of the pass are freed instead of on top of them. For
    a layer used once per pass they are bit for bit the ones plain autograd
    gives (the same operations); for a layer used several times, the compact
    gradients are summed before the composition's backward instead of after
    (equal up to rounding). The callback is the autograd engine's
    ``queue_callback``, which ``DistributedDataParallel`` uses the same way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (graph task, layer, composed weight, its leaf), and the graph tasks
        # that have a flush queued. Keyed by task so that a backward pass that
        # failed half-way (an exception in a hook, an out-of-memory error that
        # the caller survives) cannot keep later passes from queueing theirs.
        self._pending: list[tuple[int, ExpandedLayer, Tensor, Tensor]] = []
        self._queued: set[int] = set()

    def leaf_ready(self, layer: 'ExpandedLayer', composed: Tensor, leaf: Tensor) -> None:
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
            if layer._deferred is not None and any(t is leaf for t in layer._deferred[1]):
                # The next forward composes anew: these factors get their update now.
                layer._deferred = None
        if outputs:
            # retain_graph: a main graph kept for a second backward reaches
            # these compositions again; their graphs go with the leaves.
            torch.autograd.backward(outputs, grads, retain_graph=True)

    def discard(self, layers: Iterable['ExpandedLayer']) -> int:
        """Drop what failed backward passes left queued for ``layers``; returns how many.

        Meant for the end of a training step, when no backward pass of these
        layers can be running: entries left then belong to a pass that raised,
        whose gradients a caller that goes on will zero anyway. They hold the
        composed weights' graphs, so they are freed here.
        """
        layers = {id(layer) for layer in layers}
        with self._lock:
            kept = [entry for entry in self._pending if id(entry[1]) not in layers]
            dropped = [entry for entry in self._pending if id(entry[1]) in layers]
            self._pending = kept
            live = {entry[0] for entry in kept}
            self._queued &= live
        for _, layer, _, leaf in dropped:
            # The layer's cache holds the same leaf (and its graph).
            if layer._deferred is not None and any(t is leaf for t in layer._deferred[1]):
                layer._deferred = None
        return len(dropped)


def _current_backward_pass() -> int:
    """Id of the autograd graph task (backward pass) running in this thread."""
    return torch._C._current_graph_task_id()


def deferral_unsupported_reason() -> str | None:
    """Why this torch build cannot defer factor gradients, or ``None`` when it can.

    Deferral keys its queue on ``torch._C._current_graph_task_id`` (private, in
    torch since 2.1) and hooks leaves with ``register_post_accumulate_grad_hook``
    (public since 2.1); a torch that lacks either trains with plain autograd.
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


def discard_deferred_factor_grads(layers: Iterable['ExpandedLayer']) -> int:
    """Drop deferred factor gradients of ``layers`` that no backward pass will flush.

    What a backward pass that raised left queued (see
    :meth:`_DeferredFactorGrads.discard`); returns how many compositions.
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


class ExpandedLayer(nn.Module):
    """A compact layer trained as a chain of purely linear sub-layers.

    Subclasses hold the chain in an ``nn.ModuleList`` (:attr:`sublayers`) and
    implement :meth:`_compose`, :meth:`contract` and :meth:`set_compact`.

    Modes (switch with :meth:`set_mode`):

    - ``'explicit'``: run the chain on activations (the paper's way).
    - ``'online'``: compose the compact weight from the factors inside
      ``forward`` and run one compact layer. Same function and same factor
      gradients, at close to compact cost.

    Out of training mode the online composed weight is cached; the cache is
    keyed on every parameter's storage, version counter, device and dtype, so an
    in-place update (optimizer step, ``load_state_dict``) or a move invalidates
    it. Nothing is cached while autograd could need the graph.

    Deferred factor gradients (:attr:`defer_factor_grads`, switched on by
    :func:`expand_mm.surgery.deferred_factor_grads` around an MMEngine
    ``train_step``): in training mode the layer composes its weight once per
    parameter version (a module called several times in one step composes
    once), runs on a detached leaf copy of it, and the factors receive their
    gradients at the end of the backward pass, after the activations are freed
    (see :class:`_DeferredFactorGrads`). Same gradients, lower peak memory.
    ``loss.backward()`` fills the factors' ``.grad`` as usual;
    ``torch.autograd.grad(loss, factors)`` does not see the factors, which is
    why the switch is off by default.

    Attributes:
        strategy (str): ``'cl'``, ``'ck'`` (convs) or ``'fc'`` (linear).
        ratio (int): Expansion ratio ``r``.
        name (str | None): Module path, used in error messages.
        nonlinearity (nn.Module | None): Applied between sub-layers in explicit
            mode (nonlinear-counterpart init). While set, the chain is not linear:
            online mode, :attr:`weight`, :attr:`bias` and :meth:`contract` raise.
    """

    strategy: str = ''

    def __init__(self, *, ratio: int, mode: str = 'online', name: str | None = None):
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f'{type(self).__name__} {name!r}: ratio must be an int '
                             f'>= 1, got {ratio!r}')
        self.ratio = ratio
        self.name = name
        self.nonlinearity: nn.Module | None = None
        self._cache: tuple[Any, tuple[Tensor, Tensor | None]] | None = None
        self.defer_factor_grads = False
        self._deferred: tuple[Any, tuple[Tensor, Tensor | None]] | None = None
        self._composition_macs: int | None = None
        self._mode = 'online'
        self.set_mode(mode)

    # ----------------------------------------------------------------- to override
    @property
    def sublayers(self) -> nn.ModuleList:
        """The chain of sub-layers, first applied first."""
        raise NotImplementedError

    def _compose(self, dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
        """Compose the chain; ``dtype=None`` keeps the parameters' dtype."""
        raise NotImplementedError

    def contract(self) -> nn.Module:
        """Return the equivalent compact layer (composed in float64)."""
        raise NotImplementedError

    def set_compact(self, weight: Tensor, bias: Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> None:
        """Set the factors so that the chain computes the given compact layer."""
        raise NotImplementedError

    def set_composed_bias(self, bias: Tensor) -> None:
        """Make the composed bias ``bias``, the factor weights left as they are.

        The intermediate biases become 0 and the last one ``bias``: with no bias
        inside, the chain's bias is its last layer's.
        """
        if not self._has_bias():
            raise ValueError(f'{self._describe()}: got a bias but the layer has none '
                             '(bias=False)')
        with torch.no_grad():
            for sub in self.sublayers[:-1]:
                if sub.bias is not None:
                    sub.bias.zero_()
            self.sublayers[-1].bias.copy_(bias)

    def compact_weight_shape(self) -> tuple[int, ...]:
        """Shape of the compact layer's weight."""
        raise NotImplementedError

    def _has_bias(self) -> bool:
        return self.sublayers[-1].bias is not None

    # --------------------------------------------------------------------- shared
    def _describe(self) -> str:
        return f'{type(self).__name__} {self.name!r}' if self.name else type(self).__name__

    @property
    def mode(self) -> str:
        """``'online'`` or ``'explicit'``."""
        return self._mode

    def set_mode(self, mode: str) -> 'ExpandedLayer':
        """Switch between ``'online'`` and ``'explicit'``; returns ``self``."""
        if mode not in MODES:
            raise ValueError(f'{self._describe()}: mode must be one of {MODES}, '
                             f'got {mode!r}')
        if mode == 'online':
            self._check_linear('online mode')
        self._mode = mode
        return self

    def set_nonlinearity(self, module: nn.Module | None) -> 'ExpandedLayer':
        """Put ``module`` between the sub-layers (explicit mode only), or remove it.

        Setting a nonlinearity needs explicit mode; pass ``None`` to make the
        chain linear again. The parameters are not touched. Returns ``self``.
        """
        if module is not None and self._mode != 'explicit':
            raise RuntimeError(f'{self._describe()}: a nonlinearity needs explicit '
                               f"mode; call set_mode('explicit') first")
        self.nonlinearity = module
        self._cache = None
        self._deferred = None
        return self

    def _check_linear(self, what: str) -> None:
        if self.nonlinearity is not None:
            raise RuntimeError(
                f'{self._describe()}: {what} needs a linear chain, but a nonlinearity '
                f'({type(self.nonlinearity).__name__}) is set between the sub-layers; '
                f'call set_nonlinearity(None) first')

    def composition_macs(self) -> int:
        """Multiply-adds of composing the compact weight and bias once, as torch counts them.

        What online mode pays per training step on top of the compact layer,
        whatever the batch and image size. Counted on the first call (by running
        the composition under ``torch.utils.flop_counter.FlopCounterMode``) and
        remembered: the shapes never change. A matrix-chain formula would miss
        the bias propagation and the cost of composing spatial kernels.
        """
        if self._composition_macs is None:
            from torch.utils.flop_counter import FlopCounterMode
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self._compose(None)
            self._composition_macs = counter.get_total_flops() // 2
        return self._composition_macs

    def _cache_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.device, p.dtype, tuple(p.shape))
                     for p in self.parameters())

    def composed(self) -> tuple[Tensor, Tensor | None]:
        """Compact ``(weight, bias)`` composed in the parameters' dtype.

        Differentiable w.r.t. the factors; cached only out of training mode and
        when no gradient can flow to a parameter.
        """
        self._check_linear('composing the compact weight')
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if needs_grad and self.training and self.defer_factor_grads:
            return self._composed_deferred()
        if needs_grad or self.training:
            self._cache = None
            return self._compose(None)
        return self._cached('_cache', lambda: self._compose(None))

    def _cached(self, slot: str, build) -> tuple[Tensor, Tensor | None]:
        """``build()``, kept in attribute ``slot`` until a parameter changes (see _cache_key)."""
        key = self._cache_key()
        entry = getattr(self, slot)
        if entry is None or entry[0] != key:
            entry = (key, build())
            setattr(self, slot, entry)
        return entry[1]

    def _composed_deferred(self) -> tuple[Tensor, Tensor | None]:
        """Leaf copies of the composed weight and bias whose gradients reach the
        factors at the end of the backward pass; composed once per parameter version."""
        if self._deferred is not None and any(
                leaf is not None and leaf.grad is not None for leaf in self._deferred[1]):
            # A flush takes every leaf's gradient: these got one from a backward
            # pass that raised before its flush, so they must not be reused.
            self._deferred = None
        return self._cached('_deferred', self._deferred_leaves)

    def _deferred_leaves(self) -> tuple[Tensor, Tensor | None]:
        leaves = []
        # The composition is saved for the deferred backward outside any
        # saved-tensor hooks in force (non-reentrant activation checkpointing):
        # a recomputation finds these leaves cached and must save what the
        # first forward saved, i.e. only what the conv saves.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            composed_pair = self._compose(None)
        for composed in composed_pair:
            if composed is None or not composed.requires_grad:
                leaves.append(composed)
                continue
            leaf = composed.detach().requires_grad_()
            # The hook holds the composed tensor, so its graph lives as long
            # as the leaf: until the main graph and this cache drop it.
            leaf.register_post_accumulate_grad_hook(
                lambda t, composed=composed: _DEFERRED_GRADS.leaf_ready(self, composed, t))
            leaves.append(leaf)
        return leaves[0], leaves[1]

    @property
    def weight(self) -> Tensor:
        """Composed compact weight (differentiable, parameters' dtype)."""
        return self.composed()[0]

    @property
    def bias(self) -> Tensor | None:
        """Composed compact bias, ``None`` when the compact layer has none."""
        return self.composed()[1]

    def train(self, mode: bool = True) -> 'ExpandedLayer':
        """Set training mode and drop the eval-time and deferred caches."""
        self._cache = None
        self._deferred = None
        return super().train(mode)

    def compact_fan_in(self) -> int:
        """Inputs that one output of the compact layer sums over (``m / groups * kh * kw``)."""
        return math.prod(self.compact_weight_shape()[1:])

    def factor_fan_ins(self) -> list[int]:
        """Fan-in of each sub-layer's weight, first sub-layer first."""
        return [sub.weight[0].numel() for sub in self.sublayers]

    def num_params_compact(self) -> int:
        """Number of parameters of the contracted layer."""
        shape = self.compact_weight_shape()
        return math.prod(shape) + (shape[0] if self._has_bias() else 0)

    def num_params_expanded(self) -> int:
        """Number of parameters of the chain."""
        return sum(p.numel() for p in self.sublayers.parameters())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        """Accept the compact layer's keys (``weight``, ``bias``) as well as the factors.

        A compact state dict (a pretrained or a contracted checkpoint, loaded by
        ``load_state_dict``, mmengine's ``load_checkpoint``, ``init_cfg``
        ``Pretrained`` or ``init_detector``) is factorised exactly with
        :meth:`set_compact`, so the chain computes what the compact layer did.
        The factor entries are written into ``state_dict`` for the sub-layers to
        load, so strict loading sees no missing or unexpected key.
        """
        own = [prefix + name for name, _ in self.named_parameters()]
        weight_key, bias_key = prefix + 'weight', prefix + 'bias'
        if weight_key in state_dict and not any(k in state_dict for k in own):
            weight = state_dict.pop(weight_key)
            bias = state_dict.pop(bias_key, None)
            if tuple(weight.shape) != tuple(self.compact_weight_shape()):
                error_msgs.append(
                    f'size mismatch for {weight_key}: copying a param with shape '
                    f'{tuple(weight.shape)} from checkpoint, the shape in current model '
                    f'is {tuple(self.compact_weight_shape())} (compact form of '
                    f'{self._describe()}).')
                return super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs)
            if bias is not None and not self._has_bias():
                unexpected_keys.append(bias_key)
                bias = None
            elif bias is None and self._has_bias():
                if strict:
                    missing_keys.append(bias_key)
                if self.nonlinearity is None:
                    # A plain layer keeps its bias when the state dict has none;
                    # so must the composed one, which set_compact would zero.
                    with torch.no_grad():
                        bias = self._compose(None)[1]
            ref = next(self.parameters())
            self.set_compact(weight.to(ref), None if bias is None else bias.to(ref))
            for name, param in self.named_parameters():
                state_dict[prefix + name] = param.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self) -> dict:
        # Copies and pickles must not carry the cached composition.
        state = super().__getstate__()
        state['_cache'] = None
        state['_deferred'] = None
        return state


def _keep(tensor: Tensor) -> Tensor:
    """Identity pack / unpack of a saved tensor (see ``_deferred_leaves``)."""
    return tensor
