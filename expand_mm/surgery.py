"""Model surgery: expand the selected layers of any ``nn.Module`` and contract back.

This module knows nothing of mmdet or mmseg. It walks ``named_modules()``,
selects layers by glob patterns over their module paths, and swaps each one for
its :class:`~expand_mm.layers.ExpandConv2d` / :class:`~expand_mm.layers.ExpandLinear`
(in place, so the optimizer built afterwards sees the factors). Contraction is the
reverse on a deep copy, so the training model is never touched.

mmcv ``ConvModule``s hold their convolution as ``.conv``; replacing exactly that
child keeps the norm and the activation where they were, and keeps every
state-dict key outside the conv unchanged.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ExpandMMError
from .layers import ExpandConv2d, ExpandedLayer, ExpandLinear
from .layers.base import deferral_unsupported_reason, discard_deferred_factor_grads

STRATEGIES = ('cl', 'ck', 'auto')
MODES = ('online', 'explicit')


class ContractionCheckError(ExpandMMError, RuntimeError):
    """The contracted model does not compute what the expanded one does (beyond rounding)."""


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
    """

    path: str
    layer_type: str
    shape: str
    strategy: str
    compact_params: int
    expanded_params: int


@dataclass
class ExpansionReport:
    """What :func:`expand_model` did: every expanded layer and the totals.

    Attributes:
        layers: One record per expanded layer, in module order.
        skipped: ``(path, reason)`` for candidate layers that were left compact.
        model_params_before: Parameters of the whole model before expansion.
        model_params_after: Parameters of the whole model after expansion.
        ratio: Expansion ratio used.
        mode: Training mode of the expanded layers.
    """

    layers: list[ExpandedLayerRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    ratio: int = 4
    mode: str = 'online'

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
        return dict(
            num_expanded=len(self.layers),
            ratio=self.ratio,
            mode=self.mode,
            model_params_before=self.model_params_before,
            model_params_after=self.model_params_after,
            param_ratio=self.param_ratio,
            layers=[r.__dict__ for r in self.layers],
            skipped=[dict(path=p, reason=r) for p, r in self.skipped],
        )

    def __str__(self) -> str:
        rows = [('layer', 'shape', 'strategy', 'compact', 'expanded')]
        rows += [(r.path, r.shape, r.strategy, f'{r.compact_params:,}',
                  f'{r.expanded_params:,}') for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ['  '.join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, '-' * len(lines[0]))
        lines.append(
            f'{len(self.layers)} layer{"s" * (len(self.layers) != 1)} expanded (ratio '
            f'{self.ratio}, {self.mode}): '
            f'{self.compact_params:,} -> {self.expanded_params:,} params in those layers; '
            f'model {self.model_params_before:,} -> {self.model_params_after:,} '
            f'({self.param_ratio:.2f}x)')
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


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``path`` of ``root`` (e.g. ``'backbone.conv1.conv'``)."""
    parent_path, _, name = path.rpartition('.')
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _check_settings(strategy: str, ratio: Any, mode: str) -> None:
    if isinstance(strategy, str) and strategy.lower() in STRATEGIES and strategy not in STRATEGIES:
        raise ValueError(f'expand_model: strategy={strategy!r}: the names are lower-case, '
                         f'use {strategy.lower()!r}')
    if strategy not in STRATEGIES:
        raise ValueError(f"expand_model: strategy={strategy!r} is not one of {STRATEGIES} "
                         "('auto' = CK for odd kernels >= 5, CL otherwise)")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f'expand_model: ratio={ratio!r} must be an integer >= 1 '
                         '(the paper uses 4)')
    if mode not in MODES:
        raise ValueError(f'expand_model: mode={mode!r} is not one of {MODES}')


def _unmatched_pattern_error(kind: str, pattern: str, modules: dict[str, str],
                             skipped: dict[str, str]) -> ValueError:
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
    return ValueError(msg)


def _refuse_uninitialised_lazy_modules(model: nn.Module) -> None:
    """Name the lazy modules whose shapes are still unknown (nothing can be expanded
    or counted before they have seen a batch)."""
    lazy = [path or type(model).__name__ for path, module in model.named_modules()
            if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False))]
    if lazy:
        raise ValueError(
            f"expand_model: {', '.join(lazy[:8])}{' ...' if len(lazy) > 8 else ''} "
            'still have uninitialised lazy parameters (nn.LazyConv2d / nn.LazyLinear); '
            'run one forward pass with a dummy batch first, as torch requires before '
            'using them, then expand.')


def expand_model(model: nn.Module,
                 strategy: str = 'cl',
                 ratio: int = 4,
                 mode: str = 'online',
                 include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None,
                 expand_1x1: bool = False,
                 expand_linear: bool = False,
                 keep_weights: bool = False) -> ExpansionReport:
    """Replace the selected conv / linear layers of ``model`` by expanded chains.

    Works in place, so call it before the optimizer collects parameters.

    Args:
        model: Any module (an mmdet detector, an mmseg segmentor, a plain net).
        strategy: ``'cl'`` (k×k → 1×1, k×k, 1×1), ``'ck'`` (odd k ≥ 5 → chain of
            3×3; a selected layer where CK is impossible is an error) or
            ``'auto'`` (CK where possible, CL otherwise).
        ratio: Expansion ratio r ≥ 1 (integer).
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

    Returns:
        An :class:`ExpansionReport` listing every expanded layer.

    Raises:
        ValueError: For an unknown strategy / mode, a bad ratio, a pattern that
            matches no expandable layer (naming the nearest module paths), or a
            layer that cannot take the requested strategy.
    """
    _check_settings(strategy, ratio, mode)
    # One pattern given as a string (as `--cfg-options model.include=backbone.*`
    # passes it) is that pattern, not its characters.
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    _refuse_uninitialised_lazy_modules(model)
    report = ExpansionReport(model_params_before=count_params(model), ratio=ratio, mode=mode)

    all_modules: dict[str, str] = {}
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            aliases.setdefault(id(module), []).append(path)
    candidates: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    inside_expanded: list[str] = []
    for path, module in model.named_modules():
        if not path:
            continue
        all_modules[path] = type(module).__name__
        if any(path.startswith(p + '.') for p in inside_expanded):
            continue
        if isinstance(module, ExpandedLayer):
            inside_expanded.append(path)
            skipped[path] = 'already expanded'
            continue
        attached = (_attached_behaviour(module)
                    if isinstance(module, (nn.Conv2d, nn.Linear)) else None)
        if attached:
            skipped[path] = f'{type(module).__name__} {attached}'
        elif isinstance(module, nn.Conv2d) and _is_deform_offset_conv(model, path):
            skipped[path] = ('offset conv of a deformable conv (zero-initialised so that '
                             'sampling starts on the grid; dcn_offset_lr_mult rules it)')
        elif isinstance(module, nn.Conv2d):
            if not _is_plain_conv(module):
                skipped[path] = (f'{type(module).__name__} overrides Conv2d.forward or '
                                 '_conv_forward; only plain nn.Conv2d can be contracted exactly')
            elif module.kernel_size == (1, 1) and not expand_1x1:
                skipped[path] = '1x1 conv (pass expand_1x1=True to expand it)'
            else:
                candidates.append((path, module))
        elif isinstance(module, nn.Linear):
            if not expand_linear:
                skipped[path] = 'linear layer (pass expand_linear=True to expand it)'
            elif not _is_plain_linear(module):
                skipped[path] = f'{type(module).__name__} overrides Linear.forward'
            else:
                candidates.append((path, module))
        elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            skipped[path] = f'{type(module).__name__} is not supported (Conv2d and Linear are)'

    for kind, patterns in (('include', include or []), ('exclude', exclude)):
        for pattern in patterns:
            if not any(path_matches(p, [pattern]) for p, _ in candidates):
                raise _unmatched_pattern_error(kind, pattern, all_modules, skipped)

    selected = [(p, m) for p, m in candidates
                if (include is None or path_matches(p, include)) and not path_matches(p, exclude)]
    selected_paths = {p for p, _ in selected}
    for path, _ in candidates:
        if path not in selected_paths:
            skipped[path] = 'not selected by include/exclude'

    impossible = [p for p, m in selected
                  if isinstance(m, nn.Conv2d) and _conv_strategy(m, strategy) is None]
    if impossible:
        raise ValueError(
            f"strategy='ck' needs odd kernels >= 5, but these selected layers are not: "
            f"{', '.join(impossible[:8])}{' ...' if len(impossible) > 8 else ''}. "
            "Use strategy='auto' (CK where possible, CL elsewhere) or restrict `include`.")
    if not selected:
        cancelled = [p for p in (include or []) if any(
            path_matches(c, [p]) and path_matches(c, exclude) for c, _ in candidates)]
        raise ValueError(
            'expand_model selected no layer to expand'
            + (f': exclude={list(exclude)} removes every layer that include pattern(s) '
               f'{cancelled} select' if cancelled else '')
            + '; candidates left compact: '
            # Those the patterns left out first: the likeliest to be the ones meant.
            + ', '.join(f'{p} ({r})' for p, r in sorted(
                skipped.items(),
                key=lambda item: item[1] != 'not selected by include/exclude')[:8]))

    for path, module in selected:
        if isinstance(module, nn.Conv2d):
            layer_strategy = _conv_strategy(module, strategy)
            new = ExpandConv2d.from_conv(module, strategy=layer_strategy, ratio=ratio,
                                         mode=mode, keep_weights=keep_weights, name=path)
            record = ExpandedLayerRecord(path, 'Conv2d', _conv_shape(module), layer_strategy,
                                         count_params(module), count_params(new))
        else:
            new = ExpandLinear.from_linear(module, ratio=ratio, mode=mode,
                                           keep_weights=keep_weights, name=path)
            record = ExpandedLayerRecord(path, 'Linear',
                                         f'{module.in_features}->{module.out_features}', 'fc',
                                         count_params(module), count_params(new))
        if not any(p.requires_grad for p in module.parameters()):
            new.requires_grad_(False)  # a frozen layer stays frozen as its factors
        # A module shared by several paths stays shared: every path gets the new layer.
        for alias in aliases.get(id(module), [path]):
            replace_submodule(model, alias, new)
        report.layers.append(record)

    report.skipped = sorted(skipped.items())
    report.model_params_after = count_params(model)
    return report


def expanded_layers(model: nn.Module) -> list[tuple[str, ExpandedLayer]]:
    """``(path, layer)`` for every expanded layer in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ExpandedLayer)]


@contextlib.contextmanager
def deferred_factor_grads(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the online expanded layers of ``model`` defer their factor gradients.

    Each online layer composes its weight once per step and its factors get their
    gradients at the end of the backward pass, once the activations are freed:
    the same gradients as plain autograd at a lower peak memory (see
    :class:`~expand_mm.layers.ExpandedLayer`). Meant for a block that ends in
    ``loss.backward()`` (an MMEngine ``train_step``); ``torch.autograd.grad``
    on the factors needs the plain mode. The previous settings come back on exit,
    and what a backward pass that raised inside the block left queued is dropped.

    On a torch build without the autograd hooks deferral needs (see
    :func:`~expand_mm.layers.base.deferral_unsupported_reason`) the block warns
    once and leaves the layers on plain autograd: the same gradients at the
    higher peak memory.

    Yields:
        The number of expanded layers switched.
    """
    layers = [layer for _, layer in expanded_layers(model)]
    if enabled and layers:
        reason = deferral_unsupported_reason()
        if reason is not None:
            warnings.warn(f'deferred factor gradients are off: {reason}; the expanded '
                          f'layers train with plain autograd (same gradients, higher '
                          f'peak memory). Set defer_factor_grads=False in the ExpandNet '
                          f'model config to silence this.', RuntimeWarning, stacklevel=3)
            enabled = False
    before = [layer.defer_factor_grads for layer in layers]
    for layer in layers:
        layer.defer_factor_grads = enabled
    try:
        yield len(layers)
    finally:
        for layer, value in zip(layers, before):
            layer.defer_factor_grads = value
        # A backward pass that raised inside the block left its compositions
        # queued; nothing will flush them.
        discard_deferred_factor_grads(layers)


def set_expand_mode(model: nn.Module, mode: str) -> int:
    """Switch every expanded layer of ``model`` to ``mode``; returns how many."""
    if mode not in MODES:
        raise ValueError(f'mode={mode!r} is not one of {MODES}')
    layers = expanded_layers(model)
    for _, layer in layers:
        layer.set_mode(mode)
    return len(layers)


def contract_model_(model: nn.Module) -> nn.Module:
    """Contract every expanded layer of ``model`` in place and return it.

    Prefer :func:`contract_model`, which leaves its input untouched; this form
    exists for callers that already own a copy (e.g. a checkpoint writer).
    """
    compact: dict[int, nn.Module] = {}  # a layer shared by several paths stays shared
    for path, layer in list(model.named_modules(remove_duplicate=False)):
        if isinstance(layer, ExpandedLayer):
            if id(layer) not in compact:
                compact[id(layer)] = layer.contract()
            replace_submodule(model, path, compact[id(layer)])
    return model


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
            relative error above ``rtol`` raises (see :func:`verify_contraction`).
        forward_fn: How to call a model on ``verify_inputs``.
        rtol: Tolerance of the self-check, relative to ``max|y|``.

    Returns:
        The compact model.

    Raises:
        RuntimeError: If the self-check finds a mismatch above ``rtol``.
    """
    compact = contract_model_(copy.deepcopy(model))
    if verify_inputs is not None:
        check_contraction(model, compact, verify_inputs, forward_fn, rtol)
    return compact


def check_contraction(expanded: nn.Module, compact: nn.Module, inputs: Any,
                      forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                      rtol: float = 1e-4) -> dict[str, Any]:
    """:func:`verify_contraction`, raising only for a contraction that is wrong.

    The two models are compared as they are (float32, the expanded one
    composing its kernels online). A network can amplify float32 rounding far
    beyond ``rtol`` (eval-mode BatchNorm whose running statistics lag the
    weights, early in training, can take 1e-7 to 1e-2), so a float32 error
    above ``rtol`` is checked again in float64 on CPU copies: the expanded copy
    runs as it was trained and with its chains explicit -- the paper's form,
    independent of the composition code -- each against its float64
    contraction, and ``compact``'s tensors are compared with that
    contraction's, each relative to its largest entry (within ``rtol``, or
    8 eps of their dtype if that is larger). Only an error there raises;
    otherwise the float32 figure is put down to rounding, which every float32
    copy of that network shares.

    A probe can also be too weak to tell: through an untrained network whose
    batch norms still hold their initial statistics the signal can fade until
    the outputs are the heads' constant biases, whatever the kernels. When the
    compact outputs change by less than :data:`WEAK_PROBE_SENSITIVITY` (of
    their size) between ``inputs`` and another random input, every expanded
    layer is checked on its own instead (:func:`check_layer_contractions`).

    Returns:
        :func:`verify_contraction`'s dict, with ``input_sensitivity`` (how much
        the outputs depend on the input) and, for a weak probe,
        ``layers_max_rel``; after a float64 re-check also ``float64_max_rel``
        (outputs), ``float64_weights_max_rel`` and the tensor it was found in,
        ``float64_worst_tensor``.

    Raises:
        RuntimeError: If the float64 check (or the float32 one, when float64
            cannot run) finds a relative error above ``rtol``.
    """
    errors = verify_contraction(expanded, compact, inputs, forward_fn)
    if errors['max_rel'] <= rtol:
        sensitivity = _input_sensitivity(compact, inputs, forward_fn)
        if sensitivity is not None:
            errors['input_sensitivity'] = sensitivity
            if sensitivity < WEAK_PROBE_SENSITIVITY:
                errors['layers_max_rel'] = check_layer_contractions(expanded, compact, rtol)
        return errors
    failed = (f'contraction check failed: max relative error {errors["max_rel"]:.3g} > '
              f'{rtol:g} (max abs {errors["max_abs"]:.3g})')
    try:
        exact = _verify_in_float64(expanded, compact, inputs, forward_fn)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise RuntimeError(f'{failed}, and the float64 re-check that tells float32 rounding '
                           f'from a wrong contraction could not run ({type(err).__name__}: '
                           f'{err}); the compact model may not compute what the expanded '
                           'one does') from err
    errors.update(exact)
    # The written tensors carry their dtype's rounding whatever rtol says.
    weights_rtol = max(rtol, 8 * _eps_of(compact))
    if not (exact['float64_max_rel'] <= rtol and exact['float64_weights_max_rel'] <= weights_rtol):
        raise ContractionCheckError(
            f'{failed}; in float64 the expanded model (as trained, and with explicit chains) '
            f'and its contraction differ by '
            f'{exact["float64_max_rel"]:.3g} and the compact tensors differ from that '
            f'contraction by up to {exact["float64_weights_max_rel"]:.3g} '
            f'({exact["float64_worst_tensor"]}): the compact model would not compute what the '
            'expanded one does')
    return errors


# Below this change of the outputs (relative) between two random probes, a probe
# says too little about the kernels and each layer is checked on its own.
WEAK_PROBE_SENSITIVITY = 1e-3


def _input_sensitivity(model: nn.Module, inputs: Any,
                       forward_fn: Callable[[nn.Module, Any], Any] | None) -> float | None:
    """max |y(x') - y(x)| / max |y(x)| for another random ``x'`` of ``inputs``' shapes
    (None when ``inputs`` has no floating-point tensor to vary)."""
    gen = torch.Generator().manual_seed(1)
    varied = False

    def other(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal varied
        if not tensor.is_floating_point():
            return tensor
        varied = True
        return torch.randn(tensor.shape, generator=gen).to(tensor) * tensor.std().clamp_min(1)

    second = _map_tensors(inputs, other)
    if not varied:
        return None
    forward_fn = forward_fn or _default_forward
    flag = model.training
    try:
        model.eval()
        with torch.no_grad():
            first = _flatten_tensors(forward_fn(model, inputs))
            again = _flatten_tensors(forward_fn(model, second))
    finally:
        model.train(flag)
    scale = max((float(t.abs().max()) for t in first if t.numel()), default=0.0)
    change = max((float((a - b).abs().max()) for a, b in zip(first, again) if a.numel()),
                 default=0.0)
    return change / scale if scale > 0 else 0.0


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def check_layer_contractions(expanded: nn.Module, compact: nn.Module,
                             rtol: float = 1e-4) -> float:
    """Check every expanded layer against its contracted counterpart, one by one.

    Each chain runs explicitly (the paper's form) in float64 on CPU on a
    random input, against the layer at the same path in ``compact`` (in
    float64 too); the relative error must be within ``rtol``. Independent of
    the network around the layers, so it holds where a whole-model probe
    cannot tell (see :func:`check_contraction`).

    Returns:
        The largest relative error over the layers (0 without expanded layers).

    Raises:
        RuntimeError: Naming the first layer whose error exceeds ``rtol``.
    """
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for path, layer in expanded_layers(expanded):
        chain = copy.deepcopy(layer).to(device='cpu', dtype=torch.float64)
        chain.set_mode('explicit').eval()
        target = copy.deepcopy(compact.get_submodule(path)).to(device='cpu',
                                                               dtype=torch.float64).eval()
        if isinstance(layer, ExpandConv2d):
            reach = max(d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size))
            side = reach + max(layer.stride) + 2
            x = torch.randn(1, layer.in_channels, side, side, generator=gen,
                            dtype=torch.float64)
        else:
            x = torch.randn(2, layer.in_features, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y_chain, y_compact = chain(x), target(x)
        error = float((y_chain - y_compact).abs().max()
                      / y_chain.abs().max().clamp_min(1e-30))
        if error > rtol:
            raise ContractionCheckError(
                f'contraction check failed at {path}: the contracted layer and its chain '
                f'(float64, explicit) differ by {error:.3g} (relative) > {rtol:g}')
        worst = max(worst, error)
    return worst


def _eps_of(model: nn.Module) -> float:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps)


def _verify_in_float64(expanded: nn.Module, compact: nn.Module, inputs: Any,
                       forward_fn: Callable[[nn.Module, Any], Any] | None) -> dict[str, Any]:
    """The float64 re-check of :func:`check_contraction`, on CPU copies.

    The expanded copy runs in its own modes (what was trained) and with its
    chains explicit (independent of the composition code), each against the
    float64 contraction; ``compact``'s tensors are compared with that
    contraction's. On CPU, so that a re-check during training takes no
    accelerator memory.
    """
    expanded64 = _cpu_float64_copy(expanded)
    compact64 = contract_model(expanded64)
    inputs64 = _to_cpu_float64(inputs)
    as_trained = verify_contraction(expanded64, compact64, inputs64, forward_fn)
    for _, layer in expanded_layers(expanded64):
        layer.set_mode('explicit')
    explicit = verify_contraction(expanded64, compact64, inputs64, forward_fn)
    worst_outputs = max(as_trained, explicit, key=lambda e: e['max_rel'])
    given, exact = compact.state_dict(), compact64.state_dict()
    if given.keys() != exact.keys():
        raise RuntimeError(f'the compact model has other state-dict keys than the contraction '
                           f'({sorted(given.keys() ^ exact.keys())[:5]})')
    worst, worst_key = 0.0, None
    for key, value in exact.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            diff = float((given[key].detach().cpu().double() - value).abs().max())
            rel = diff / max(float(value.abs().max()), 1e-12)
            if rel > worst or worst_key is None:
                worst, worst_key = rel, key
    return dict(float64_max_rel=worst_outputs['max_rel'],
                float64_max_abs=worst_outputs['max_abs'],
                float64_weights_max_rel=worst, float64_worst_tensor=worst_key)


def _cpu_float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its floating tensors in float64 on CPU.

    Each parameter and buffer is converted on its own, straight into the copy
    (``deepcopy``'s memo), so no float32 copy of the whole model is made on
    the model's device first: during training that memory is the activations'.
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        value = tensor.detach().to(
            device='cpu', copy=True,
            dtype=torch.float64 if tensor.is_floating_point() else tensor.dtype)
        memo[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else value)
    return copy.deepcopy(model, memo)


def _to_cpu_float64(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu()
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _to_cpu_float64(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_cpu_float64(v) for v in inputs)
    return inputs


def _flatten_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten_tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_tensors(o)]
    if hasattr(out, 'to_dict'):  # mmengine data elements
        return _flatten_tensors(out.to_dict())
    return []


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def verify_contraction(expanded: nn.Module, compact: nn.Module, inputs: Any,
                       forward_fn: Callable[[nn.Module, Any], Any] | None = None
                       ) -> dict[str, float]:
    """Run both models in eval mode on ``inputs`` and compare every output tensor.

    Both models' train/eval flags are restored afterwards.

    Args:
        expanded: The model with expanded layers.
        compact: Its contraction.
        inputs: A tensor, a tuple of positional args or a dict of keyword args.
        forward_fn: ``forward_fn(model, inputs)`` when a plain call does not fit
            (e.g. mm models: ``lambda m, x: m(x, mode='tensor')``).

    Returns:
        ``{'max_abs': ..., 'max_rel': ..., 'max_ref': ...}`` where ``max_rel`` is
        ``max_abs`` divided by the largest magnitude of the compact outputs.

    Raises:
        ValueError: If the two models return different output structures.
    """
    forward_fn = forward_fn or _default_forward
    flags = [(m, m.training) for m in (expanded, compact)]
    try:
        expanded.eval()
        compact.eval()
        ys = _flatten_tensors(forward_fn(expanded, inputs))
        yc = _flatten_tensors(forward_fn(compact, inputs))
    finally:
        for m, flag in flags:
            m.train(flag)
    if len(ys) != len(yc) or any(a.shape != b.shape for a, b in zip(ys, yc)):
        raise ValueError('verify_contraction: the expanded and compact models return '
                         f'different outputs ({[tuple(t.shape) for t in ys]} vs '
                         f'{[tuple(t.shape) for t in yc]})')
    max_abs = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ys, yc)
                   if a.numel()), default=0.0)
    max_ref = max((float(b.double().abs().max()) for b in yc if b.numel()), default=0.0)
    return dict(max_abs=max_abs, max_rel=max_abs / max(max_ref, 1e-12), max_ref=max_ref)
