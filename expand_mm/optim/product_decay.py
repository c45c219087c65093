"""Weight decay on the composed (compact) kernel instead of on each factor.

Why: plain weight decay on the factors ``W_1 .. W_L`` of an expanded layer
penalises ``sum_i ||W_i||^2``, a different regulariser than the
``||W||^2`` of the compact kernel ``W = W_L ... W_1`` the network deploys
(products of small factors shrink much faster than the factors; for a linear
chain the sum of squared factor norms behaves like a Schatten quasi-norm of
the product). The ExpandNets paper compares both; ``weight_decay_on='product'``
in :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor` selects this
one. The factor *weights* of every expanded layer then get ``weight_decay=0`` in
their optimizer groups, and :class:`ProductWeightDecay`, a step pre-hook of
the torch optimizer, applies the decay of the composed kernel once per
optimizer step:

* coupled (L2) decay -- ``SGD``, ``Adam``, ``RMSprop``, ... (see
  :data:`COUPLED_DECAY_OPTIMIZERS`): the gradient of
  ``lambda / 2 * ||W||^2`` is back-propagated into the factors and added to
  their gradients, which the optimizer then uses as it would use the compact
  kernel's L2 term (momentum, adaptive moments).
* decoupled decay -- ``AdamW``, ``Lion``, or an Adam-type optimizer with
  ``decoupled_weight_decay=True``: AdamW shrinks a compact kernel as
  ``W <- (1 - lr * lambda) W`` before its update. The factor weights of a
  layer are each scaled by ``(1 - lr * lambda) ** (1 / L)``, so the composed
  kernel is shrunk by exactly that factor (the composition is linear in each
  factor) and the factors keep their relative sizes. ``lr`` is the rate the
  compact kernel would have: the factor group's rate divided by its per-factor
  multiplier (:mod:`expand_mm.optim.factor_lr`). Schedulers that multiply
  every group's rate (warm-up, steps, cosine with ``eta_min_ratio``) keep this
  exact; one with an absolute ``eta_min`` drives the factor groups to that
  same rate, so near its end the shrink is ``1 / multiplier`` times too large
  (and the factors' scaled rates are lost as well).

Other optimizers are refused: their decay semantics are not known here.

``lambda`` of each factor is the weight decay its group would have had
(the optimizer's ``weight_decay`` times any ``paramwise_cfg`` ``decay_mult``),
kept in the group under :data:`PRODUCT_DECAY_KEY` (and so in the optimizer's
state dict). When factors of one layer carry different values (a
``custom_keys`` entry naming one factor) each factor gets the product's decay
gradient (coupled) or shrink (decoupled, the root taken over every trained
factor of the chain) with its own value; with equal values -- every setting
that does not single out factors, ``dwconv_decay_mult`` included, which the
constructor applies to every factor of a depthwise conv -- this is exactly
the compact kernel's decay.

Factor *biases* keep their own, per-factor decay as before: the composed bias
is a sum of every factor bias carried through the later kernels, so a decay
on it would also pull on the kernels, and the compact models here carry few
biases (most convs are followed by a norm layer).

The hook composes in the parameters' dtype with autograd on, outside any
autocast region and bypassing the layers' caches and deferred leaves, so it is
independent of the layer's mode and of :func:`expand_mm.deferred_factor_grads`
(whose factor gradients are complete when the step runs). It runs once per
real optimizer step: ``OptimWrapper`` gradient accumulation calls
``optimizer.step`` once per ``accumulative_counts``, and ``AmpOptimWrapper``
either unscales the gradients before it or, for a fused optimizer
(``fused=True``, which unscales inside its step), sets the optimizer's
``grad_scale`` and ``found_inf``: the coupled decay gradient is then scaled
alike and the decoupled shrink is skipped on a step with an inf. A layer
whose factor weights all lack a gradient is skipped, as the optimizer skips
a parameter without one. While a nonlinearity sits between the sub-layers
(:class:`~expand_mm.hooks.NonlinearInitHook`), the decay still acts on the
product the factors will contract to.

The regime is part of the optimizer state: torch's ``load_state_dict``
replaces every group's hyper-parameters with the saved ones, so a state saved
under the other ``weight_decay_on`` would bring back per-factor decay (saved
with ``'factors'``, no :data:`PRODUCT_DECAY_KEY` for the hook to read) or
zero factor decay without a hook (saved with ``'product'``) and silently
change the regulariser. :class:`WeightDecayOnCheck`, a ``load_state_dict``
pre-hook the constructor installs on the optimizer of every model with
trained factor weights, refuses such a state before anything is loaded
(MMEngine's ``resume`` goes through it), and says how to resume or switch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import ConfigError
from ..layers import ExpandedLayer

WEIGHT_DECAY_ON = ('factors', 'product')
# Optimizers whose weight decay is an L2 gradient term ``weight_decay * p``
# added to the gradient before the update (unless a group sets
# ``decoupled_weight_decay=True``, which Adam, NAdam and RAdam accept).
COUPLED_DECAY_OPTIMIZERS = ('SGD', 'Adam', 'Adamax', 'NAdam', 'RAdam', 'Adagrad', 'RMSprop',
                            'Adadelta', 'ASGD')
# Optimizers that shrink the parameter as ``p <- (1 - lr * weight_decay) p``.
DECOUPLED_DECAY_OPTIMIZERS = ('AdamW', 'Lion')
# Param-group keys written by ExpandNetOptimWrapperConstructor: the decay moved
# onto the product (factor weights, weight_decay_on='product'), the multiplier
# of the factor's rate (every factor's group, when it has one) and the rate the
# group had before that multiplier (optimizer.lr times any custom_keys lr_mult),
# from which the schedule check tells a later scaling (--auto-scale-lr) apart.
PRODUCT_DECAY_KEY = 'product_weight_decay'
FACTOR_LR_MULT_KEY = 'factor_lr_mult'
FACTOR_BASE_LR_KEY = 'factor_base_lr'


def check_weight_decay_on(value: Any) -> None:
    """Raise ``ValueError`` naming ``paramwise_cfg.weight_decay_on`` unless it is valid.

    Args:
        value: ``paramwise_cfg.weight_decay_on``.
    """
    if not (isinstance(value, str) and value in WEIGHT_DECAY_ON):
        raise ConfigError(f'paramwise_cfg.weight_decay_on={value!r} must be one of '
                          f'{WEIGHT_DECAY_ON}')


def decay_style(optimizer: Optimizer) -> str:
    """How ``optimizer`` applies weight decay: ``'coupled'`` or ``'decoupled'``.

    Args:
        optimizer: A built torch optimizer.

    Returns:
        ``'decoupled'`` for :data:`DECOUPLED_DECAY_OPTIMIZERS` and for groups
        with ``decoupled_weight_decay=True``; ``'coupled'`` for the other
        :data:`COUPLED_DECAY_OPTIMIZERS`.

    Raises:
        ValueError: For any other optimizer, naming ``paramwise_cfg.weight_decay_on``.
    """
    name = type(optimizer).__name__
    if name in DECOUPLED_DECAY_OPTIMIZERS or (
            name in COUPLED_DECAY_OPTIMIZERS
            and any(g.get('decoupled_weight_decay') for g in optimizer.param_groups)):
        return 'decoupled'
    if name in COUPLED_DECAY_OPTIMIZERS:
        return 'coupled'
    raise ConfigError(
        f"paramwise_cfg.weight_decay_on='product' does not know how {name} applies weight "
        f'decay; it works with the coupled (L2) decay of {COUPLED_DECAY_OPTIMIZERS} and the '
        f'decoupled decay of {DECOUPLED_DECAY_OPTIMIZERS}. Use one of them, set the factor '
        "weights' decay to 0, or keep weight_decay_on='factors'")


def factor_weights(layer: ExpandedLayer) -> list[Tensor]:
    """The weight of each sub-layer of ``layer``, first sub-layer first."""
    return [sub.weight for sub in layer.sublayers]


class ProductWeightDecay:
    """Optimizer step pre-hook applying each expanded layer's decay to its product.

    Installed by :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor`
    with ``paramwise_cfg=dict(weight_decay_on='product')`` via
    ``optimizer.register_step_pre_hook``; see the module docstring for the
    maths. Reads the per-factor decay (:data:`PRODUCT_DECAY_KEY`) and rate
    multiplier (:data:`FACTOR_LR_MULT_KEY`) from the optimizer's param groups
    at every step, so a resumed optimizer state (whose groups replace the
    built ones) is followed.

    Args:
        optimizer: The torch optimizer whose param groups hold the factor weights.
        layers: ``(module path, layer)`` of the expanded layers.

    Raises:
        ValueError: If the optimizer's decay semantics are unknown (see
            :func:`decay_style`).
    """

    def __init__(self, optimizer: Optimizer, layers: Sequence[tuple[str, ExpandedLayer]]):
        self.style = decay_style(optimizer)
        self.layers = list(layers)
        self.handle = optimizer.register_step_pre_hook(self)

    def remove(self) -> None:
        """Detach the hook from the optimizer."""
        self.handle.remove()

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Apply the product decay of every layer (called by ``optimizer.step``)."""
        groups = {id(p): g for g in optimizer.param_groups for p in g['params']}
        # Set by GradScaler.step for an optimizer that unscales inside its own
        # step (fused=True): the gradients are still scaled here, and a step
        # with an inf is skipped by the optimizer, not before this hook.
        grad_scale = getattr(optimizer, 'grad_scale', None)
        found_inf = getattr(optimizer, 'found_inf', None)
        for _, layer in self.layers:
            optimized = [(p, groups[id(p)]) for p in factor_weights(layer) if id(p) in groups]
            factors = [(p, g) for p, g in optimized if g.get(PRODUCT_DECAY_KEY, 0.0) > 0]
            # The optimizer skips a parameter without a gradient, decay included;
            # a layer unused in this step is skipped alike.
            if not factors or all(p.grad is None for p, _ in factors):
                continue
            if self.style == 'coupled':
                self._coupled(layer, factors, grad_scale)
            else:
                self._decoupled(layer, factors, found_inf, num_factors=len(optimized))

    @staticmethod
    def _coupled(layer: ExpandedLayer, factors: list[tuple[Tensor, dict]],
                 grad_scale: Tensor | None = None) -> None:
        params = [p for p, _ in factors]
        device_type = params[0].device.type
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            # _compose, not composed(): no cache, no deferred leaf, any mode.
            weight = layer._compose(None)[0]
        target = weight.detach()
        if grad_scale is not None:  # the optimizer divides every gradient by it
            target = target * grad_scale.to(target)
        # maximize=True negates the gradient before the optimizer adds its L2
        # term, so the term added here, ahead of that, is negated too.
        decays = [-g[PRODUCT_DECAY_KEY] if g.get('maximize') else g[PRODUCT_DECAY_KEY]
                  for _, g in factors]
        if all(d == decays[0] for d in decays):
            torch.autograd.backward(weight, decays[0] * target, inputs=params)
            return
        grads = torch.autograd.grad(weight, params, target)
        with torch.no_grad():
            for param, grad, decay in zip(params, grads, decays):
                if param.grad is None:
                    param.grad = grad.mul_(decay)
                else:
                    param.grad.add_(grad, alpha=decay)

    @staticmethod
    def _decoupled(layer: ExpandedLayer, factors: list[tuple[Tensor, dict]],
                   found_inf: Tensor | None = None, num_factors: int | None = None) -> None:
        # The root is over every trained factor of the chain, decaying or not,
        # so a factor's decay of 0 acts as the limit of a tiny one (continuous).
        num = num_factors or len(factors)
        with torch.no_grad():
            for param, group in factors:
                lr = group['lr'] / group.get(FACTOR_LR_MULT_KEY, 1.0)
                shrink = 1.0 - float(lr) * group[PRODUCT_DECAY_KEY]
                if not shrink > 0:
                    raise ConfigError(
                        f'{layer._describe()}: decoupled product weight decay '
                        f'lr * weight_decay = {1.0 - shrink:.4g} >= 1 would flip the sign '
                        'of the composed kernel; lower optimizer.lr or weight_decay')
                factor = shrink ** (1.0 / num)
                if found_inf is None:
                    param.mul_(factor)
                else:  # no sync: the optimizer skips this step when found_inf > 0
                    skipped = (found_inf.to(param.device) > 0).to(param.dtype)
                    param.mul_(factor + (1.0 - factor) * skipped)


def saved_weight_decay_on(state_dict: dict) -> str:
    """The ``weight_decay_on`` an optimizer state dict was saved with.

    Args:
        state_dict: ``optimizer.state_dict()`` of an optimizer built by
            :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor` (or by
            any other constructor, which reads as ``'factors'``).

    Returns:
        ``'product'`` if any param group carries :data:`PRODUCT_DECAY_KEY`,
        ``'factors'`` otherwise.
    """
    groups = state_dict.get('param_groups', [])
    return 'product' if any(PRODUCT_DECAY_KEY in group for group in groups) else 'factors'


class WeightDecayOnCheck:
    """Optimizer ``load_state_dict`` pre-hook refusing a state of the other ``weight_decay_on``.

    Installed by :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor` via
    ``optimizer.register_load_state_dict_pre_hook`` whenever the model has
    factor weights in the optimizer, in either setting. It runs before torch
    touches the optimizer (a resume that fails here leaves the built groups
    and state as they were) and compares the setting the saved groups were
    built with (:func:`saved_weight_decay_on`) against the configured one.

    Args:
        optimizer: The torch optimizer that will load the state.
        weight_decay_on: ``paramwise_cfg.weight_decay_on`` of the current config.
    """

    def __init__(self, optimizer: Optimizer, weight_decay_on: str):
        check_weight_decay_on(weight_decay_on)
        self.weight_decay_on = weight_decay_on
        self.handle = optimizer.register_load_state_dict_pre_hook(self)

    def remove(self) -> None:
        """Detach the hook from the optimizer."""
        self.handle.remove()

    def __call__(self, optimizer: Optimizer, state_dict: dict) -> None:
        """Raise ``ValueError`` if ``state_dict`` was saved under the other setting.

        Called by ``optimizer.load_state_dict``; returns ``None`` so the state
        loads unchanged when the settings match.
        """
        saved = saved_weight_decay_on(state_dict)
        if saved == self.weight_decay_on:
            return
        effect = ('its factor weight groups would bring back their per-factor decay and '
                  'the product decay would find nothing to apply' if saved == 'factors' else
                  'its factor weight groups would come back with weight_decay=0 and no '
                  'product decay hook, so the factor weights would not decay at all')
        raise ConfigError(
            f'paramwise_cfg.weight_decay_on: the optimizer state being loaded was trained '
            f'with weight_decay_on={saved!r}, but the current config sets '
            f'weight_decay_on={self.weight_decay_on!r}; loading it would silently change the '
            f'weight decay regime ({effect}). To resume, set paramwise_cfg.weight_decay_on='
            f'{saved!r}; to switch, start from the checkpoint\'s weights only with '
            'load_from=<checkpoint> and resume=False (a fresh optimizer)')


@torch.no_grad()
def weight_decay_term(optimizer: Optimizer,
                      layers: Sequence[tuple[str, ExpandedLayer]] = ()) -> float:
    """The L2 term ``sum lambda / 2 * ||w||^2`` of the weight decay ``optimizer`` applies.

    What the optimizer decays, with the coefficient it decays it by: every
    parameter of a group with a nonzero ``weight_decay`` (``paramwise_cfg``'s
    ``decay_mult`` and ``custom_keys`` already folded into the groups), and,
    for ``weight_decay_on='product'``, the composed kernel ``W`` of each
    expanded layer in ``layers`` whose factor weights carry
    :data:`PRODUCT_DECAY_KEY` (their own groups then have ``weight_decay=0``,
    so nothing is counted twice). Factors of one layer with different
    values count the product with their mean. Read only: nothing is updated,
    no graph is built.

    For a coupled optimizer (SGD, Adam) the decay is the gradient of exactly
    this term; for a decoupled one (AdamW) it is the term whose gradient the
    shrink ``w <- (1 - lr lambda) w`` follows, scaled by the rate.

    Args:
        optimizer: The torch optimizer (``optim_wrapper.optimizer``).
        layers: ``(path, layer)`` of the model's expanded layers
            (:func:`~expand_mm.surgery.expanded_layers`); only needed for the
            product decay.

    Returns:
        The term, as a float (accumulated in float64).
    """
    total = torch.zeros((), dtype=torch.float64)
    for group in optimizer.param_groups:
        decay = group.get('weight_decay', 0.0) or 0.0
        if decay:
            squares = sum(p.detach().double().square().sum().cpu() for p in group['params'])
            total += decay / 2 * squares
    groups = {id(p): g for g in optimizer.param_groups for p in g['params']}
    for _, layer in layers:
        decays = [groups[id(p)].get(PRODUCT_DECAY_KEY, 0.0) for p in factor_weights(layer)
                  if id(p) in groups]
        decays = [d for d in decays if d > 0]
        if decays:
            kernel = layer._compose(None)[0]  # no cache, no deferred leaf, any mode
            total += sum(decays) / len(decays) / 2 * kernel.double().square().sum().cpu()
    return float(total)
