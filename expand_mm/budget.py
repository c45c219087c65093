"""Per-layer expansion ratios planned against a training budget.

A :class:`Budget` says what training may cost against the compact model, at a
batch size and input size: ``train_step`` (step time) and ``train_memory``
(peak training memory), as ratios such as 1.10. Before anything is expanded,
:func:`plan_expansion` predicts what each candidate layer adds at each allowed
ratio and chooses per-layer ratios that keep the prediction within the budget.

The predictions are those of ``tools/benchmark.py``'s floors, from closed forms
and one trace of the compact model (nothing expanded is built):

- step time: ``(B·F + Σ C_l) / (B·F)``, with ``F`` the compact forward MACs of
  one image (mmengine's ``FlopAnalyzer``, as the benchmark counts them), ``B``
  the batch and ``C_l`` the MACs of composing layer ``l``'s kernel once (what
  online mode pays per step, whatever the batch; its backward scales like the
  forward's, so the forward ratio stands for the step's);
- peak memory: ``(S' + max(A + G, G')) / (S + A + G)``: ``S`` / ``S'`` the
  persistent state (parameters, buffers, optimizer state) of the compact /
  expanded model, ``G`` / ``G'`` their gradients, ``A`` the activations of a
  compact step, estimated as ``B`` × the bytes of every module output of one
  image. With deferred factor gradients the expanded step's own peak is the
  compact one, unless all the factors' gradients together are larger.

What is maximised is the number of ratio steps: the sum over layers of the
position of its ratio in the allowed set (with ``(1, 2, 4)``: 0, 1 or 2). Every
layer counts the same: ExpandNets' gain comes from over-parameterising every
layer (the paper expands them all), a narrow deep layer no less than a wide
one, so a plan that expands many layers at a moderate ratio is preferred to
one that spends the budget on a few at the highest. The plan is built
greedily, cheapest step first, where a step's cost is the larger of its shares
of the time and the memory headroom. With one additive limit this maximises
the number of steps exactly: each layer's steps cost more as its ratio grows
(about r²), so the cheapest steps always form a valid plan. With two limits
(and the gradients' ``max``) it is a heuristic.

:func:`plan_expansion` makes the plan; :func:`expand_within_budget` plans and
expands (``type='ExpandNet'`` with ``budget=...`` calls it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from .cost import (FLOAT_BYTES, TrainingMemory, count_activation_bytes, count_macs,
                   training_memory)
from .errors import ConfigError
from .layers.base import check_ratio
from .surgery import (ExpansionReport, ExpansionSettings, count_params, expand_model,
                      layer_strategy, select_layers, selected_layer_cost)

DEFAULT_RATIOS = (1, 2, 4)
MIB = 1024 ** 2


@dataclass(frozen=True)
class Budget:
    """What training an ExpandNet may cost, as ratios to its compact model.

    Attributes:
        train_step: Largest predicted step time / the compact step's (e.g. 1.10);
            ``None``: no limit.
        train_memory: Largest predicted peak training memory / the compact one's;
            ``None``: no limit.
        batch_size: Training batch size (per device) the costs are predicted at.
        img_size: Training input ``(H, W)`` (one int for a square).
        ratios: The ratios a layer may get; 1 (compact) is always allowed.
        optimizer_slots: Optimizer state tensors per parameter (1: SGD with
            momentum, 2: Adam / AdamW).

    Raises:
        ConfigError: For a limit below 1, no limit at all, a missing or
            non-positive batch size or input size, or a bad ratio.
    """

    train_step: float | None = None
    train_memory: float | None = None
    batch_size: int | None = None
    img_size: tuple[int, int] | None = None
    ratios: tuple[int, ...] = DEFAULT_RATIOS
    optimizer_slots: int = 1

    def __post_init__(self) -> None:
        for key in ('train_step', 'train_memory'):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 1):
                raise ConfigError(f'budget: {key}={value!r} must be a ratio >= 1 to the compact '
                                  'model (e.g. 1.10), or None for no limit')
        if self.train_step is None and self.train_memory is None:
            raise ConfigError('budget: give train_step and/or train_memory (ratios to the '
                              'compact model, e.g. budget=dict(train_step=1.10, '
                              'train_memory=1.10))')
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(
                f'budget: batch_size={self.batch_size!r} must be the training batch size per '
                'device, e.g. batch_size={{_base_.train_dataloader.batch_size}} in a config')
        size = self.img_size
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ConfigError(f'budget: img_size={self.img_size!r} must be the training input '
                              'size (H, W) or one int, e.g. img_size=(320, 320)')
        object.__setattr__(self, 'img_size', (int(size[0]), int(size[1])))
        ratios = self.ratios if isinstance(self.ratios, (list, tuple)) else (self.ratios,)
        ratios = tuple(sorted({1} | {check_ratio(r, 'budget') for r in ratios}))
        if len(ratios) < 2:
            raise ConfigError(f'budget: ratios={self.ratios!r} allows no ratio above 1, so '
                              'nothing could be expanded; e.g. ratios=(1, 2, 4)')
        object.__setattr__(self, 'ratios', ratios)
        if self.optimizer_slots not in (0, 1, 2):
            raise ConfigError(f'budget: optimizer_slots={self.optimizer_slots!r} must be 0 '
                              '(SGD), 1 (SGD with momentum) or 2 (Adam, AdamW)')

    @classmethod
    def of(cls, value: Budget | Mapping[str, Any]) -> Budget:
        """``value`` as a :class:`Budget` (from a config dict, naming a misspelled key)."""
        if isinstance(value, Budget):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f'budget={value!r} must be a dict such as dict(train_step=1.10, '
                              'train_memory=1.10, batch_size=16, img_size=(320, 320))')
        keys = [f.name for f in fields(cls)]
        for key in value:
            if key not in keys:
                near = difflib.get_close_matches(str(key), keys, n=1)
                raise ConfigError(f'budget: unknown key {key!r}'
                                  + (f' (did you mean {near[0]!r}?)' if near else '')
                                  + f'; the keys are {keys}')
        return cls(**dict(value))


@dataclass(frozen=True)
class CompactCost:
    """The compact model's training step, as the planner predicts it.

    Attributes:
        step_macs: Forward MACs of one batch (batch × one image's).
        activation_bytes: Activations of one batch (estimate, see the module doc).
        memory: Its persistent training state and gradients.
    """

    step_macs: int
    activation_bytes: int
    memory: TrainingMemory

    @property
    def step_peak_bytes(self) -> int:
        """What a step allocates at its peak: activations and gradients."""
        return self.activation_bytes + self.memory.grad_bytes

    @property
    def peak_bytes(self) -> int:
        """Peak training memory: the persistent state plus the step's peak."""
        return self.memory.param_bytes + self.memory.optimizer_bytes + self.step_peak_bytes


@dataclass(frozen=True)
class LayerOption:
    """One candidate layer's costs at every allowed ratio.

    Attributes:
        path: Module path.
        strategy: ``'cl'``, ``'ck'`` or ``'fc'``.
        compact_params: Its parameters in compact form.
        trainable: Whether its parameters are trained (get gradients and state).
        params: Training-form parameters by ratio.
        composition_macs: MACs of one composition by ratio (0 at ratio 1).
    """

    path: str
    strategy: str
    compact_params: int
    trainable: bool
    params: dict[int, int]
    composition_macs: dict[int, int]


@dataclass
class PlannedLayer:
    """One layer of a :class:`BudgetPlan`.

    Attributes:
        path: Module path.
        strategy: ``'cl'``, ``'ck'`` or ``'fc'``.
        ratio: The chosen ratio (1: left compact).
        params: Its training-form parameters at that ratio.
        time_share: Its composition MACs / the compact step's MACs.
        memory_share: Its added parameters and their optimizer state / the compact
            peak memory (gradients count in the total only where all of them
            together exceed the compact step's peak).
    """

    path: str
    strategy: str
    ratio: int
    params: int
    time_share: float
    memory_share: float


@dataclass
class BudgetPlan:
    """The per-layer ratios chosen for a budget, and what they are predicted to cost.

    Attributes:
        budget: The budget planned for.
        compact: The compact model's predicted step.
        layers: Every candidate layer, in module order, with its ratio.
        train_step: Predicted step time / the compact step's.
        train_memory: Predicted peak memory / the compact one's.
        memory: Predicted training state of the planned model.
        ratio_steps: What the plan maximises (see the module doc).
    """

    budget: Budget
    compact: CompactCost
    layers: list[PlannedLayer] = field(default_factory=list)
    train_step: float = 1.0
    train_memory: float = 1.0
    memory: TrainingMemory | None = None
    ratio_steps: int = 0

    @property
    def ratio_rules(self) -> tuple[tuple[str, int], ...]:
        """The plan as per-layer ``ratio`` rules: ``(path, ratio)`` for every candidate."""
        return tuple((layer.path, layer.ratio) for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (for logs and benchmark files)."""
        return dict(budget=dict(self.budget.__dict__), train_step=self.train_step,
                    train_memory=self.train_memory, ratio_steps=self.ratio_steps,
                    compact_step_macs=self.compact.step_macs,
                    compact_peak_bytes=self.compact.peak_bytes,
                    planned_params=None if self.memory is None else self.memory.params,
                    layers=[layer.__dict__ for layer in self.layers])

    def __str__(self) -> str:
        budget = self.budget
        rows = [('layer', 'ratio', 'params', 'time share', 'memory share')]
        rows += [(layer.path, str(layer.ratio), f'{layer.params:,}',
                  f'{layer.time_share:.4f}', f'{layer.memory_share:.4f}')
                 for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, '-' * len(lines[0]))
        expanded = sum(layer.ratio > 1 for layer in self.layers)
        limit = ', '.join(f'{k} <= {v:.3f}x' for k, v in (
            ('train_step', budget.train_step), ('train_memory', budget.train_memory))
            if v is not None)
        lines.append(
            f'budget plan ({limit}; batch {budget.batch_size}, {budget.img_size[0]}x'
            f'{budget.img_size[1]}, ratios {budget.ratios}): {expanded} of {len(self.layers)} '
            f'layers expanded, predicted train_step {self.train_step:.3f}x, train_memory '
            f'{self.train_memory:.3f}x (compact: {self.compact.step_macs / 1e9:.3f} GMAC '
            f'forward per step, {self.compact.peak_bytes / MIB:,.1f} MiB peak)')
        return '\n'.join(lines)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode during a count (a training-mode batch norm would update its statistics),
    every module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def compact_cost(model: nn.Module, budget: Budget) -> CompactCost:
    """:class:`CompactCost` of the compact ``model`` at the budget's batch and input size.

    Traces one image (forward MACs, activation bytes) in eval mode; nothing is
    changed.
    """
    with _eval_mode(model):
        macs = count_macs(model, budget.img_size)
        activations = count_activation_bytes(model, budget.img_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory = training_memory(count_params(model), trainable,
                             sum(b.numel() for b in model.buffers()), budget.optimizer_slots)
    return CompactCost(macs * budget.batch_size, activations * budget.batch_size, memory)


def layer_options(model: nn.Module, settings: ExpansionSettings,
                  ratios: Sequence[int]) -> list[LayerOption]:
    """:class:`LayerOption` of every layer that ``settings`` select, in module order.

    Raises:
        ConfigError: As :func:`expand_mm.expand_model` for the patterns.
    """
    selected, _ = select_layers(model, settings)
    options = []
    for path, module in selected:
        costs = {r: selected_layer_cost(module, settings, r) for r in ratios}
        if any(cost is None for cost in costs.values()):
            continue  # no closed form: the planner leaves it compact
        options.append(LayerOption(
            path=path, strategy=layer_strategy(module, settings),
            compact_params=count_params(module),
            trainable=any(p.requires_grad for p in module.parameters()),
            params={r: c.params for r, c in costs.items()},
            composition_macs={r: c.composition_macs for r, c in costs.items()}))
    return options


def predict(compact: CompactCost, options: Sequence[LayerOption], ratios: Mapping[str, int],
            optimizer_slots: int) -> tuple[float, float, TrainingMemory]:
    """Predicted ``(train_step, train_memory, training state)`` with these per-layer ratios.

    The formulas of the module doc; ``ratios`` maps each option's path to its ratio.
    """
    compact_memory = compact.memory
    added = added_trainable = composition = 0
    for option in options:
        ratio = ratios[option.path]
        extra = option.params[ratio] - option.compact_params
        added += extra
        added_trainable += extra if option.trainable else 0
        composition += option.composition_macs[ratio]
    memory = TrainingMemory(
        params=compact_memory.params + added,
        param_bytes=compact_memory.param_bytes + added * FLOAT_BYTES,
        grad_bytes=compact_memory.grad_bytes + added_trainable * FLOAT_BYTES,
        optimizer_bytes=compact_memory.optimizer_bytes
        + added_trainable * optimizer_slots * FLOAT_BYTES,
        checkpoint_bytes=compact_memory.checkpoint_bytes
        + (added + added_trainable * optimizer_slots) * FLOAT_BYTES)
    peak = (memory.param_bytes + memory.optimizer_bytes
            + max(compact.step_peak_bytes, memory.grad_bytes))
    train_step = (compact.step_macs + composition) / max(compact.step_macs, 1)
    return train_step, peak / max(compact.peak_bytes, 1), memory


def _within(budget: Budget, train_step: float, train_memory: float) -> bool:
    return ((budget.train_step is None or train_step <= budget.train_step)
            and (budget.train_memory is None or train_memory <= budget.train_memory))


def _step_cost(budget: Budget, before: tuple[float, float], after: tuple[float, float]) -> float:
    """A step's cost: the larger of its shares of the time and the memory headroom."""
    shares = []
    for limit, old, new in ((budget.train_step, before[0], after[0]),
                            (budget.train_memory, before[1], after[1])):
        if limit is not None:
            shares.append((new - old) / max(limit - 1.0, 1e-12))
    return max(shares)


def _unreachable_error(budget: Budget, compact: CompactCost, options: Sequence[LayerOption],
                       optimizer_slots: int) -> ConfigError:
    """The budget that no single layer's cheapest expansion meets, and the smallest figures."""
    smallest = budget.ratios[1]
    figures = []
    for option in options:
        ratios = {o.path: 1 for o in options}
        ratios[option.path] = smallest
        train_step, train_memory, _ = predict(compact, options, ratios, optimizer_slots)
        figures.append((train_step, train_memory, option.path))
    parts = []
    for index, key in ((0, 'train_step'), (1, 'train_memory')):
        if getattr(budget, key) is not None:
            best = min(figures, key=lambda f: f[index])
            parts.append(f'{key} {best[index]:.4f}x ({best[2]} at ratio {smallest})')
    limits = ', '.join(f'{k}={getattr(budget, k)}' for k in ('train_step', 'train_memory')
                       if getattr(budget, k) is not None)
    return ConfigError(
        f'budget {limits} is below what expanding any single layer costs; the smallest '
        f"reachable figures are {' and '.join(parts)}. Raise the budget to at least that, or "
        'train the compact model.')


def choose_ratios(compact: CompactCost, options: Sequence[LayerOption],
                  budget: Budget) -> dict[str, int]:
    """Per-layer ratios within ``budget``, most ratio steps first (greedy, cheapest step first).

    Raises:
        ConfigError: If no layer can be expanded at the smallest allowed ratio
            within the budget, naming the smallest reachable figures.
    """
    ratios = {option.path: 1 for option in options}
    current = predict(compact, options, ratios, budget.optimizer_slots)[:2]
    while True:
        best = None
        for option in options:
            position = budget.ratios.index(ratios[option.path])
            if position + 1 == len(budget.ratios):
                continue
            trial = dict(ratios, **{option.path: budget.ratios[position + 1]})
            figures = predict(compact, options, trial, budget.optimizer_slots)[:2]
            if not _within(budget, *figures):
                continue
            cost = _step_cost(budget, current, figures)
            if best is None or cost < best[0]:
                best = (cost, trial, figures)
        if best is None:
            break
        _, ratios, current = best
    if options and all(r == 1 for r in ratios.values()):
        raise _unreachable_error(budget, compact, options, budget.optimizer_slots)
    return ratios


def plan_expansion(model: nn.Module, settings: ExpansionSettings,
                   budget: Budget | Mapping[str, Any]) -> BudgetPlan:
    """Choose per-layer ratios for the compact ``model`` that keep training within ``budget``.

    Nothing is built or changed: the compact model is traced once at the
    budget's input size, and every candidate layer (those ``settings`` select)
    is costed at every allowed ratio in closed form. The plan is logged.

    Args:
        model: The compact model (before expansion).
        settings: What to expand (include / exclude, strategy, ...); its ``ratio``
            must be left at its default: the budget's ``ratios`` replace it.
        budget: A :class:`Budget` or its dict.

    Returns:
        The :class:`BudgetPlan`; its ``ratio_rules`` are the ``ratio`` to expand with.

    Raises:
        ConfigError: For a bad budget, a ``ratio`` given besides it, or a budget
            that no layer's expansion meets (naming the smallest reachable figures).
    """
    from mmengine.logging import MMLogger

    budget = Budget.of(budget)
    if settings.ratio != ExpansionSettings().ratio:
        raise ConfigError(f'budget given together with ratio={settings.ratio!r}: the planner '
                          'chooses the ratios; give the allowed ones as budget ratios=(1, 2, 4)')
    options = layer_options(model, settings, budget.ratios)
    compact = compact_cost(model, budget)
    ratios = choose_ratios(compact, options, budget)
    train_step, train_memory, memory = predict(compact, options, ratios, budget.optimizer_slots)
    per_param = FLOAT_BYTES * (1 + budget.optimizer_slots)
    layers = [PlannedLayer(
        path=o.path, strategy=o.strategy, ratio=ratios[o.path], params=o.params[ratios[o.path]],
        time_share=o.composition_macs[ratios[o.path]] / max(compact.step_macs, 1),
        memory_share=(o.params[ratios[o.path]] - o.compact_params) * per_param
        / max(compact.peak_bytes, 1)) for o in options]
    plan = BudgetPlan(budget=budget, compact=compact, layers=layers, train_step=train_step,
                      train_memory=train_memory, memory=memory,
                      ratio_steps=sum(budget.ratios.index(r) for r in ratios.values()))
    MMLogger.get_current_instance().info(f'ExpandNet budget plan:\n{plan}')
    return plan


def expand_within_budget(model: nn.Module, budget: Budget | Mapping[str, Any],
                         settings: ExpansionSettings | None = None,
                         **options: Any) -> ExpansionReport:
    """:func:`expand_mm.expand_model` with per-layer ratios planned for ``budget``.

    Args:
        model: The compact model; expanded in place.
        budget: A :class:`Budget` or its dict.
        settings: What to expand, as :func:`~expand_mm.expand_model` takes it
            (its ``ratio`` left at the default), or give its options as keywords.
        **options: :func:`~expand_mm.expand_model`'s keywords (not ``ratio``).

    Returns:
        The expansion report, with the plan as ``report.plan``.

    Raises:
        ConfigError: As :func:`plan_expansion` and :func:`~expand_mm.expand_model`.
    """
    if settings is None:
        settings = ExpansionSettings(**options)
    elif options:
        raise ConfigError('expand_within_budget: give the options either as settings=... '
                          'or as keywords, not both')
    plan = plan_expansion(model, settings, budget)
    report = expand_model(model, settings=dataclasses.replace(settings, ratio=plan.ratio_rules),
                          optimizer_slots=plan.budget.optimizer_slots)
    report.plan = plan
    return report
