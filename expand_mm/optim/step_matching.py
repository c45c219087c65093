"""Step-matched factor rates: each step moves the composed kernel as Adam would move it.

The rule (``paramwise_cfg.factor_lr='matched'``), for Adam and AdamW: *at every
step, an expanded layer's composed kernel moves, relative to its size, as far
as the compact optimizer would move the compact kernel, relative to its size,
given the same gradient.* The direction is the factors' own (that is what
expansion changes); only the size is taken from the compact optimizer.

Why a measured, running rule. A BN-followed kernel is scale-invariant, and so
is each factor of a chain composing it: Adam moves every entry by about the
rate per step, so a scale-invariant tensor's norm grows and its relative step
shrinks as training goes (the automatic rate decay of normalised nets). A
chain of ``L`` factors, each with ``1/L`` of the compact relative step (the
``'fan_in'`` rule), grows each factor's norm ``L^2`` times slower than the
compact kernel grows, so later in training the product keeps relative steps
several times larger than the compact kernel's, and more so the larger the
rate and the longer the schedule. That is why one fixed multiplier suits the
digits detector (AdamW 0.004) and collapses the U-Net (AdamW 0.016). A rule
fixed at the first step (``'calibrated'``) cannot follow it; this one measures
at every step.

What runs, per expanded layer and optimizer step (:class:`StepMatchedFactorRates`):

1. A tensor hook on the online composed kernel sums its gradient ``G``
   (``ExpandedLayer.composed_grad_tap``).
2. Before the step, ``G`` updates a shadow of the compact optimizer's state
   (Adam's two moments of the kernel, the group's betas, eps and decay), which
   gives the compact step ``D = lr_t (m_hat / (sqrt(v_hat) + eps) + wd W)``
   (decoupled decay; coupled L2 enters ``G`` instead). ``lr_t`` is the
   factor group's current rate over its recorded multiplier, so schedulers
   and warm-ups are followed. The shadow also follows the compact kernel's
   RMS ``n``: it starts at the compact kernel the layer stands for (its
   initialisation, or the kernel it was factorised from) and grows as Adam's
   steps, orthogonal to a scale-invariant kernel, make it grow:
   ``n^2 <- (n (1 - lr_t wd))^2 + rms(D_adam)^2``. The target move is
   ``rms(W) * rms(D) / n``.
3. The layer's factor groups step at their rate times the layer's scale ``s``.
4. After the step the composed kernel is composed again; its move ``dW``
   updates ``log s += gain * clip(log(target / rms(dW)), +-log 2)``.

Relative, not absolute, steps are matched because the kernels that matter are
scale-invariant: freshly initialised factors compose to a kernel several times
smaller than the compact initialisation, and Adam's absolute step at that
kernel would be a several times larger relative step than the compact layer
ever takes.

Adam's step is linear in its rate, so the move scales with ``s``; the gain
smooths the per-step noise of the ratio. ``s`` is kept in the factor groups
(:data:`STEP_SCALE_KEY`) and the shadow moments in the optimizer state of the
layer's first factor, so both are saved with the optimizer and a resumed run
goes on exactly. Under distributed training the measured targets are averaged
over the ranks (the gradients seen by the tap are each rank's own), so the
ranks keep equal rates. Cost: the composition twice per expanded layer and
step, no extra activation memory.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from mmengine import dist
from torch import Tensor
from torch.optim import Optimizer

from ..errors import ConfigError
from ..layers import ExpandedLayer
from .lr_calibration import reference_rms
from .product_decay import FACTOR_LR_MULT_KEY, PRODUCT_DECAY_KEY, decay_style

# Param-group key of the layer's running scale (saved with the optimizer).
STEP_SCALE_KEY = 'factor_step_scale'
# Optimizer-state keys of the shadow compact moments (first factor's state).
SHADOW_KEYS = ('compact_exp_avg', 'compact_exp_avg_sq', 'compact_step', 'compact_rms')
# Share of each step's log-ratio taken into the scale: the ratio's step-to-step
# noise is a few tens of percent, and a constant offset is gone in ~15 steps.
DEFAULT_GAIN = 0.15
MAX_LOG_CORRECTION = math.log(2.0)
MATCHED_OPTIMIZERS = ('Adam', 'AdamW')


class ComposedGradTap:
    """Sums the gradient reaching a composed kernel until it is taken.

    Not copied with its module (``EMAHook``'s copy of the model trains nothing).
    """

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def __call__(self, grad: Tensor) -> None:
        """Tensor hook: add ``grad`` (the gradient passes on unchanged)."""
        grad = grad.detach()
        self.grad = grad.clone() if self.grad is None else self.grad + grad

    def take(self) -> Tensor | None:
        """The summed gradient since the last take (``None`` if none came)."""
        grad, self.grad = self.grad, None
        return grad

    def __deepcopy__(self, memo: dict) -> None:
        return None


def rms(tensor: Tensor) -> float:
    """Root mean square of the entries (float32 accumulation at least)."""
    return float(tensor.detach().float().pow(2).mean().sqrt())


def compact_adam_step(grad: Tensor, weight: Tensor, state: dict, group: dict,
                      decoupled: bool, reference_rms: float) -> tuple[float, float]:
    """The compact optimizer's step at ``weight``: its RMS, and the compact kernel's RMS.

    Updates ``state`` (the shadow moments and kernel RMS under
    :data:`SHADOW_KEYS`) as Adam / AdamW with ``group``'s settings would,
    ``group['lr']`` being the compact rate.

    Args:
        grad: The gradient of the composed kernel.
        weight: The composed kernel.
        state: The shadow state (empty at the first step).
        group: The compact layer's param group (``lr``, ``betas``, ``eps``, decay).
        decoupled: AdamW-style decay (else coupled L2, added to the gradient).
        reference_rms: The compact kernel's RMS where training starts.

    Returns:
        ``(rms(D), n)``: the RMS of the step ``D`` and of the compact kernel before it.
    """
    beta1, beta2 = group['betas']
    rate = float(group['lr'])
    decay = float(group.get(PRODUCT_DECAY_KEY) or group.get('weight_decay') or 0.0)
    grad = grad.float()
    weight = weight.float()
    if decay and not decoupled:
        grad = grad + decay * weight
    if SHADOW_KEYS[0] in state:
        exp_avg, exp_avg_sq = state[SHADOW_KEYS[0]], state[SHADOW_KEYS[1]]
        count, norm = int(state[SHADOW_KEYS[2]]), float(state[SHADOW_KEYS[3]])
    else:
        exp_avg, exp_avg_sq, count, norm = (torch.zeros_like(grad), torch.zeros_like(grad),
                                            0, reference_rms)
    count += 1
    exp_avg = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    adam = rate * (exp_avg / (1 - beta1 ** count)) / (
        (exp_avg_sq / (1 - beta2 ** count)).sqrt() + group['eps'])
    shrink = 1 - rate * decay if decoupled else 1.0
    step = adam + (rate * decay) * weight if decoupled and decay else adam
    state.update({SHADOW_KEYS[0]: exp_avg, SHADOW_KEYS[1]: exp_avg_sq,
                  SHADOW_KEYS[2]: torch.tensor(float(count)),
                  SHADOW_KEYS[3]: torch.tensor(math.sqrt((norm * shrink) ** 2 + rms(adam) ** 2))})
    return rms(step), norm


def scale_correction(target: float, measured: float, gain: float = DEFAULT_GAIN) -> float:
    """The change of ``log s`` that moves the measured step towards the target."""
    if not (measured > 0 and target > 0 and math.isfinite(measured) and math.isfinite(target)):
        return 0.0
    ratio = math.log(target / measured)
    return gain * max(-MAX_LOG_CORRECTION, min(MAX_LOG_CORRECTION, ratio))


class _Layer:
    """One expanded layer under the rule: its trained factors, tap and the step in flight."""

    def __init__(self, path: str, layer: ExpandedLayer, params: list[Tensor]):
        self.path, self.layer, self.params, self.first = path, layer, params, params[0]
        self.groups: list[dict] = []
        self.tap = ComposedGradTap()
        layer.composed_grad_tap = self.tap
        self.before: Tensor | None = None
        self.target = 0.0
        self.shadow: dict[str, Any] = {}
        self.rates: list[float] = []

    def compose(self) -> Tensor:
        with torch.no_grad():
            return self.layer._compose(None)[0].detach().clone()


class StepMatchedFactorRates:
    """Optimizer step pre- and post-hooks applying ``factor_lr='matched'``.

    Installed by :class:`~expand_mm.optim.ExpandNetOptimWrapperConstructor`;
    see the module docstring for the rule. Layers whose chain is not linear
    (nonlinear-counterpart init) or that got no gradient in a step are skipped
    in that step.

    Args:
        optimizer: A torch Adam or AdamW optimizer.
        layers: ``(path, layer)`` of the expanded layers whose factors it trains.
        gain: Share of each step's log-ratio applied to the layer's scale.
    """

    def __init__(self, optimizer: Optimizer, layers: Sequence[tuple[str, ExpandedLayer]],
                 gain: float = DEFAULT_GAIN):
        name = type(optimizer).__name__
        if name not in MATCHED_OPTIMIZERS:
            raise ConfigError(f"paramwise_cfg.factor_lr='matched' shadows Adam's step and "
                              f'works with {MATCHED_OPTIMIZERS}, not {name}; use '
                              "factor_lr='fan_in' for it")
        self.optimizer = optimizer
        self.decoupled = decay_style(optimizer) == 'decoupled'
        self.gain = gain
        trained = {id(p) for g in optimizer.param_groups for p in g['params']}
        self.layers: list[_Layer] = []
        for path, layer in layers:
            params = [p for p in layer.sublayers.parameters() if id(p) in trained]
            if params:
                self.layers.append(_Layer(path, layer, params))
        self._find_groups(optimizer)
        for entry in self.layers:
            for group in entry.groups:
                group.setdefault(STEP_SCALE_KEY, 1.0)
        self._handles = [optimizer.register_step_pre_hook(self.before_step),
                         optimizer.register_step_post_hook(self.after_step)]

    def remove(self) -> None:
        """Detach the hooks and the taps."""
        for handle in self._handles:
            handle.remove()
        for entry in self.layers:
            entry.layer.composed_grad_tap = None

    def scales(self) -> dict[str, float]:
        """Each layer's current scale, by module path."""
        self._find_groups(self.optimizer)
        return {e.path: float(e.groups[0].get(STEP_SCALE_KEY, 1.0)) for e in self.layers}

    def _find_groups(self, optimizer: Optimizer) -> None:
        """Point each layer at its factors' groups (a resume replaces the group dicts)."""
        groups = {id(p): g for g in optimizer.param_groups for p in g['params']}
        for entry in self.layers:
            entry.groups = list({id(groups[id(p)]): groups[id(p)] for p in entry.params}.values())

    def before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Measure each layer's compact step and scale its factor rates for this step."""
        self._find_groups(optimizer)
        targets = []
        for entry in self.layers:
            grad = entry.tap.take()
            entry.before = None
            if grad is not None and entry.layer.nonlinearity is None and bool(
                    torch.isfinite(grad).all()):
                entry.before = entry.compose()
                group = entry.groups[0]
                compact = dict(group, lr=group['lr'] / float(group.get(FACTOR_LR_MULT_KEY, 1.0)))
                state = {k: v for k, v in optimizer.state.get(entry.first, {}).items()
                         if k in SHADOW_KEYS}
                step, norm = compact_adam_step(grad, entry.before, state, compact,
                                               self.decoupled, reference_rms(entry.layer))
                entry.target = rms(entry.before) * step / norm
                entry.shadow = state
            targets.append(entry.target if entry.before is not None else 0.0)
        self._average_over_ranks(targets)
        for entry in self.layers:
            entry.rates = [g['lr'] for g in entry.groups]
            for group in entry.groups:
                group['lr'] = group['lr'] * float(group.get(STEP_SCALE_KEY, 1.0))

    def _average_over_ranks(self, targets: list[float]) -> None:
        if dist.get_world_size() <= 1 or not self.layers:
            return
        values = torch.tensor(targets, dtype=torch.float64,
                              device=self.layers[0].first.device)
        dist.all_reduce(values, op='mean')
        for entry, value in zip(self.layers, values.tolist()):
            entry.target = value

    def after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Restore the scheduled rates and move each layer's scale towards its target."""
        for entry in self.layers:
            for group, rate in zip(entry.groups, entry.rates):
                group['lr'] = rate
            if entry.before is None:
                continue
            moved = rms(entry.compose() - entry.before)
            correction = scale_correction(entry.target, moved, self.gain)
            for group in entry.groups:
                group[STEP_SCALE_KEY] = float(group.get(STEP_SCALE_KEY, 1.0)) * math.exp(correction)
            state = optimizer.state.get(entry.first)
            if state is not None:  # Adam made it in this step
                state.update(entry.shadow)
            entry.before = None
