"""Common base of expanded layers: modes, nonlinearity slot, composed-weight cache.

The deferred factor gradients that the layers can train with live in
:mod:`expand_mm.layers.deferred_grads`; the layers only hand it their leaves.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..ops import orthogonal_like
from .deferred_grads import defer_leaf_gradient

MODES = ('online', 'explicit')

# Names of the deferred-gradient engine, importable from here as well.
_DEFERRED_GRADS_NAMES = ('_DEFERRED_GRADS', '_DeferredFactorGrads', 'deferral_unsupported_reason',
                         'discard_deferred_factor_grads', 'flush_deferred_factor_grads_first')


def __getattr__(name: str) -> Any:
    if name in _DEFERRED_GRADS_NAMES:
        from . import deferred_grads
        return getattr(deferred_grads, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def check_ratio(ratio: Any, who: str) -> int:
    """The expansion ratio ``ratio`` if it is an integer >= 1.

    Args:
        ratio: The value to check.
        who: What the ratio was given to, for the message (e.g. ``'expand_model'``).

    Returns:
        ``ratio``.

    Raises:
        ConfigError: If ``ratio`` is not an ``int`` (``bool`` excluded) >= 1.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ConfigError(f'{who}: ratio={ratio!r} must be an integer >= 1 (the paper uses 4)')
    return ratio


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
    :func:`expand_mm.layers.deferral.deferred_factor_grads` around an
    MMEngine ``train_step``): in training mode the layer composes its weight once per
    parameter version (a module called several times in one step composes
    once), runs on a detached leaf copy of it, and the factors receive their
    gradients at the end of the backward pass, after the activations are freed
    (see :mod:`expand_mm.layers.deferred_grads`). Same gradients, lower peak memory.
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
        self.name = name
        # The layers are public constructors: expand_model's settings check the
        # ratio once, but a layer built directly must refuse a bad one too.
        self.ratio = check_ratio(ratio, self._describe())
        self.nonlinearity: nn.Module | None = None
        self._cache: tuple[Any, tuple[Tensor, Tensor | None]] | None = None
        self.defer_factor_grads = False
        self._deferred: tuple[Any, tuple[Tensor, Tensor | None]] | None = None
        self._composition_macs: int | None = None
        # RMS of the compact kernel this layer stands for, as last known (see
        # remember_compact_reference); read by the calibrated factor rates.
        self.compact_reference_rms: float | None = None
        self._mode = 'online'
        self.set_mode(mode)

    def remember_compact_reference(self, weight: Tensor) -> None:
        """Record the RMS of the compact kernel this layer stands for.

        Set from the compact layer it was built from, the kernel it was last
        factorised from (:meth:`set_compact`), or the compact kernel the model's
        initialisation gave it; the calibrated factor learning rates
        (:mod:`expand_mm.optim.lr_calibration`) compare steps with this kernel's.
        """
        self.compact_reference_rms = float(weight.detach().double().pow(2).mean().sqrt())

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
            raise ConfigError(f'{self._describe()}: got a bias but the layer has none '
                              '(bias=False)')
        with torch.no_grad():
            for sub in self.sublayers[:-1]:
                if sub.bias is not None:
                    sub.bias.zero_()
            self.sublayers[-1].bias.copy_(bias)

    def orthogonalise_factors(self, *, generator: torch.Generator | None = None) -> None:
        """Give every factor equal singular values, each factor's norm kept.

        ``init='orthogonal'`` of an ExpandNet: the composed kernel then has the
        spectrum of one random orthogonal projection at every ratio, instead of
        the near-zero singular values that products of near-square random
        factors have at small ratios (see :func:`expand_mm.ops.orthogonal_like`).
        """
        with torch.no_grad():
            for sub in self.sublayers:
                sub.weight.copy_(orthogonal_like(sub.weight, getattr(sub, 'groups', 1),
                                                 generator=generator))
        self._cache = None
        self._deferred = None

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
            raise ConfigError(f'{self._describe()}: mode must be one of {MODES}, '
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
            defer_leaf_gradient(self, composed, leaf)
            leaves.append(leaf)
        return leaves[0], leaves[1]

    def release_deferred_leaf(self, leaf: Tensor) -> None:
        """Forget the cached deferred composition if it holds ``leaf``.

        Called by :mod:`~expand_mm.layers.deferred_grads` once ``leaf``'s
        gradient has reached the factors (or was dropped): the next forward
        composes anew from the updated factors.
        """
        if self._deferred is not None and any(t is leaf for t in self._deferred[1]):
            self._deferred = None

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
