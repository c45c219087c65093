"""Model surgery: expand the selected layers of any ``nn.Module`` and contract back.

This module knows nothing of mmdet or mmseg. It walks ``named_modules()``,
classifies every conv / linear layer (expandable, or left compact and why),
selects layers by glob patterns over their module paths, and swaps each one for
its :class:`~expand_mm.layers.ExpandConv2d` / :class:`~expand_mm.layers.ExpandLinear`
(in place, so the optimizer built afterwards sees the factors). What to expand
and how is one :class:`ExpansionSettings`, checked once. Contraction is the
reverse on a deep copy, so the training model is never touched.

mmcv ``ConvModule``s hold their convolution as ``.conv``; replacing exactly that
child keeps the norm and the activation where they were, and keeps every
state-dict key outside the conv unchanged.

Checking a contraction is :mod:`expand_mm.verification`'s job, and the deferred
factor gradients are :mod:`expand_mm.layers.deferred_grads`'; their names stay
importable from here.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .cost import (LayerExpansionCost, TrainingMemory, available_memory_bytes, expanded_params,
                   format_bytes, layer_expansion_cost, training_memory)
from .errors import ConfigError
from .layers import MODES, ExpandConv2d, ExpandedLayer, ExpandLinear
from .layers.base import check_ratio
from .layers.deferral import deferred_factor_grads  # noqa: F401  (importable from here)
from .contraction import (compact_copy, contract_model_, expanded_layers,  # noqa: F401
                          replace_submodule)
from .verification import (WEAK_PROBE_SENSITIVITY, ContractionCheckError,  # noqa: F401
                           _cpu_float64_copy, check_contraction, check_layer_contractions,
                           flatten_tensors, verify_contraction)

STRATEGIES = ('cl', 'ck', 'auto')
GIB = 1024 ** 3

# Per-layer ratios: ``(pattern, ratio)`` rules, the first whose pattern matches a path wins.
RatioRules = tuple[tuple[str, int], ...]

# Names of the deferred-gradient engine, importable from here as well.
_DEFERRED_GRADS_NAMES = ('deferral_unsupported_reason', 'discard_deferred_factor_grads')


def __getattr__(name: str) -> Any:
    """Deprecated aliases: the deferred-gradient engine's helpers (import them from
    :mod:`expand_mm.layers.deferred_grads`)."""
    if name in _DEFERRED_GRADS_NAMES:
        from .layers import deferred_grads
        return getattr(deferred_grads, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _patterns(key: str, patterns: Iterable[str] | str) -> tuple[str, ...]:
    """``patterns`` as a tuple of glob strings; one string is one pattern."""
    # One pattern given as a string (as `--cfg-options model.include=backbone.*`
    # passes it) is that pattern, not its characters.
    if isinstance(patterns, str):
        return (patterns,)
    try:
        patterns = tuple(patterns)
    except TypeError:
        patterns = (patterns,)
    wrong = [p for p in patterns if not isinstance(p, str)]
    if wrong:
        raise ConfigError(f'expand_model: {key}={patterns!r} must be glob patterns over module '
                          f"paths (strings such as 'backbone.*'), got {wrong[0]!r}")
    return patterns


def _specificity(pattern: str) -> int:
    """How much of a path ``pattern`` fixes: its characters that are not wildcards."""
    return sum(c not in '*?[]' for c in pattern)


def _ratio_rules(ratio: Any) -> int | RatioRules:
    """``ratio`` checked: one integer ratio, or per-layer ``(pattern, ratio)`` rules in match order.

    A list of ``(pattern, ratio)`` pairs keeps its order (first match wins). A
    mapping is ordered most specific pattern first (most non-wildcard characters;
    ties by name), not by its key order: MMEngine sorts a dict's keys when it
    dumps a config, so key order would not survive the ``config.py`` a run
    writes into its work dir.
    """
    if isinstance(ratio, Mapping):
        pairs = sorted(ratio.items(), key=lambda rule: (-_specificity(str(rule[0])), str(rule[0])))
    elif isinstance(ratio, (list, tuple)):
        pairs = list(ratio)
    else:
        return check_ratio(ratio, 'expand_model')
    malformed = [p for p in pairs if not (isinstance(p, (list, tuple)) and len(p) == 2
                                          and isinstance(p[0], str))]
    if not pairs or malformed:
        raise ConfigError(
            f'expand_model: ratio={ratio!r} must be an integer, a mapping of module-path '
            "patterns to ratios ({'backbone.stages.5.*': 2, '*': 4}) or a list of "
            "(pattern, ratio) pairs ([('backbone.stages.5.*', 2), ('*', 4)]; first match wins)"
            + (f'; {malformed[0]!r} is not a (pattern, ratio) pair' if malformed else ''))
    return tuple((pattern, check_ratio(r, f'expand_model: ratio of pattern {pattern!r}'))
                 for pattern, r in pairs)


def _check_strategy(strategy: Any) -> None:
    if isinstance(strategy, str) and strategy.lower() in STRATEGIES and strategy not in STRATEGIES:
        raise ConfigError(f'expand_model: strategy={strategy!r}: the names are lower-case, '
                          f'use {strategy.lower()!r}')
    if strategy not in STRATEGIES:
        raise ConfigError(f"expand_model: strategy={strategy!r} is not one of {STRATEGIES} "
                          "('auto' = CK for odd kernels >= 5, CL otherwise)")


@dataclass(frozen=True)
class ExpansionSettings:
    """What :func:`expand_model` expands and how; every value is checked once, when built.

    Attributes:
        strategy: ``'cl'`` (k×k → 1×1, k×k, 1×1), ``'ck'`` (odd k ≥ 5 → chain of
            3×3; a selected layer where CK is impossible is an error) or
            ``'auto'`` (CK where possible, CL otherwise).
        ratio: Expansion ratio r ≥ 1 (integer), or per-layer ratios: a list of
            ``(pattern, ratio)`` pairs over module paths (fnmatch globs, first match
            wins) or a mapping ``{pattern: ratio}`` (the most specific pattern
            wins: the one with most non-wildcard characters). A layer that no
            pattern matches, or whose ratio is 1, stays compact. Kept as the int
            or as the ordered pairs; read it per layer with :meth:`ratio_for`.
        mode: ``'online'`` (compose the kernel in ``forward``) or ``'explicit'``
            (run the chain on activations).
        include: Glob patterns over module paths (a string is one pattern; kept
            as a tuple); a layer is selected when its path or an ancestor's path
            matches one. ``None`` selects all.
        exclude: Glob patterns of layers to leave compact (applied after include).
        expand_1x1: Also expand 1×1 convs (the paper leaves them compact).
        expand_linear: Also expand ``nn.Linear`` layers (FC expansion).
        keep_weights: Choose factors so every expanded layer computes exactly what
            its compact layer did (for pretrained compact weights).
        max_train_memory: Cap, in GiB, on the predicted training memory
            (parameters, gradients, optimizer state); ``None``: the memory
            available on the model's device when :func:`expand_model` runs.

    Raises:
        ConfigError: For an unknown strategy or mode, a ratio that is not an
            integer ≥ 1 (or malformed ratio rules), a pattern that is not a
            string, or a cap that is not a positive number.
    """

    strategy: str = 'cl'
    ratio: int = 4
    mode: str = 'online'
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    expand_1x1: bool = False
    expand_linear: bool = False
    keep_weights: bool = False
    max_train_memory: float | None = None

    def __post_init__(self) -> None:
        _check_strategy(self.strategy)
        if self.max_train_memory is not None and (
                isinstance(self.max_train_memory, bool)
                or not isinstance(self.max_train_memory, (int, float))
                or not self.max_train_memory > 0):
            raise ConfigError(f'expand_model: max_train_memory={self.max_train_memory!r} must '
                              'be a positive number of GiB (or None: the available memory)')
        if self.mode not in MODES:
            raise ConfigError(f'expand_model: mode={self.mode!r} is not one of {MODES}')
        # Frozen: the normalised patterns are set past the dataclass's guard.
        if self.include is not None:
            object.__setattr__(self, 'include', _patterns('include', self.include))
        object.__setattr__(self, 'exclude', _patterns('exclude', self.exclude or ()))
        object.__setattr__(self, 'ratio', _ratio_rules(self.ratio))

    @property
    def ratio_patterns(self) -> tuple[str, ...]:
        """The patterns of per-layer ratio rules (none for one ratio)."""
        return () if isinstance(self.ratio, int) else tuple(p for p, _ in self.ratio)

    def ratio_for(self, path: str) -> int:
        """The expansion ratio of the layer at module path ``path`` (1: it stays compact)."""
        if isinstance(self.ratio, int):
            return self.ratio
        for pattern, ratio in self.ratio:
            if path_matches(path, [pattern]) is not None:
                return ratio
        return 1

    @property
    def max_ratio(self) -> int:
        """The largest ratio any layer gets."""
        return self.ratio if isinstance(self.ratio, int) else max(r for _, r in self.ratio)

    def selects(self, path: str) -> bool:
        """Whether ``include`` / ``exclude`` select the layer at module path ``path``."""
        return ((self.include is None or path_matches(path, self.include) is not None)
                and path_matches(path, self.exclude) is None)


@dataclass
class ExpandedLayerRecord:
    """One expanded layer of an :class:`ExpansionReport`.

    Attributes:
        path: Module path of the replaced layer (e.g. ``'backbone.conv1.conv'``).
        layer_type: ``'Conv2d'`` or ``'Linear'``.
        shape: Human-readable compact shape, e.g. ``'32->64 k3x3 s2 g1'``.
        strategy: ``'cl'``, ``'ck'`` or ``'fc'``.
        compact_params: Parameters of the compact layer.
        expanded_params: Parameters of its expanded chain.
        ratio: Its expansion ratio.
    """

    path: str
    layer_type: str
    shape: str
    strategy: str
    compact_params: int
    expanded_params: int
    ratio: int = 0


@dataclass
class ExpansionReport:
    """What :func:`expand_model` did: every expanded layer and the totals.

    Attributes:
        layers: One record per expanded layer, in module order.
        skipped: ``(path, reason)`` for candidate layers that were left compact.
        model_params_before: Parameters of the whole model before expansion.
        model_params_after: Parameters of the whole model after expansion.
        settings: The settings the layers were expanded with; ``ratio`` and
            ``mode`` read from them.
        predicted_memory: The training state predicted before any layer was built
            (parameters, gradients, optimizer state, a training checkpoint).
        plan: The budget plan that chose the ratios
            (:class:`expand_mm.budget.BudgetPlan`), set by
            :func:`expand_mm.budget.expand_within_budget`.
    """

    layers: list[ExpandedLayerRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    settings: ExpansionSettings = field(default_factory=ExpansionSettings)
    predicted_memory: TrainingMemory | None = None
    plan: Any = None

    @property
    def ratio(self) -> int | RatioRules:
        """Expansion ratio used: one int, or the per-layer ``(pattern, ratio)`` rules."""
        return self.settings.ratio

    @property
    def ratio_summary(self) -> str:
        """The ratios of the expanded layers in words, e.g. ``'4'`` or ``'2 (3 layers), 4 (9)'``."""
        counts = collections.Counter(r.ratio for r in self.layers)
        if len(counts) <= 1:
            return str(next(iter(counts), self.settings.max_ratio))
        return ', '.join(f'{ratio} ({n} layer{"s" * (n != 1)})'
                         for ratio, n in sorted(counts.items()))

    @property
    def mode(self) -> str:
        """Training mode of the expanded layers."""
        return self.settings.mode

    @property
    def compact_params(self) -> int:
        """Parameters of the expanded layers in their compact form."""
        return sum(r.compact_params for r in self.layers)

    @property
    def expanded_params(self) -> int:
        """Parameters of the expanded layers in their expanded form."""
        return sum(r.expanded_params for r in self.layers)

    @property
    def param_ratio(self) -> float:
        """Whole-model parameter count after / before expansion."""
        return self.model_params_after / max(self.model_params_before, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (used in logs and benchmark files)."""
        memory = self.predicted_memory
        return dict(
            num_expanded=len(self.layers),
            ratio=self.ratio if isinstance(self.ratio, int) else [list(r) for r in self.ratio],
            mode=self.mode,
            predicted_memory=None if memory is None else dict(
                memory.__dict__, total_bytes=memory.total_bytes),
            model_params_before=self.model_params_before,
            model_params_after=self.model_params_after,
            param_ratio=self.param_ratio,
            layers=[r.__dict__ for r in self.layers],
            skipped=[dict(path=p, reason=r) for p, r in self.skipped],
        )

    def __str__(self) -> str:
        rows = [('layer', 'shape', 'strategy', 'ratio', 'compact', 'expanded')]
        rows += [(r.path, r.shape, r.strategy, str(r.ratio), f'{r.compact_params:,}',
                  f'{r.expanded_params:,}') for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ['  '.join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, '-' * len(lines[0]))
        lines.append(
            f'{len(self.layers)} layer{"s" * (len(self.layers) != 1)} expanded (ratio '
            f'{self.ratio_summary}, {self.mode}): '
            f'{self.compact_params:,} -> {self.expanded_params:,} params in those layers; '
            f'model {self.model_params_before:,} -> {self.model_params_after:,} '
            f'({self.param_ratio:.2f}x)')
        if self.predicted_memory is not None:
            memory = self.predicted_memory
            lines.append(
                f'predicted training state: {format_bytes(memory.total_bytes)} (parameters and '
                f'buffers {format_bytes(memory.param_bytes)}, gradients '
                f'{format_bytes(memory.grad_bytes)}, optimizer state '
                f'{format_bytes(memory.optimizer_bytes)}); a training checkpoint '
                f'{format_bytes(memory.checkpoint_bytes)}')
        if self.skipped:
            reasons = collections.Counter(reason for _, reason in self.skipped)
            lines.append(f'{len(self.skipped)} candidate layer'
                         f'{"s" * (len(self.skipped) != 1)} left compact: '
                         + '; '.join(f'{n} x {reason}' for reason, n in reasons.most_common(4))
                         + ('; ...' if len(reasons) > 4 else '')
                         + ' (each one in expansion_report.skipped)')
        return '\n'.join(lines)


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) in ``module``."""
    return sum(p.numel() for p in module.parameters())


def path_matches(path: str, patterns: Sequence[str]) -> str | None:
    """The first pattern matching ``path`` or one of its ancestors, else None."""
    parts = path.split('.')
    prefixes = ['.'.join(parts[:i]) for i in range(len(parts), 0, -1)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return pattern
    return None


def _is_plain_conv(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``nn.Conv2d.forward``.

    Subclasses that override ``forward`` (e.g. mmcv's adaptive-padding conv) do
    something the chain would not reproduce, so they are refused. mmcv's
    ``Conv2d`` wrapper only adds empty-batch handling and is accepted.
    """
    if not isinstance(module, nn.Conv2d):
        return False
    if type(module)._conv_forward is not nn.Conv2d._conv_forward:  # e.g. weight standardisation
        return False
    forward = type(module).forward
    if forward is nn.Conv2d.forward:
        return True
    try:
        from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
    except ImportError:  # mmcv is optional for the surgery itself
        return False
    return forward is MMCVConv2d.forward


def _is_deform_offset_conv(model: nn.Module, path: str) -> bool:
    """Whether ``path`` is the ``conv_offset`` of an mmcv deformable conv."""
    parent_path, _, name = path.rpartition('.')
    if name != 'conv_offset':
        return False
    try:
        from mmcv.ops import DeformConv2d, ModulatedDeformConv2d
    except ImportError:  # mmcv without its ops has no deformable conv
        return False
    parent = model.get_submodule(parent_path) if parent_path else model
    return isinstance(parent, (DeformConv2d, ModulatedDeformConv2d))


def _attached_behaviour(module: nn.Module) -> str | None:
    """Why ``module`` does more than its class's forward, or None.

    Forward / backward hooks and parametrizations (``weight_norm``,
    ``spectral_norm``, old-style ones are pre-hooks) belong to the module
    object: an expanded layer in its place would silently drop them.
    """
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module):
        return ('has a parametrization (e.g. weight_norm / spectral_norm) that an expanded '
                'chain would drop')
    if module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or \
            getattr(module, '_backward_pre_hooks', None):
        return ('has hooks (forward / backward, or an old-style weight_norm / spectral_norm) '
                'that an expanded chain would drop')
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``nn.Linear.forward``."""
    if not isinstance(module, nn.Linear):
        return False
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return True
    try:
        from mmcv.cnn.bricks.wrappers import Linear as MMCVLinear
    except ImportError:
        return False
    return forward is MMCVLinear.forward


def _conv_shape(conv: nn.Conv2d) -> str:
    k = 'x'.join(map(str, conv.kernel_size))
    s = 'x'.join(map(str, conv.stride)) if len(set(conv.stride)) > 1 else str(conv.stride[0])
    return f'{conv.in_channels}->{conv.out_channels} k{k} s{s} g{conv.groups}'


def _conv_strategy(conv: nn.Conv2d, strategy: str) -> str | None:
    """The strategy to use for ``conv``, or None when CK is impossible for it."""
    kh, kw = conv.kernel_size
    ck_possible = kh % 2 == 1 and kw % 2 == 1 and max(kh, kw) >= 5
    if strategy == 'cl':
        return 'cl'
    if strategy == 'ck':
        return 'ck' if ck_possible else None
    return 'ck' if ck_possible else 'cl'


def _unmatched_pattern_error(kind: str, pattern: str, modules: dict[str, str],
                             skipped: dict[str, str]) -> ConfigError:
    paths = list(modules)
    skipped_hits = [f'{p} ({r})' for p, r in skipped.items()
                    if path_matches(p, [pattern])]
    other_hits = [f'{p} ({t})' for p, t in modules.items()
                  if p not in skipped and fnmatch.fnmatchcase(p, pattern)]
    # Suggestions come from the layers that can be expanded, not every module
    # (the nearest of those to a typo is often 'data_preprocessor').
    expandable = [p for p, t in modules.items() if p not in skipped and t in ('Conv2d', 'Linear')] \
        or paths
    near = difflib.get_close_matches(pattern.replace('*', ''), expandable, n=5, cutoff=0.5)
    if not near:
        near = [p for p in expandable if p.split('.')[0] == pattern.split('.')[0]][:5] \
            or sorted({p.split('.')[0] + '.*' for p in expandable})[:5]
    msg = f'{kind} pattern {pattern!r} matches no expandable layer.'
    if skipped_hits:
        msg += ' It matches only layers left compact: ' + ', '.join(skipped_hits[:5]) + '.'
    elif other_hits:
        msg += (' It matches modules that are not expandable: ' + ', '.join(other_hits[:5])
                + '. Expandable are plain nn.Conv2d (k x k with k > 1; 1x1 with '
                'expand_1x1=True) and nn.Linear (with expand_linear=True), or a module '
                'that contains them.')
    msg += ' Nearest module paths: ' + ', '.join(near)
    msg += " (patterns are fnmatch globs over module paths, e.g. 'backbone.*')"
    return ConfigError(msg)


def _refuse_uninitialised_lazy_modules(model: nn.Module) -> None:
    """Name the lazy modules whose shapes are still unknown (nothing can be expanded
    or counted before they have seen a batch)."""
    lazy = [path or type(model).__name__ for path, module in model.named_modules()
            if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False))]
    if lazy:
        raise ConfigError(
            f"expand_model: {', '.join(lazy[:8])}{' ...' if len(lazy) > 8 else ''} "
            'still have uninitialised lazy parameters (nn.LazyConv2d / nn.LazyLinear); '
            'run one forward pass with a dummy batch first, as torch requires before '
            'using them, then expand.')


_UNSUPPORTED_CONVS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)


def _conv_skip_reason(model: nn.Module, path: str, conv: nn.Conv2d,
                      settings: ExpansionSettings) -> str | None:
    """Why the conv at ``path`` stays compact, or None to expand it."""
    if _is_deform_offset_conv(model, path):
        return ('offset conv of a deformable conv (zero-initialised so that '
                'sampling starts on the grid; dcn_offset_lr_mult rules it)')
    if not _is_plain_conv(conv):
        return (f'{type(conv).__name__} overrides Conv2d.forward or '
                '_conv_forward; only plain nn.Conv2d can be contracted exactly')
    if conv.kernel_size == (1, 1) and not settings.expand_1x1:
        return '1x1 conv (pass expand_1x1=True to expand it)'
    return None


def _linear_skip_reason(linear: nn.Linear, settings: ExpansionSettings) -> str | None:
    """Why ``linear`` stays compact, or None to expand it."""
    if not settings.expand_linear:
        return 'linear layer (pass expand_linear=True to expand it)'
    if not _is_plain_linear(linear):
        return f'{type(linear).__name__} overrides Linear.forward'
    return None


def _skip_reason(model: nn.Module, path: str, module: nn.Module,
                 settings: ExpansionSettings) -> str | None:
    """Why the conv / linear ``module`` at ``path`` stays compact, or None to expand it."""
    if isinstance(module, _UNSUPPORTED_CONVS):
        return f'{type(module).__name__} is not supported (Conv2d and Linear are)'
    attached = _attached_behaviour(module)
    if attached:
        return f'{type(module).__name__} {attached}'
    if isinstance(module, nn.Conv2d):
        return _conv_skip_reason(model, path, module, settings)
    return _linear_skip_reason(module, settings)


@dataclass
class _Survey:
    """A model's modules as :func:`expand_model` sees them.

    Attributes:
        module_types: Class name of every module, by path.
        candidates: ``(path, module)`` of the layers that can be expanded.
        skipped: Why each other conv / linear layer stays compact, by path.
    """

    module_types: dict[str, str] = field(default_factory=dict)
    candidates: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _survey(model: nn.Module, settings: ExpansionSettings) -> _Survey:
    """Classify every conv / linear layer of ``model``: a candidate, or left compact and why."""
    survey = _Survey()
    inside_expanded: list[str] = []
    for path, module in model.named_modules():
        if not path:
            continue
        survey.module_types[path] = type(module).__name__
        if any(path.startswith(p + '.') for p in inside_expanded):
            continue
        if isinstance(module, ExpandedLayer):
            inside_expanded.append(path)
            survey.skipped[path] = 'already expanded'
        elif isinstance(module, (nn.Conv2d, nn.Linear) + _UNSUPPORTED_CONVS):
            reason = _skip_reason(model, path, module, settings)
            if reason:
                survey.skipped[path] = reason
            else:
                survey.candidates.append((path, module))
        elif isinstance(module, nn.MultiheadAttention):
            survey.skipped.update(_raw_attention_projections(path, module))
    return survey


def _raw_attention_projections(path: str, attention: nn.MultiheadAttention) -> dict[str, str]:
    """The q/k/v input projections of ``attention``, each with why it stays compact.

    They are raw parameters (``in_proj_weight``, or ``q_proj_weight``... when
    the embedding sizes differ), read directly by
    ``F.multi_head_attention_forward`` and by its fused inference path, so
    there is no ``nn.Linear`` to replace; the ``out_proj`` is one and is
    expanded like any linear layer.
    """
    names = (['in_proj_weight'] if attention._qkv_same_embed_dim
             else ['q_proj_weight', 'k_proj_weight', 'v_proj_weight'])
    reason = ('q/k/v input projection of nn.MultiheadAttention (a raw parameter that '
              'F.multi_head_attention_forward reads, not an nn.Linear)')
    return {f'{path}.{name}': reason for name in names}


def _refuse_unmatched_patterns(survey: _Survey, settings: ExpansionSettings) -> None:
    """Refuse an include / exclude pattern that matches no candidate (a typo, usually)."""
    for kind, patterns in (('include', settings.include or ()), ('exclude', settings.exclude),
                           ('ratio', settings.ratio_patterns)):
        for pattern in patterns:
            if not any(path_matches(p, [pattern]) for p, _ in survey.candidates):
                raise _unmatched_pattern_error(kind, pattern, survey.module_types,
                                               survey.skipped)


def _refuse_impossible_strategy(selected: list[tuple[str, nn.Module]],
                                settings: ExpansionSettings) -> None:
    impossible = [p for p, m in selected
                  if isinstance(m, nn.Conv2d) and _conv_strategy(m, settings.strategy) is None]
    if impossible:
        raise ConfigError(
            f"strategy='ck' needs odd kernels >= 5, but these selected layers are not: "
            f"{', '.join(impossible[:8])}{' ...' if len(impossible) > 8 else ''}. "
            "Use strategy='auto' (CK where possible, CL elsewhere) or restrict `include`.")


def _empty_selection_error(survey: _Survey, settings: ExpansionSettings) -> ConfigError:
    exclude = settings.exclude
    cancelled = [p for p in (settings.include or []) if any(
        path_matches(c, [p]) and path_matches(c, exclude) for c, _ in survey.candidates)]
    return ConfigError(
        'expand_model selected no layer to expand'
        + (f': exclude={list(exclude)} removes every layer that include pattern(s) '
           f'{cancelled} select' if cancelled else '')
        + '; candidates left compact: '
        # Those the patterns left out first: the likeliest to be the ones meant.
        + ', '.join(f'{p} ({r})' for p, r in sorted(
            survey.skipped.items(),
            key=lambda item: item[1] != 'not selected by include/exclude')[:8]))


def _select(survey: _Survey, settings: ExpansionSettings) -> list[tuple[str, nn.Module]]:
    """The candidates that include / exclude select at a ratio above 1; the others join
    ``survey.skipped``.

    Raises:
        ConfigError: For a pattern that matches no candidate, a selected layer
            the strategy cannot expand, or an empty selection.
    """
    _refuse_unmatched_patterns(survey, settings)
    selected = []
    for path, module in survey.candidates:
        if not settings.selects(path):
            survey.skipped[path] = 'not selected by include/exclude'
        elif not isinstance(settings.ratio, int) and settings.ratio_for(path) == 1:
            # Only per-layer rules read 1 as "leave compact"; ratio=1 for every
            # layer is an expansion at the compact width (a chain of three).
            survey.skipped[path] = 'ratio 1 (per-layer ratios leave it compact)'
        else:
            selected.append((path, module))
    _refuse_impossible_strategy(selected, settings)
    if not selected:
        raise _empty_selection_error(survey, settings)
    return selected


def _expanded_twin(path: str, module: nn.Module,
                   settings: ExpansionSettings) -> tuple[ExpandedLayer, ExpandedLayerRecord]:
    """The expanded layer that replaces the compact ``module`` at ``path``, and its record."""
    ratio = settings.ratio_for(path)
    if isinstance(module, nn.Conv2d):
        strategy = _conv_strategy(module, settings.strategy)
        new: ExpandedLayer = ExpandConv2d.from_conv(
            module, strategy=strategy, ratio=ratio, mode=settings.mode,
            keep_weights=settings.keep_weights, name=path)
        record = ExpandedLayerRecord(path, 'Conv2d', _conv_shape(module), strategy,
                                     count_params(module), count_params(new))
    else:
        new = ExpandLinear.from_linear(module, ratio=ratio, mode=settings.mode,
                                       keep_weights=settings.keep_weights, name=path)
        record = ExpandedLayerRecord(path, 'Linear',
                                     f'{module.in_features}->{module.out_features}', 'fc',
                                     count_params(module), count_params(new))
    if not any(p.requires_grad for p in module.parameters()):
        new.requires_grad_(False)  # a frozen layer stays frozen as its factors
    return new, record


def select_layers(model: nn.Module, settings: ExpansionSettings
                  ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers :func:`expand_model` would expand with ``settings``, and why the others stay
    compact (by path); nothing is changed.

    Raises:
        ConfigError: As :func:`expand_model` does for the patterns, the strategy
            or an empty selection.
    """
    _refuse_uninitialised_lazy_modules(model)
    survey = _survey(model, settings)
    selected = _select(survey, settings)
    return selected, survey.skipped


def layer_strategy(module: nn.Module, settings: ExpansionSettings) -> str:
    """The chain a selected layer gets: ``'cl'`` / ``'ck'`` for a conv, ``'fc'`` for a linear."""
    return _conv_strategy(module, settings.strategy) if isinstance(module, nn.Conv2d) else 'fc'


def selected_layer_cost(module: nn.Module, settings: ExpansionSettings,
                        ratio: int) -> LayerExpansionCost | None:
    """:func:`~expand_mm.cost.layer_expansion_cost` of a selected layer, or None for a kind of
    layer that has no closed form (it is then predicted at its compact size)."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return None
    return layer_expansion_cost(module, layer_strategy(module, settings), ratio)


def predict_training_memory(model: nn.Module, selected: list[tuple[str, nn.Module]],
                            ratios: Callable[[str], int],
                            settings: ExpansionSettings,
                            optimizer_slots: int = 1) -> TrainingMemory:
    """The training state of ``model`` once ``selected`` are expanded, before building any.

    Args:
        model: The compact model.
        selected: ``(path, module)`` of the layers to expand (:func:`select_layers`).
        ratios: The ratio of each selected path.
        settings: The expansion settings (strategy per layer).
        optimizer_slots: Optimizer state tensors per trainable parameter (1: SGD
            with momentum, 2: Adam / AdamW).
    """
    params = trainable = 0
    for param in model.parameters():
        params += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for path, module in selected:
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue  # no closed form: predicted at its compact size
        added = expanded_params(module, layer_strategy(module, settings), ratios(path)) \
            - count_params(module)
        params += added
        trainable += added if any(p.requires_grad for p in module.parameters()) else 0
    buffers = sum(b.numel() for b in model.buffers())
    return training_memory(params, trainable, buffers, optimizer_slots)


def _memory_cap(model: nn.Module, settings: ExpansionSettings) -> tuple[int | None, str]:
    """Bytes the predicted training state may take, and where that figure comes from."""
    if settings.max_train_memory is not None:
        return int(settings.max_train_memory * GIB), 'max_train_memory'
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    return available_memory_bytes(device), f'memory available on {device}'


def _refuse_beyond_memory(model: nn.Module, selected: list[tuple[str, nn.Module]],
                          settings: ExpansionSettings, predicted: TrainingMemory,
                          optimizer_slots: int) -> None:
    """Refuse, before any layer is built, an expansion whose training state would not fit,
    naming the largest uniform ratio that would."""
    cap, source = _memory_cap(model, settings)
    if cap is None or predicted.total_bytes <= cap:
        return
    fits = None
    for ratio in range(settings.max_ratio - 1, 1, -1):
        smaller = predict_training_memory(
            model, selected, lambda path, r=ratio: min(r, settings.ratio_for(path)), settings,
            optimizer_slots)
        if smaller.total_bytes <= cap:
            fits = (ratio, smaller)
            break
    raise ConfigError(
        f'expand_model: the expanded model would need about {format_bytes(predicted.total_bytes)} '
        f'to train ({predicted.params:,} parameters, their gradients and optimizer state; '
        f'activations come on top), more than the {format_bytes(cap)} of {source}; '
        + (f'ratio={fits[0]} would fit (about {format_bytes(fits[1].total_bytes)})'
           if fits else 'no ratio >= 2 fits: expand fewer layers (exclude=[...])')
        + ', or raise max_train_memory (GiB).')


def _module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every path of each submodule, by ``id`` (a shared module has several)."""
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            aliases.setdefault(id(module), []).append(path)
    return aliases


def _settings_of_call(settings: ExpansionSettings | None, **options: Any) -> ExpansionSettings:
    """``settings``, or the settings that :func:`expand_model`'s keywords describe."""
    keyword_settings = ExpansionSettings(**options)
    if settings is None:
        return keyword_settings
    if not isinstance(settings, ExpansionSettings):
        raise ConfigError(f'expand_model: settings={settings!r} must be an ExpansionSettings')
    if keyword_settings != ExpansionSettings():
        raise ConfigError('expand_model: give the options either as settings=ExpansionSettings'
                          '(...) or as keywords, not both (the keywords would be ignored)')
    return settings


def expand_model(model: nn.Module,
                 strategy: str = 'cl',
                 ratio: int | Mapping[str, int] | Sequence[tuple[str, int]] = 4,
                 mode: str = 'online',
                 include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None,
                 expand_1x1: bool = False,
                 expand_linear: bool = False,
                 keep_weights: bool = False,
                 max_train_memory: float | None = None,
                 *,
                 settings: ExpansionSettings | None = None,
                 optimizer_slots: int = 1) -> ExpansionReport:
    """Replace the selected conv / linear layers of ``model`` by expanded chains.

    Works in place, so call it before the optimizer collects parameters. The
    options are those of :class:`ExpansionSettings`: give them as keywords or
    as one ``settings`` object, not both. Before any layer is built, the training
    state (parameters, gradients, optimizer state) is predicted and checked
    against ``max_train_memory`` or the memory available.

    Args:
        model: Any module (an mmdet detector, an mmseg segmentor, a plain net).
        strategy: ``'cl'`` (k×k → 1×1, k×k, 1×1), ``'ck'`` (odd k ≥ 5 → chain of
            3×3; a selected layer where CK is impossible is an error) or
            ``'auto'`` (CK where possible, CL otherwise).
        ratio: Expansion ratio r ≥ 1 (integer), or per-layer ratios: a list of
            ``(pattern, ratio)`` pairs (first match wins) or a mapping (most
            specific pattern wins); see :class:`ExpansionSettings`.
        mode: ``'online'`` (compose the kernel in ``forward``) or ``'explicit'``
            (run the chain on activations).
        include: Glob patterns over module paths (a string is one pattern); a
            layer is selected when its path or an ancestor's path matches one.
            ``None`` selects all.
        exclude: Glob patterns of layers to leave compact (applied after include).
        expand_1x1: Also expand 1×1 convs (the paper leaves them compact).
        expand_linear: Also expand ``nn.Linear`` layers (FC expansion).
        keep_weights: Choose factors so every expanded layer computes exactly what
            its compact layer did (for pretrained compact weights).
        max_train_memory: Cap in GiB on the predicted training state (default:
            the memory available on the model's device).
        settings: All of the above in one object, instead of the keywords.
        optimizer_slots: Optimizer state tensors per trainable parameter in the
            memory prediction (1: SGD with momentum, 2: Adam / AdamW).

    Per-layer ratios planned against a training budget:
    :func:`expand_mm.budget.expand_within_budget`.

    Returns:
        An :class:`ExpansionReport` listing every expanded layer.

    Raises:
        ConfigError: For an unknown strategy / mode, a bad ratio, a pattern that
            matches no expandable layer (naming the nearest module paths), a
            layer that cannot take the requested strategy, ``settings``
            given together with keywords, or a predicted training state beyond
            the memory cap (naming the largest ratio that fits).
    """
    settings = _settings_of_call(
        settings, strategy=strategy, ratio=ratio, mode=mode, include=include,
        exclude=exclude, expand_1x1=expand_1x1, expand_linear=expand_linear,
        keep_weights=keep_weights, max_train_memory=max_train_memory)
    selected, skipped = select_layers(model, settings)
    predicted = predict_training_memory(model, selected, settings.ratio_for, settings,
                                        optimizer_slots)
    _refuse_beyond_memory(model, selected, settings, predicted, optimizer_slots)
    report = ExpansionReport(model_params_before=count_params(model), settings=settings,
                             predicted_memory=predicted)
    aliases = _module_aliases(model)
    for path, module in selected:
        new, record = _expanded_twin(path, module, settings)
        # A module shared by several paths stays shared: every path gets the new layer.
        for alias in aliases.get(id(module), [path]):
            replace_submodule(model, alias, new)
        report.layers.append(dataclasses.replace(record, ratio=settings.ratio_for(path)))
    report.skipped = sorted(skipped.items())
    report.model_params_after = count_params(model)
    return report


def set_expand_mode(model: nn.Module, mode: str) -> int:
    """Switch every expanded layer of ``model`` to ``mode``.

    Args:
        model: Any module.
        mode: ``'online'`` or ``'explicit'``.

    Returns:
        How many expanded layers were switched.

    Raises:
        ConfigError: For an unknown mode.
    """
    if mode not in MODES:
        raise ConfigError(f'mode={mode!r} is not one of {MODES}')
    layers = expanded_layers(model)
    for _, layer in layers:
        layer.set_mode(mode)
    return len(layers)


def contract_model(model: nn.Module,
                   verify_inputs: Any = None,
                   forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                   rtol: float = 1e-4) -> nn.Module:
    """A compact deep copy of ``model`` with every expanded layer contracted.

    The input model is not modified. The copy's ``state_dict`` has exactly the
    keys and shapes the model had before :func:`expand_model`.

    Args:
        model: A model that went through :func:`expand_model` (or any module).
        verify_inputs: If given, both models are run on it in eval mode and a
            relative error above ``rtol`` raises (see
            :func:`~expand_mm.verification.check_contraction`).
        forward_fn: How to call a model on ``verify_inputs``.
        rtol: Tolerance of the self-check, relative to ``max|y|``.

    Returns:
        The compact model.

    Raises:
        ContractionCheckError: If the self-check finds a mismatch above ``rtol``
            or a NaN / Inf (see :func:`~expand_mm.verification.check_contraction`).
    """
    compact = compact_copy(model)
    if verify_inputs is not None:
        check_contraction(model, compact, verify_inputs, forward_fn, rtol)
    return compact
