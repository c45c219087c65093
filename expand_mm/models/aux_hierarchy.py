"""``type='AuxHierarchy'``: a wider, training-only auxiliary network fed by the compact one
at several levels, its connections searched or given.

Auxiliary over-parameterisation in the form of Liu, Zhuang et al. (arXiv
1909.02214, "Training Compact Neural Networks via Auxiliary
Overparameterization"): beside the compact network C (a stock detector /
segmentor, or an ExpandNet of one) a network A, ``width_mult`` times wider,
runs during training only.

* **Levels.** A level is a feature map C computes: a module path of C whose
  forward returns a tensor (``'backbone.encoder.2'``), or one item of a module
  returning a tuple / list (``'neck[0]'``). ``levels`` lists the candidates,
  by default every map ``backbone`` and ``neck`` return, in the order C
  computes them, up to the last map C's head reads. The maps are recorded by
  swapping the module's ``forward`` for the step (:func:`record_forward`), so
  C's own code path runs unchanged and nothing is recomputed.
* **A.** One block per level, ``width_mult`` times C's width there: the
  previous block's output (resampled to the level's size, 1x1 conv) plus,
  where the structure says so, C's map through a 1x1 adapter; both normalised
  without affine scale, summed, then a 3x3 conv-BN-activation. A's blocks at
  the levels C's head reads feed a wider copy of that head (its widths and
  input channels x ``width_mult``), with its own losses.
* **One-way flow.** A reads C's maps and never writes back: C computes in
  training exactly what it computes when deployed; A's losses reach C's
  shared layers through the reads.
* **Structure.** The levels whose map feeds A (the C -> A connections). Given
  as ``structure=[...]``, or searched: ``search=dict(fraction=0.3, ...)``
  puts a sigmoid gate on every candidate connection and, during that
  fraction of the schedule, trains the gates with the network under a
  sparsity penalty; then the gates are made discrete, the structure is
  logged with the config line that reproduces it, kept in the model's
  buffers (so it resumes) and in the checkpoint meta
  (:class:`AuxStructureHook`), and training goes on with it. The phase
  follows the runner's iteration (MMEngine's message hub), so a run resumed
  in the middle of the search goes on searching.

The total loss is C's losses plus ``aux_weight`` x A's, A's logged under
``loss_prefix``. Prediction, validation, testing and the compact checkpoint
are C's alone (:mod:`expand_mm.models.deployable`).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, MMLogger
from mmengine.registry import HOOKS, MODELS
from torch import Tensor, nn

from ..cost import peak_step_bytes
from ..errors import ConfigError, SetupError
from ..surgery import count_params
from .aux_overparam import (DEFAULT_WIDTH_KEYS, AuxBranchWrapper, check_width_and_weight, head_loss, pick_head,
                            wide_head_cfg)
from .deployable import deployable_model_cfg, unwrap_model
from .model_cfg import check_model_overrides
from .wrappers import add_loss_prefix, build_inner_model, record_forward

AUX_HIERARCHY_KEYS = ('model', 'levels', 'structure', 'search', 'width_mult', 'aux_weight',
                      'head', 'width_keys', 'norm_cfg', 'act_cfg', 'probe_size', 'cost_iters',
                      'loss_prefix', 'data_preprocessor', 'init_cfg')
SEARCH_KEYS = ('fraction', 'sparsity', 'threshold', 'top_k', 'gate_scale')
DEFAULT_SEARCH = dict(fraction=0.3, sparsity=0.005, threshold=0.5, top_k=None, gate_scale=10.0)
# Modules whose outputs are the default candidate levels, in this order.
DEFAULT_LEVEL_MODULES = ('backbone', 'neck')
LEVEL_NAME = re.compile(r'^(?P<path>[A-Za-z_][\w.]*)(\[(?P<index>\d+)\])?$')


@dataclass(frozen=True)
class Level:
    """One feature map of the compact network that A may read.

    Attributes:
        name: ``'path'`` or ``'path[i]'`` (item ``i`` of the module's output).
        path: Module path in the compact network.
        index: Item of the module's tuple / list output, or None for a tensor.
        channels: Channels of the map.
    """
    name: str
    path: str
    index: int | None
    channels: int

    def pick(self, output: Any) -> Tensor:
        """The map from the module's recorded output."""
        return output if self.index is None else output[self.index]


def _level_names(path: str, output: Any) -> list[tuple[str, int | None, Tensor]]:
    """``(name, index, tensor)`` for every feature map a module's output holds."""
    if isinstance(output, Tensor):
        return [(path, None, output)]
    if isinstance(output, (list, tuple)):
        return [(f'{path}[{i}]', i, t) for i, t in enumerate(output)
                if isinstance(t, Tensor) and t.dim() == 4]
    return []


def probe_levels(model: nn.Module, paths: Sequence[str], size: Sequence[int]
                 ) -> tuple[list[Level], list[Tensor], Any]:
    """Run ``model.extract_feat`` once on a blank image and list the maps of ``paths``.

    The model runs in eval mode without gradients (its BN statistics do not
    move) and is put back in its mode.

    Returns:
        ``(levels, maps, feats)``: the levels in the order their
        modules returned, their maps on the probe, and what ``extract_feat``
        returned (the head's input).
    """
    modules = {path: model.get_submodule(path) for path in paths}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_forward(modules) as seen:
            feats = model.extract_feat(torch.zeros(1, 3, *size))
    finally:
        model.train(was_training)
    levels, maps = [], []
    for path in seen:  # insertion order: the order the modules returned
        for name, index, tensor in _level_names(path, seen[path]):
            levels.append(Level(name, path, index, int(tensor.shape[1])))
            maps.append(tensor)
    return levels, maps, feats


def _head_slots(head: nn.Module, feats: Any) -> list[int]:
    """The items of the head's input it reads: mmseg's ``in_index``, else all."""
    count = len(feats) if isinstance(feats, (list, tuple)) else 1
    index = getattr(head, 'in_index', None)
    if getattr(head, 'input_transform', None) is None and isinstance(index, int):
        return [index]
    if isinstance(index, (list, tuple)):
        return list(index)
    return list(range(count))


def resample(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` at spatial ``size``: average-pooled when it shrinks, nearest when it grows."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=tuple(size), mode='nearest')


class AuxBlock(nn.Module):
    """One block of the auxiliary network, at one level of the compact one.

    ``forward(read, prev)``: ``prev`` (the previous block's output) resampled
    to the level's size through a 1x1 conv, plus ``read`` (the compact map,
    already through :attr:`adapter` and gated), each normalised without an
    affine scale -- so a gate's value alone sets how much of C's map enters
    and the penalty on it cannot be undone by a larger adapter -- then a 3x3
    conv-norm-activation of ``width`` channels.

    Args:
        in_channels: Channels of the compact map it reads (None: reads none).
        prev_channels: Channels of the previous block (None: the first block).
        width: Its own width.
        norm_cfg: Norm of the block (its affine-free twin normalises the inputs).
        act_cfg: Activation of the block.
        active: False for a block that can have no input (before the first
            level that feeds A): it holds nothing and returns None.
    """

    def __init__(self, in_channels: int | None, prev_channels: int | None, width: int,
                 norm_cfg: dict, act_cfg: dict, active: bool = True) -> None:
        super().__init__()
        self.adapter = self.transition = self.conv = None
        if not active:
            return
        plain_norm = dict(norm_cfg, affine=False)
        self.adapter = None if in_channels is None else nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            build_norm_layer(plain_norm, width)[1])
        self.transition = None if prev_channels is None else nn.Sequential(
            nn.Conv2d(prev_channels, width, 1, bias=False),
            build_norm_layer(plain_norm, width)[1])
        self.conv = ConvModule(width, width, 3, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg)

    def forward(self, read: Tensor | None, prev: Tensor | None, size: Sequence[int]
                ) -> Tensor | None:
        """The block's output at spatial ``size``, or None when it has no input."""
        parts = []
        if self.conv is None:
            return None
        if prev is not None and self.transition is not None:
            parts.append(self.transition(resample(prev, size)))
        if read is not None:
            parts.append(read)
        if not parts:
            return None
        return self.conv(parts[0] if len(parts) == 1 else parts[0] + parts[1])


def _check_search(search: Any) -> dict:
    """``search`` merged over :data:`DEFAULT_SEARCH`, each value checked."""
    if not isinstance(search, dict):
        raise ConfigError(f'AuxHierarchy: search={search!r} must be a dict such as '
                          f'dict(fraction=0.3, sparsity=0.005) (keys {list(SEARCH_KEYS)})')
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise ConfigError(f'AuxHierarchy: unknown search option(s) {unknown}; search takes '
                          f'{list(SEARCH_KEYS)}')
    cfg = dict(DEFAULT_SEARCH, **search)
    if not 0 < cfg['fraction'] <= 1:
        raise ConfigError(f"AuxHierarchy: search.fraction={cfg['fraction']!r} must be in "
                          '(0, 1] (the part of the schedule that searches, e.g. 0.3)')
    if cfg['sparsity'] < 0 or not 0 < cfg['threshold'] < 1 or cfg['gate_scale'] <= 0:
        raise ConfigError('AuxHierarchy: search needs sparsity >= 0, 0 < threshold < 1 and '
                          f"gate_scale > 0, got {cfg}")
    if cfg['top_k'] is not None and (not isinstance(cfg['top_k'], int) or cfg['top_k'] < 1):
        raise ConfigError(f"AuxHierarchy: search.top_k={cfg['top_k']!r} must be None or an "
                          'int >= 1 (keep that many connections)')
    return cfg


@MODELS.register_module()
class AuxHierarchy(AuxBranchWrapper):
    """A compact detector / segmentor trained beside a wider hierarchical auxiliary network.

    See the module docstring for the design.

    Args:
        model: Config of the compact network C (a stock detector / segmentor or
            ``type='ExpandNet'``); it is the deployable model.
        levels: Candidate levels, in the order C computes them (default: every
            map of ``backbone`` and ``neck`` up to the last one C's head reads).
            They must include the maps C's head reads.
        structure: The levels that feed A (a subset of ``levels``). Default:
            all of them, unless ``search`` is given.
        search: Search the structure: ``dict(fraction, sparsity, threshold,
            top_k, gate_scale)`` (defaults in :data:`DEFAULT_SEARCH`).
            ``fraction`` of the schedule trains sigmoid gates on every
            connection with the penalty ``sparsity`` x (sum of the gates) x
            (A's weighted task loss, as a constant); then a connection stays
            if its gate is >= ``threshold`` (or among the ``top_k`` largest).
            ``gate_scale`` multiplies the gate logits (an optimizer step then
            moves a gate that many times faster than a weight).
        width_mult: A's width over C's at each level (and of its head).
        aux_weight: Factor of A's losses.
        head: Attribute of C's task head (default: ``bbox_head`` /
            ``decode_head``).
        width_keys: Head config keys holding hidden widths (``in_channels``
            is scaled too: A's maps are wider).
        norm_cfg: Norm of A's blocks.
        act_cfg: Activation of A's blocks.
        probe_size: Image size of the one forward, at build time, that finds
            the levels' channels.
        cost_iters: Iterations (0-based) before whose step the cost of A is
            measured against C alone (time of forward + backward, peak memory;
            the model state is put back): by default the 6th step of each
            phase. ``()`` measures nothing.
        loss_prefix: Prefix of A's logged losses.
        data_preprocessor: The config's top-level ``data_preprocessor``.
        init_cfg: Unused (each part initialises itself).
        **model_overrides: Keys mm APIs set on the top-level model dict.
    """

    def __init__(self, model: dict, levels: Sequence[str] | None = None,
                 structure: Sequence[str] | None = None, search: dict | None = None,
                 width_mult: float = 2.0, aux_weight: float = 1.0, head: str | None = None,
                 width_keys: Sequence[str] = DEFAULT_WIDTH_KEYS,
                 norm_cfg: dict = dict(type='BN'), act_cfg: dict = dict(type='ReLU'),
                 probe_size: Sequence[int] = (64, 64), cost_iters: Sequence[int] | None = None,
                 loss_prefix: str = 'auxnet.', data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None, **model_overrides: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        check_width_and_weight('AuxHierarchy', width_mult, aux_weight)
        check_model_overrides(model_overrides, 'AuxHierarchy', AUX_HIERARCHY_KEYS, model, 'model')
        if structure is not None and search is not None:
            raise ConfigError('AuxHierarchy: give structure= (a fixed structure) or search= '
                              '(search it), not both')
        self.model = build_inner_model(model, 'model.model', 'AuxHierarchy',
                                       data_preprocessor, model_overrides)
        self.data_preprocessor = self.model.data_preprocessor
        compact_cfg = deployable_model_cfg(dict(model))
        self.head = pick_head('AuxHierarchy', self.model, compact_cfg, head)
        (self.levels, self.head_levels, self.head_slots,
         self.head_input_items) = self._find_levels(levels, probe_size)
        names = [lv.name for lv in self.levels]
        self.search_cfg = None if search is None else _check_search(search)
        reads = names if structure is None else self._check_structure(structure)
        widths = [max(1, int(round(lv.channels * width_mult))) for lv in self.levels]
        # Blocks before the first level that feeds A have no input: left empty.
        first = 0 if self.search_cfg else min(names.index(n) for n in reads)
        self.blocks = nn.ModuleList(
            AuxBlock(lv.channels if (self.search_cfg or lv.name in reads) else None,
                     widths[i - 1] if i > first else None, widths[i], norm_cfg, act_cfg,
                     active=i >= first)
            for i, lv in enumerate(self.levels))
        self.aux_head = MODELS.build(wide_head_cfg(
            'AuxHierarchy', compact_cfg, self.head, width_mult,
            tuple(width_keys) + ('in_channels',)))
        # The structure as a 0/1 mask over `levels`, and whether it is final:
        # buffers, so a checkpoint (and a resumed run) carries them.
        self.register_buffer('read_mask', torch.tensor(
            [float(n in reads) for n in names]))
        self.register_buffer('structure_final', torch.tensor(self.search_cfg is None))
        self.gate_logits = None
        if self.search_cfg:
            self.gate_logits = nn.Parameter(torch.zeros(len(names)))
            self.register_buffer('searched_gates', torch.zeros(len(names)))  # at the switch
        self.aux_weight = float(aux_weight)
        self.loss_prefix = loss_prefix
        self.cost_iters = cost_iters
        self.cost_report: dict[str, dict] = {}
        MMLogger.get_current_instance().info(self._describe(width_mult))

    # ----------------------------------------------------------- build-time checks

    def _find_levels(self, levels: Sequence[str] | None, probe_size: Sequence[int]
                     ) -> tuple[list[Level], list[int], list[int], int]:
        """The candidate levels; for each map C's head reads, its position among them and
        its item in the head's input; and the number of items of that input."""
        if levels is not None and (isinstance(levels, str) or not levels):
            raise ConfigError(f'AuxHierarchy: levels={levels!r} must be a non-empty list of '
                              "level names such as ['backbone[1]', 'neck[0]']")
        wanted = None if levels is None else [self._parse_level(n) for n in levels]
        paths = (list(dict.fromkeys(p for p, _ in wanted)) if wanted is not None else
                 [p for p in DEFAULT_LEVEL_MODULES
                  if isinstance(getattr(self.model, p, None), nn.Module)])
        found, maps, feats = probe_levels(self.model, paths, probe_size)
        by_name = {lv.name: (lv, m) for lv, m in zip(found, maps)}
        if wanted is not None:
            missing = [n for n in levels if n not in by_name]
            if missing:
                raise ConfigError(f'AuxHierarchy: level(s) {missing} are not feature maps of '
                                  f'the compact network; the maps of those modules are '
                                  f'{sorted(by_name)}')
            found = [by_name[n][0] for n in levels]
            maps = [by_name[n][1] for n in levels]
        items = feats if isinstance(feats, (list, tuple)) else [feats]
        slots = _head_slots(getattr(self.model, self.head), feats)
        head_levels = []
        for slot in slots:
            match = [i for i, m in enumerate(maps) if m is items[slot]]
            if not match:
                raise ConfigError(
                    f'AuxHierarchy: levels must include the maps {self.head} reads (item '
                    f'{slot} of what extract_feat returns, e.g. \'neck[0]\' or '
                    f'\'backbone[2]\'); got {[lv.name for lv in found]}')
            head_levels.append(match[-1])
        last = max(head_levels)
        if wanted is not None and len(found) > last + 1:
            raise ConfigError(f'AuxHierarchy: levels {[lv.name for lv in found[last + 1:]]} '
                              f'come after {found[last].name!r}, the last map {self.head} '
                              'reads, so A could not use them; list them before it or drop them')
        return found[:last + 1], head_levels, slots, len(items)

    def _parse_level(self, name: Any) -> tuple[str, int | None]:
        """``(module path, index)`` of a level name, the path checked against the model."""
        match = LEVEL_NAME.match(name) if isinstance(name, str) else None
        if match is None:
            raise ConfigError(f"AuxHierarchy: level {name!r} is not 'module.path' or "
                              "'module.path[i]' (e.g. 'backbone[1]', 'backbone.encoder.2')")
        path = match['path']
        try:
            self.model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f'AuxHierarchy: level {name!r}: {path!r} is not a module of the '
                              f'compact {type(self.model).__name__} (its top-level modules: '
                              f'{[n for n, _ in self.model.named_children()]})') from None
        return path, None if match['index'] is None else int(match['index'])

    def _check_structure(self, structure: Any) -> list[str]:
        """``structure`` checked against the candidate levels."""
        names = [lv.name for lv in self.levels]
        if isinstance(structure, str) or not isinstance(structure, (list, tuple)):
            raise ConfigError(f'AuxHierarchy: structure={structure!r} must be a list of level '
                              f'names, from {names}')
        unknown = [n for n in structure if n not in names]
        if unknown:
            raise ConfigError(f'AuxHierarchy: structure names level(s) {unknown} that are not '
                              f'levels of the compact network; its levels are {names}')
        first_head = min(self.head_levels)
        if not any(names.index(n) <= first_head for n in structure):
            raise ConfigError(f'AuxHierarchy: structure={list(structure)} feeds A nothing up '
                              f'to {names[first_head]!r}, the first map the head reads; '
                              f'include one of {names[:first_head + 1]}')
        return list(structure)

    def _describe(self, width_mult: float) -> str:
        aux = count_params(self.blocks) + count_params(self.aux_head)
        mode = (f"searched over the first {self.search_cfg['fraction']:.0%} of the schedule"
                if self.search_cfg else f'structure={self.structure}')
        return (f'AuxHierarchy: training-only auxiliary network of {len(self.levels)} blocks '
                f'(x{width_mult} wide) on levels {[lv.name for lv in self.levels]}, its head '
                f'on {[self.levels[i].name for i in self.head_levels]}; {aux:,} parameters vs '
                f'{count_params(self.model):,} in the compact network; {mode}')

    # ------------------------------------------------------------------ structure

    @property
    def structure(self) -> list[str]:
        """The levels that feed A (all candidates while a search is under way)."""
        return [lv.name for lv, on in zip(self.levels, self.read_mask.tolist()) if on]

    def gates(self) -> Tensor:
        """The connections' gates: sigmoid of the scaled logits while searching, else 0/1."""
        if self.searching:
            gates = torch.sigmoid(self.gate_logits * self.search_cfg['gate_scale'])
            # The first block reads C alone: a gate would only scale the input of a
            # normalised block (nothing the loss can see), so it stays open.
            return torch.cat([gates.new_ones(1), gates[1:]])
        return self.read_mask

    @property
    def searching(self) -> bool:
        """Whether the gates are still being trained."""
        return not bool(self.structure_final)

    def search_end(self) -> int | None:
        """The first iteration after the search phase (None outside a Runner)."""
        max_iters = MessageHub.get_current_instance().get_info('max_iters')
        if self.search_cfg is None or max_iters is None:
            return None
        return int(round(self.search_cfg['fraction'] * max_iters))

    def discretise(self) -> list[str]:
        """Make the gates discrete: keep the connections that pass the threshold / top-k.

        The first level's connection, which has no gate, is always kept (A
        starts there; ``top_k`` counts the others). Logs the gates, the
        structure and the config line that reproduces it.
        """
        gates = self.gates().detach().cpu()
        cfg = self.search_cfg
        later = gates[1:]
        keep = ({1 + i for i in later.argsort(descending=True)[:cfg['top_k']].tolist()}
                if cfg['top_k'] else
                {1 + i for i, g in enumerate(later.tolist()) if g >= cfg['threshold']})
        keep.add(0)  # A starts at the first level (its read has no gate)
        self.read_mask.copy_(torch.tensor([float(i in keep) for i in range(len(gates))]))
        self.searched_gates.copy_(gates)
        self.structure_final.fill_(True)
        names = [lv.name for lv in self.levels]
        MMLogger.get_current_instance().info(
            'AuxHierarchy: search done; gates '
            + ', '.join(f'{n} {g:.3f}' for n, g in zip(names, gates.tolist()))
            + f'. Structure kept: structure={self.structure!r} (to train it without a '
            f'search: --cfg-options "model.structure={self.structure!r}" model.search=None)')
        return self.structure

    def structure_record(self) -> dict:
        """What the checkpoint meta holds: the levels, gates, structure and measured cost."""
        record = dict(levels=[lv.name for lv in self.levels], structure=self.structure,
                      final=not self.searching, cost=dict(self.cost_report))
        if self.gate_logits is not None:
            with torch.no_grad():
                gates = self.gates() if self.searching else self.searched_gates
            record['gates'] = [round(float(g), 4) for g in gates]
        return record

    # --------------------------------------------------------------------- losses

    def _update_phase(self) -> None:
        """End the search once the runner's iteration reaches its end."""
        end = self.search_end()
        it = MessageHub.get_current_instance().get_info('iter')
        if self.searching and end is not None and it is not None and it >= end:
            self.discretise()

    def aux_forward(self, maps: Sequence[Tensor]) -> list[Tensor | None]:
        """A's block outputs, one per level, from C's maps at those levels."""
        gates = self.gates()
        outs: list[Tensor | None] = []
        prev = None
        for i, (block, feat) in enumerate(zip(self.blocks, maps)):
            read = None
            if block.adapter is not None and (self.searching or gates[i] > 0):
                read = block.adapter(feat)
                if self.searching:
                    read = gates[i] * read
            out = block(read, prev, feat.shape[-2:])
            outs.append(out)
            prev = out if out is not None else prev
        return outs

    def loss(self, inputs: Tensor, data_samples: Any) -> dict:
        """C's losses, plus A's (× ``aux_weight``) and, while searching, the gate penalty."""
        if self.training:
            self._update_phase()
        paths = list(dict.fromkeys(lv.path for lv in self.levels))
        modules = {p: self.model.get_submodule(p) for p in paths}
        with record_forward(modules) as seen:
            losses = self.model.loss(inputs, data_samples)
        missing = [p for p in paths if p not in seen]
        if missing:
            raise SetupError(f"AuxHierarchy: {missing} did not run in the compact model's "
                             'loss(); choose levels among the modules it runs')
        maps = [lv.pick(seen[lv.path]) for lv in self.levels]
        outs = self.aux_forward(maps)
        feats = self._head_input(outs)
        aux = add_loss_prefix(head_loss(self.aux_head, feats, data_samples, self.model),
                              self.loss_prefix, self.aux_weight)
        if self.search_cfg is not None:
            aux[f'{self.loss_prefix}loss_gate_sparsity'] = (
                self._gate_penalty(aux) if self.searching else self._zero_on_dropped())
        aux.update({f'{self.loss_prefix}gate.{lv.name}': g.detach()
                    for lv, g in zip(self.levels, self.gates())})
        return self._join_losses(losses, aux)

    def _head_input(self, outs: Sequence[Tensor | None]) -> list:
        """A's maps in the places of C's head input (None where the head reads nothing)."""
        feats: list = [None] * self.head_input_items
        for slot, level in zip(self.head_slots, self.head_levels):
            if outs[level] is None:
                raise SetupError(f'AuxHierarchy: A has no input up to {self.levels[level].name!r}'
                                 ' (the structure feeds it nothing there)')
            feats[slot] = outs[level]
        return feats

    def _zero_on_dropped(self) -> Tensor:
        """0 x the parameters the search dropped (the gates, the unused adapters).

        Logged in the penalty's place once the search is over, it keeps every
        parameter in the graph with a zero gradient, so DDP needs no
        ``find_unused_parameters`` after the switch (what the optimizer then
        does to these parameters changes nothing that runs).
        """
        dropped = [self.gate_logits] + [
            p for block, on in zip(self.blocks, self.read_mask.tolist())
            if not on and block.adapter is not None for p in block.adapter.parameters()]
        return 0 * sum(p.sum() for p in dropped)

    def _gate_penalty(self, aux: dict) -> Tensor:
        """``sparsity`` x (sum of the gates) x (A's weighted task loss, as a constant).

        Relative to A's loss, so one ``sparsity`` means the same for a head with
        sum-reduced losses (YOLOv3) and one with mean-reduced losses (mmseg):
        a connection stays open while it lowers A's loss by more than that
        fraction.
        """
        task = sum(v.sum() if isinstance(v, Tensor) else sum(x.sum() for x in v)
                   for k, v in aux.items() if 'loss' in k)
        return self.search_cfg['sparsity'] * self.gates()[1:].sum() * task.detach()

    # ----------------------------------------------------------------------- cost

    def train_step(self, data: Any, optim_wrapper: Any) -> dict:
        """The wrapper's step, after measuring A's cost at the ``cost_iters`` iterations."""
        it = MessageHub.get_current_instance().get_info('iter')
        if it is not None and it in self._cost_iters():
            self._update_phase()
            phase = 'search' if self.searching else 'train'
            self.cost_report[phase] = measure_step_cost(self, data)
            MMLogger.get_current_instance().info(format_cost(phase, it, self.cost_report[phase]))
        return super().train_step(data, optim_wrapper)

    def _cost_iters(self) -> tuple[int, ...]:
        if self.cost_iters is not None:
            return tuple(self.cost_iters)
        end = self.search_end()
        return (5,) if end is None else (5, end + 5)


def measure_step_cost(model: AuxHierarchy, data: Any, rounds: int = 3) -> dict:
    """Forward + backward time and peak memory of C alone and of C + A on one batch.

    The two run interleaved ``rounds`` times (medians kept), then peak memory
    once each; gradients, buffers (BN statistics) and the random state are put
    back, so the training that follows is the one without the measurement.
    """
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batch = model.data_preprocessor(data, True)
    device = next(model.parameters()).device

    def step(loss_fn: Callable[..., dict]) -> None:
        loss, _ = model.parse_losses(loss_fn(batch['inputs'], batch['data_samples']))
        loss.backward()
        model.zero_grad(set_to_none=True)

    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    runs = {'compact': lambda: step(model.model.loss), 'with_aux': lambda: step(model.loss)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            times[key].append(time.perf_counter() - start)
    report = {f'{k}_s': sorted(v)[len(v) // 2] for k, v in times.items()}
    report.update({f'{k}_peak_mib': peak_step_bytes(fn, device) / 2**20 for k, fn in runs.items()})
    model.load_state_dict(buffers)
    torch.set_rng_state(rng)
    for name, param in model.named_parameters():
        param.grad = grads[name]
    return report


def format_cost(phase: str, it: int, cost: dict) -> str:
    """One log line of :func:`measure_step_cost`'s figures."""
    return (f'AuxHierarchy cost ({phase} phase, before iteration {it + 1}; forward + backward '
            f"on one batch, median of 3): {cost['with_aux_s']:.3f} s vs "
            f"{cost['compact_s']:.3f} s for the compact network alone "
            f"(x{cost['with_aux_s'] / cost['compact_s']:.2f}); peak memory "
            f"{cost['with_aux_peak_mib']:.1f} MiB vs {cost['compact_peak_mib']:.1f} MiB "
            f"(x{cost['with_aux_peak_mib'] / max(cost['compact_peak_mib'], 1e-9):.2f})")


@HOOKS.register_module()
class AuxStructureHook(Hook):
    """Write an :class:`AuxHierarchy`'s structure into every checkpoint's meta.

    ``before_save_checkpoint``: ``checkpoint['meta']['aux_structure']`` gets
    :meth:`AuxHierarchy.structure_record` (levels, gates, structure, measured
    cost), so the structure a run found can be read without building the
    model. (The model's buffers hold it too; they are what a resume uses.)
    """

    priority = 'LOW'

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Add the structure record to the checkpoint meta."""
        model = unwrap_model(runner.model)
        if isinstance(model, AuxHierarchy):
            checkpoint.setdefault('meta', {})['aux_structure'] = model.structure_record()
