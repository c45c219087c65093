"""Channel planting: grow a compact network's channels step by step, old weights frozen.

Channel planting (Mitsuno, Nomura, Kurita, ICPR 2020) trains a network that
starts narrow and gains channels in stages; each stage trains only the newly
planted channels (old parameters stay fixed), with knowledge distillation from a
larger teacher. Here the network being grown *is* the stock compact model of the
config: every selected unit (an mmcv ``ConvModule``: conv -> norm -> activation)
has its full width from the start, and the channels not planted yet are masked
to exactly zero at the unit's output. A plain chain with its trailing channels
zeroed computes what the narrower chain computes, so this is planting on the
narrow network -- and the trained model is always the stock architecture, whose
checkpoint loads into the stock config at every stage (no re-built layers, no
custom checkpoint format, and resuming needs nothing but the iteration).

At a stage change (:meth:`ChannelPlanter.advance`):

1. Every conv that reads a newly planted channel gets that input column set to
   zero for the outputs that existed before, so the network computes exactly
   what it computed before planting (checked on the probe batch: the change is
   refused, naming the culprit, if an output moved -- e.g. when a planted
   channel reaches the output through a residual add or a linear layer instead
   of a conv). Which convs read which channel is found by running the probe with
   the new channels set to NaN: a channel-wise op (norm, activation, pooling,
   upsampling, concatenation) carries the NaN to exactly the columns of the
   consuming conv, which records and clears it.
2. With ``freeze='all'`` (the paper) every parameter entry that existed before
   is frozen: only the new channels' filters, norm parameters and the new input
   columns of their consumers train. Frozen entries get zero gradients (so
   global-norm gradient clipping ignores them) and are restored after every
   optimizer step (so weight decay or momentum cannot move them).

At every stage, whatever ``freeze``, the entries not planted yet -- the
unplanted channels' filters, biases and norm parameters, and (given a probe)
the input columns that read those channels -- are held the same way: they are
not part of the stage's network (their gradient is zero), but decoupled weight
decay (AdamW) or SGD's coupled decay would shrink them before they are planted.

Stages are numbered from 1 in messages (:func:`stage_label`, ``stage 2 of 4
(50% of channels)``) and indexed from 0 in the API and in checkpoints'
``meta['channel_planting']['stage']``.

Independent of mmdet / mmseg; :class:`~expand_mm.hooks.ChannelPlantingHook`
drives it from MMEngine's training loop.
"""
from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ExpandMMError
from ..layers import ExpandedLayer
from ..surgery import path_matches
from ..verification import flatten_tensors

FREEZE_MODES = ('all', 'none')
MASK_HOOK_MARK = '_expand_mm_planting_mask'


class PlantingError(ExpandMMError, ValueError):
    """A planting setting or model that channel planting cannot handle."""


@dataclass
class PlantedUnit:
    """One conv -> norm -> activation unit whose output channels are planted.

    Attributes:
        path: Module path of the unit (e.g. ``'backbone.stages.3.conv'``).
        module: The unit; its output is masked.
        conv: Its convolution (``module.conv``).
        norm: Its norm layer, or None.
        widths: Number of planted (active) output channels at each stage.
    """

    path: str
    module: nn.Module
    conv: nn.Conv2d
    norm: nn.Module | None
    widths: list[int]


def _unit_norm(module: nn.Module) -> nn.Module | None:
    norm_name = getattr(module, 'norm_name', None)
    return getattr(module, norm_name, None) if norm_name else None


def _is_unit(module: nn.Module) -> bool:
    """An mmcv ``ConvModule``-like unit: a ``conv`` child (a conv, maybe expanded) and a norm slot."""
    return (isinstance(getattr(module, 'conv', None), (nn.Conv2d, ExpandedLayer))
            and hasattr(module, 'norm_name'))


def _norm_follows_conv(module: nn.Module) -> bool:
    """Whether a unit's norm acts on the conv's output (mmcv ``ConvModule.order``).

    A norm before the conv (``order=('norm', 'conv', 'act')``) normalises the
    input channels: its rows are not the planted ones.
    """
    order = tuple(getattr(module, 'order', ('conv', 'norm', 'act')))
    return 'norm' not in order or 'conv' not in order or \
        order.index('norm') > order.index('conv')


def channel_mask(width: int, like: Tensor) -> Tensor:
    """1 on the first ``width`` channels (axis 1) of a tensor shaped like ``like``, else 0.

    Shaped ``(1, C, 1, ...)`` to broadcast over ``like``, in its dtype and device.
    """
    mask = torch.zeros(like.shape[1], dtype=like.dtype, device=like.device)
    mask[:width] = 1
    return mask.view(1, -1, *([1] * (like.dim() - 2)))


def stage_widths(channels: int, fractions: Sequence[float]) -> list[int]:
    """Active channels of a layer with ``channels`` outputs at each stage.

    ``ceil(fraction * channels)``, at least 1; the last fraction must be 1.

    Raises:
        PlantingError: Unless the fractions increase strictly in ``(0, 1]`` and
            end at 1.
    """
    fractions = [float(f) for f in fractions]
    if (not fractions or fractions[-1] != 1.0 or any(f <= 0 for f in fractions)
            or any(b <= a for a, b in zip(fractions, fractions[1:]))):
        raise PlantingError(f'stages={fractions!r} must be strictly increasing fractions '
                            'in (0, 1] ending with 1.0, e.g. (0.25, 0.5, 0.75, 1.0)')
    return [max(1, math.ceil(f * channels - 1e-9)) for f in fractions]


def stage_label(stage: int, fractions: Sequence[float]) -> str:
    """How messages name the stage of 0-based index ``stage``.

    E.g. ``'stage 2 of 4 (50% of channels)'`` for index 1 of
    ``(0.25, 0.5, 0.75, 1.0)``. One numbering for every log line and error:
    the hook's, the planter's and the checkpoint tools'
    (:func:`~expand_mm.planting.planting_stage` uses it).
    """
    return f'stage {stage + 1} of {len(fractions)} ({float(fractions[stage]):.0%} of channels)'


class ChannelPlanter:
    """Masks, grows and freezes the output channels of the selected units of a model.

    Args:
        model: The network (its units keep their full, stock widths).
        include: Glob patterns over module paths (a string is one pattern); the
            ``ConvModule``-like units matching one of them (or under a matching
            module) are planted.
        stages: Fraction of each unit's output channels planted at each stage,
            strictly increasing, ending with 1.0.
        exclude: Glob patterns of units to leave at full width; each must match
            a unit.
        freeze: ``'all'``: from the second stage on, every parameter entry that
            existed before the stage is frozen (the paper); ``'none'``: nothing is
            frozen (growth only, an ablation).
        verify_rtol: At a stage change, the largest accepted change of the
            probe's outputs relative to their magnitude.

    Raises:
        PlantingError: On a pattern that selects nothing, an expanded or grouped
            conv, or bad stages / freeze values.
    """

    def __init__(self, model: nn.Module, include: Sequence[str], stages: Sequence[float],
                 exclude: Sequence[str] | None = None, freeze: str = 'all',
                 verify_rtol: float = 1e-5) -> None:
        if freeze not in FREEZE_MODES:
            raise PlantingError(f'freeze={freeze!r} must be one of {FREEZE_MODES}')
        # One pattern given as a string is that pattern, as for ExpandNet.
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else exclude
        if not include:
            raise PlantingError(f'include={include!r} must be a non-empty list of glob '
                                "patterns over module paths, e.g. ['backbone.*']")
        self.model = model
        self.freeze = freeze
        self.verify_rtol = verify_rtol
        self.fractions = [float(f) for f in stages]
        stage_widths(1, self.fractions)  # validates
        expanded = [path for path, m in model.named_modules() if isinstance(m, ExpandedLayer)]
        if expanded:
            # The tracing of a planted channel's readers and the freezing act on plain
            # convs; an online expanded reader runs its composed kernel, past both.
            raise PlantingError(
                f'{type(model).__name__} has expanded layers (ExpandNet), e.g. {expanded[:3]}: '
                'channel planting works on a compact model. Plant the compact model (a '
                "Distiller's student without type='ExpandNet')")
        self.units = self._select_units(model, list(include), list(exclude or []))
        self.stage = -1
        self.new_columns: dict[nn.Conv2d, Tensor] = {}
        self.unplanted_columns: dict[nn.Conv2d, Tensor] = {}
        self._frozen: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []
        self._nan_channels: str | None = None  # 'new' / 'unplanted' while tracing readers
        self._masks: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------ selection
    def _select_units(self, model: nn.Module, include: list[str],
                      exclude: list[str]) -> list[PlantedUnit]:
        candidates = [(path, m) for path, m in model.named_modules() if path and _is_unit(m)]
        units: list[PlantedUnit] = []
        used: set[str] = set()
        for path, module in candidates:
            pattern = path_matches(path, include)
            if pattern is None or path_matches(path, exclude):
                continue
            used.add(pattern)
            if module.conv.groups != 1:
                raise PlantingError(
                    f'{path}: a grouped conv (groups={module.conv.groups}) cannot have its '
                    'output channels planted on their own; exclude it (exclude=[...])')
            widths = stage_widths(module.conv.out_channels, self.fractions)
            units.append(PlantedUnit(path, module, module.conv, _unit_norm(module), widths))
        # An exclude pattern that matches nothing would silently plant what it meant to keep.
        unmatched = [p for p in exclude
                     if not any(path_matches(path, [p]) for path, _ in candidates)]
        if unmatched:
            names = [p for p, _ in candidates]
            close = difflib.get_close_matches(unmatched[0], names, n=3, cutoff=0.3)
            raise PlantingError(
                f'exclude pattern(s) {unmatched} match no conv unit of {type(model).__name__}'
                + (f'; close module paths: {close}' if close else ''))
        unused = [p for p in include if p not in used]
        if unused:
            names = [p for p, _ in candidates]
            close = difflib.get_close_matches(unused[0], names, n=3, cutoff=0.3)
            raise PlantingError(
                f'include pattern(s) {unused} match no conv unit (an mmcv ConvModule with a '
                f'plain nn.Conv2d) of {type(model).__name__}'
                + (f'; close module paths: {close}' if close else '')
                + (f'; units are e.g. {names[:3]}' if names else '; the model has none'))
        return units

    # ---------------------------------------------------------------------- masks
    def _mask(self, unit: PlantedUnit, stage: int, like: Tensor) -> Tensor:
        # Built once per unit, stage, dtype and device: it sits on every forward.
        key = (id(unit.module), stage, like.dtype, like.device, like.dim())
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = channel_mask(unit.widths[stage], like)
        return mask

    def _traced_channels(self, unit: PlantedUnit) -> slice:
        """The output channels of ``unit`` set to NaN while tracing their readers."""
        if self._nan_channels == 'new':
            return slice(unit.widths[self.stage - 1] if self.stage > 0 else 0,
                         unit.widths[self.stage] if self.stage > 0 else 0)
        return slice(unit.widths[self.stage], unit.conv.out_channels)  # 'unplanted'

    def _unit_hook(self, unit: PlantedUnit) -> Callable:
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            out = out * self._mask(unit, self.stage, out)
            if self._nan_channels is not None:
                traced = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
                traced[self._traced_channels(unit)] = True
                out = out.masked_fill(traced.view(1, -1, *([1] * (out.dim() - 2))),
                                      float('nan'))
            return out
        setattr(hook, MASK_HOOK_MARK, True)  # found again in copies: remove_mask_hooks
        return hook

    def _install_masks(self, always: bool = False) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if always or not self._is_final():
            # At the last stage every channel is planted: the stock network runs as is.
            self._handles = [u.module.register_forward_hook(self._unit_hook(u))
                             for u in self.units]

    # --------------------------------------------------------------------- stages
    def _is_final(self) -> bool:
        """Whether every channel is planted for good (no mask, nothing left to trace)."""
        return self.stage >= len(self.fractions) - 1

    def start(self, stage: int = 0, probe: Callable[[], Any] | None = None) -> None:
        """Apply the masks and the frozen set of ``stage`` to the weights as they are.

        For the start of training (stage 0) and for resuming at a later stage.
        ``probe`` (a callable that runs the model on any batch; weights are not
        changed) finds which consumer columns read the stage's new channels
        (needed from stage 1 on with ``freeze='all'``) and which read channels
        not planted yet (held with the unplanted filters; without a probe only
        the unplanted filters, biases and norm parameters are held).

        Args:
            stage: 0-based stage index.
            probe: Runs the model on a batch; called in eval mode, without
                gradients.

        Raises:
            PlantingError: On an out-of-range stage, or a missing probe.
        """
        if not 0 <= stage < len(self.fractions):
            raise PlantingError(f'stage index {stage} is out of range: there are '
                                f'{len(self.fractions)} stages {self.fractions} (indices 0 to '
                                f'{len(self.fractions) - 1})')
        self.stage = stage
        self._install_masks()
        self.new_columns, self.unplanted_columns = {}, {}
        if stage > 0 and self.freeze != 'none' and probe is None:
            raise PlantingError(f'resuming at {stage_label(stage, self.fractions)} needs a probe '
                                'batch to find which convs read the channels planted at that '
                                'stage')
        if probe is not None:
            with torch.no_grad():
                training = self.model.training
                self.model.eval()
                try:
                    if stage > 0 and self.freeze != 'none':
                        self.new_columns = self._trace_readers(probe, 'new')
                    if not self._is_final():
                        self.unplanted_columns = self._trace_readers(probe, 'unplanted')
                finally:
                    self.model.train(training)
        self._refreeze()

    @torch.no_grad()
    def advance(self, probe: Callable[[], Any]) -> None:
        """Plant the next stage's channels without changing the network's function.

        Args:
            probe: Runs the model on a fixed batch and returns its outputs;
                called in eval mode, without gradients, three times (four
                before the last stage).

        Raises:
            PlantingError: At the last stage, or if planting would change the
                probe's outputs by more than ``verify_rtol`` (nothing is changed
                then: the weights and the stage are restored).
        """
        if self.stage + 1 >= len(self.fractions):
            raise PlantingError(f'already at the last stage '
                                f'({stage_label(self.stage, self.fractions)}): every channel '
                                'is planted')
        training = self.model.training
        self.model.eval()
        saved = {}
        try:
            before = [t.clone() for t in flatten_tensors(probe())]
            self.stage += 1
            self._install_masks()
            columns = self._trace_readers(probe, 'new')
            for conv, cols in columns.items():
                saved[conv] = conv.weight.detach().clone()
                conv.weight[self._column_index(conv, cols, old_rows_only=True)] = 0
            after = flatten_tensors(probe())
            self._check_unchanged(before, after)
            unplanted = self._trace_readers(probe, 'unplanted') if not self._is_final() else {}
        except BaseException:
            for conv, weight in saved.items():
                conv.weight.copy_(weight)
            self.stage -= 1
            self._install_masks()
            raise
        finally:
            self.model.train(training)
        self.new_columns, self.unplanted_columns = columns, unplanted
        self._refreeze()

    def _new_rows(self, conv: nn.Conv2d) -> Tensor:
        """Output channels of ``conv`` planted at this stage (none for non-units)."""
        rows = torch.zeros(conv.out_channels, dtype=torch.bool, device=conv.weight.device)
        for unit in self.units:
            if unit.conv is conv and self.stage > 0:
                rows[unit.widths[self.stage - 1]:unit.widths[self.stage]] = True
        return rows

    def _active_rows(self, conv: nn.Conv2d) -> Tensor:
        """Output channels of ``conv`` planted so far (all of them for non-units)."""
        rows = torch.ones(conv.out_channels, dtype=torch.bool, device=conv.weight.device)
        for unit in self.units:
            if unit.conv is conv:
                rows[unit.widths[self.stage]:] = False
        return rows

    def _column_index(self, conv: nn.Conv2d, cols: Tensor, old_rows_only: bool) -> Tensor:
        """Boolean index into ``conv.weight`` of the entries that read columns ``cols``."""
        per_group = conv.in_channels // conv.groups
        out_per_group = conv.out_channels // conv.groups
        index = torch.zeros(conv.weight.shape[:2], dtype=torch.bool, device=conv.weight.device)
        # Rows not planted yet read nothing that matters: they stay as they are.
        rows_ok = self._active_rows(conv) & ~self._new_rows(conv) if old_rows_only \
            else self._active_rows(conv)
        for j in cols.nonzero().flatten().tolist():
            lo = (j // per_group) * out_per_group
            index[lo:lo + out_per_group, j % per_group] = rows_ok[lo:lo + out_per_group]
        return index

    def _trace_readers(self, probe: Callable[[], Any], channels: str
                       ) -> dict[nn.Conv2d, Tensor]:
        """``{conv: boolean mask of its input channels that carry a traced channel}``.

        Runs ``probe`` with the units' ``channels`` set to NaN: ``'new'``, the
        ones planted at this stage, or ``'unplanted'``, the ones not planted
        yet. Each conv records the NaN columns of its input and clears them, so
        a conv's own outputs never carry the NaN further (one hop: the direct
        readers only).
        """
        found: dict[nn.Conv2d, Tensor] = {}

        def pre_hook(conv: nn.Conv2d, args: tuple) -> tuple | None:
            x = args[0]
            nan = torch.isnan(x)
            cols = nan.transpose(0, 1).reshape(x.shape[1], -1).any(dim=1)
            if not cols.any():
                return None
            found[conv] = cols if conv not in found else found[conv] | cols
            return (x.masked_fill(nan, 0.0),) + tuple(args[1:])

        handles = [m.register_forward_pre_hook(pre_hook) for m in self.model.modules()
                   if isinstance(m, nn.Conv2d)]
        self._nan_channels = channels
        self._install_masks(always=True)  # the NaN is set by the unit hooks
        try:
            probe()
        finally:
            self._nan_channels = None
            self._install_masks()
            for handle in handles:
                handle.remove()
        return found

    def _check_unchanged(self, before: list[Tensor], after: list[Tensor]) -> None:
        scale = max((float(t.abs().max()) for t in before if t.numel()), default=0.0)
        if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
            raise PlantingError(f'planting {stage_label(self.stage, self.fractions)}: the probe '
                                'returned other outputs after planting')
        worst = max((float((a.double() - b.double()).abs().nan_to_num(float('inf')).max())
                     for a, b in zip(before, after) if a.numel()), default=0.0)
        if not worst <= self.verify_rtol * max(scale, 1e-12):
            raise PlantingError(
                f'planting {stage_label(self.stage, self.fractions)} would change the '
                f'network\'s outputs (max abs change {worst:.3g} for outputs up to '
                f'{scale:.3g}). A planted channel reaches '
                'an output other than through a conv that reads it directly (a residual add, '
                'a linear layer, ...): channel planting needs plain conv chains; exclude the '
                f'units that feed such paths (planted here: {[u.path for u in self.units]})')

    # -------------------------------------------------------------------- freezing
    def _unplanted_entries(self) -> dict[nn.Parameter, Tensor]:
        """``{parameter: boolean mask}`` of the entries not planted at this stage.

        The unplanted rows of each unit's conv weight and bias and of its norm's
        parameters (when the norm follows the conv, as in :meth:`masked_entries`),
        and the columns of the convs that read unplanted channels
        (``unplanted_columns``, traced with a probe).
        """
        held: dict[nn.Parameter, Tensor] = {}

        def hold(param: nn.Parameter, index: Any) -> None:
            held.setdefault(param, torch.zeros_like(param, dtype=torch.bool))[index] = True

        for unit in self.units:
            unplanted = slice(unit.widths[self.stage], None)
            named = [unit.conv]
            if unit.norm is not None and _norm_follows_conv(unit.module):
                named.append(unit.norm)
            for module in named:
                for name, param in module.named_parameters(recurse=False):
                    if name in ('weight', 'bias') and param.shape[0] == unit.conv.out_channels:
                        hold(param, unplanted)
        for conv, cols in self.unplanted_columns.items():
            hold(conv.weight, self._column_index(conv, cols, old_rows_only=False))
        return held

    def _refreeze(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []
        self._frozen = {}
        # Held at every stage and with any `freeze`: not planted yet, so not trained.
        held = self._unplanted_entries()
        trainable: dict[nn.Parameter, Tensor] | None = None
        if self.freeze == 'all' and self.stage > 0:
            trainable = self._trainable_entries()
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            frozen = torch.zeros_like(param, dtype=torch.bool)
            if trainable is not None:
                frozen = ~trainable.get(param, frozen)
            if param in held:
                frozen = frozen | held[param]
            if frozen.any():
                self._frozen[param] = (frozen, param.detach().clone())
                self._grad_handles.append(param.register_hook(
                    lambda grad, frozen=frozen: grad.masked_fill(frozen, 0)))

    def _trainable_entries(self) -> dict[nn.Parameter, Tensor]:
        """``{parameter: boolean mask}`` of what trains at this stage with ``freeze='all'``.

        The stage's new channels' filters, biases and norm parameters, and the
        new input columns of their readers; everything else is frozen.
        """
        trainable: dict[nn.Parameter, Tensor] = {}

        def open_(param: nn.Parameter, index: Any) -> None:
            mask = trainable.setdefault(param, torch.zeros_like(param, dtype=torch.bool))
            mask[index] = True

        for unit in self.units:
            new = slice(unit.widths[self.stage - 1], unit.widths[self.stage])
            open_(unit.conv.weight, new)
            if unit.conv.bias is not None:
                open_(unit.conv.bias, new)
            if unit.norm is not None:
                for param in unit.norm.parameters(recurse=False):
                    open_(param, new)
        for conv, cols in self.new_columns.items():
            open_(conv.weight, self._column_index(conv, cols, old_rows_only=False))
        return trainable

    def restore_frozen(self) -> None:
        """Put every frozen or unplanted entry back to its value at the start of the stage.

        Call after each optimizer step (weight decay and momentum move entries
        whose gradient is zero).
        """
        with torch.no_grad():
            for param, (frozen, value) in self._frozen.items():
                param.copy_(torch.where(frozen, value, param))

    def num_trainable_entries(self) -> int:
        """Parameter entries that train at this stage: neither frozen nor unplanted."""
        total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return total - sum(int(f.sum()) for f, _ in self._frozen.values())

    def masked_entries(self) -> dict[str, int]:
        """``{state-dict key: planted rows}`` of the parameters whose trailing rows are masked.

        For every unit not at full width: its conv's weight and bias and its
        norm's weight and bias (keys relative to the planted model). Zeroing
        rows ``planted:`` of these in a copy of the weights makes the stock
        network compute what the masked one does, provided the unit's
        activation maps 0 to 0 (ReLU, LeakyReLU, SiLU, ...) -- this is how a
        checkpoint saved before the last stage gets its compact form
        (:func:`bake_masks`; checked by :func:`~expand_mm.planting.bake_planting_masks`).
        Empty at the last stage.
        """
        entries: dict[str, int] = {}
        for unit in self.units:
            width = unit.widths[self.stage]
            if width >= unit.conv.out_channels:
                continue
            named = [('conv', unit.conv)]
            if unit.norm is not None and _norm_follows_conv(unit.module):
                named.append((unit.module.norm_name, unit.norm))
            for child, module in named:
                for name, param in module.named_parameters(recurse=False):
                    if name in ('weight', 'bias') and param.shape[0] == unit.conv.out_channels:
                        entries[f'{unit.path}.{child}.{name}'] = width
        return entries

    def active_widths(self) -> dict[str, tuple[int, int]]:
        """``{unit path: (planted channels, full width)}`` at this stage."""
        return {u.path: (u.widths[self.stage], u.conv.out_channels) for u in self.units}

    def remove(self) -> None:
        """Remove every hook: the model runs at full width, nothing frozen."""
        for handle in self._handles + self._grad_handles:
            handle.remove()
        self._handles, self._grad_handles, self._frozen = [], [], {}


def bake_masks(state_dict: Mapping[str, Tensor], masked_entries: Mapping[str, int]
               ) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with rows ``planted:`` of each masked entry set to zero.

    Args:
        state_dict: Weights of the planted network (its own keys).
        masked_entries: :meth:`ChannelPlanter.masked_entries` of the stage they
            were saved at.

    Raises:
        PlantingError: If an entry is missing or has fewer rows than planted.
    """
    baked = dict(state_dict)
    for key, width in masked_entries.items():
        if key not in baked:
            raise PlantingError(f'the weights have no {key!r}, which channel planting masked '
                                f'(keys are e.g. {sorted(baked)[:3]}): they are not the '
                                'planted network\'s')
        value = baked[key]
        if not 0 < int(width) <= value.shape[0]:
            raise PlantingError(f'{key!r} has {value.shape[0]} rows, {width} of them planted: '
                                'the weights are not the planted network\'s')
        value = value.detach().clone()
        value[int(width):] = 0
        baked[key] = value
    return baked


@contextlib.contextmanager
def masked_units(model: nn.Module, widths: Mapping[str, int]) -> Iterator[None]:
    """Within the block, the output channels ``widths[path]:`` of each unit are zero.

    What :class:`ChannelPlanter`'s masks do at a stage, from the widths a
    checkpoint records (``meta['channel_planting']['widths']``), without a
    planter: to run a saved network as it was trained.

    Raises:
        PlantingError: If a path names no module of ``model``.
    """
    modules = dict(model.named_modules())
    missing = [p for p in widths if p not in modules]
    if missing:
        raise PlantingError(f'planted unit(s) {missing} are not modules of '
                            f'{type(model).__name__}: the weights are not the planted '
                            'network\'s')

    def hook_for(width: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            return out * channel_mask(width, out)
        return hook

    handles = [modules[p].register_forward_hook(hook_for(int(w))) for p, w in widths.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def remove_mask_hooks(model: nn.Module) -> int:
    """Remove :class:`ChannelPlanter`'s mask hooks from ``model`` (e.g. a deep copy of it).

    A deep copy of a model being planted carries the planter's forward hooks;
    this strips them (and only them), so the copy runs its weights as they are.

    Returns:
        The number of hooks removed.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, MASK_HOOK_MARK, False):
                del module._forward_hooks[key]
                removed += 1
    return removed
