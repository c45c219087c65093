"""Where to plant next: rank candidate units by held-out gain per added parameter.

One planting step of the search (Mitsuno et al., ICPR 2020, present planting
as an architecture search; the criterion here is ours): every candidate -- a
unit, or units that must grow together (partners joined by a residual add) --
is planted tentatively, scored, and the planter is put back exactly
(:meth:`~expand_mm.planting.GrowingPlanter.snapshot` / ``restore``). Two
scores, both measured on a held-out split of the training data:

* ``'train'``: train only the new channels for a few iterations on a training
  batch (the old entries frozen, as in the real step), then the held-out loss
  drop divided by the parameters the candidate adds;
* ``'taylor'``: the first-order version of the same, for one backward pass
  per candidate: the new channels' readers start at zero, so the loss drop of
  a gradient step of size ``lr`` on the new entries is ``lr * |g|^2``; the
  score is ``|g|^2`` per added parameter. ``tests/test_planting_search.py``
  checks that both rank a constructed case alike.

The winners grow, subject to a budget (:class:`SearchBudget`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..surgery import path_matches
from .export import narrow_subnet
from .growing import GrowingPlanter, start_width
from .planter import PlantingError

PROBE_MODES = ('taylor', 'train')
BUDGET_KEYS = ('params', 'macs')


@dataclass
class SearchData:
    """What a search step reads from the training setup.

    Attributes:
        trace: Runs the planted model on a fixed batch (outputs only, no grad):
            finds the readers of planted channels and checks the function.
        heldout_loss: The held-out loss (task + distillation), a scalar
            tensor, with gradients when called with ``True``.
        train_loss: A training loss on a fixed training batch (``'train'`` probes).
    """

    trace: Callable[[], Any]
    heldout_loss: Callable[[bool], Tensor]
    train_loss: Callable[[], Tensor] | None = None


@dataclass
class Candidate:
    """Units that grow together in one planting step.

    Attributes:
        name: How the record names it (the pattern, or the unit path).
        units: Paths of its units.
    """

    name: str
    units: list[str]


@dataclass
class CandidateScore:
    """A candidate's tentative planting, measured.

    Attributes:
        candidate: The candidate.
        grow: ``{unit path: channels added}``.
        gain: Held-out loss drop (``'train'``) or first-order gain (``'taylor'``).
        added_params: Parameters the planting adds to the narrow network.
        added_macs: Multiply-accumulates per image it adds.
    """

    candidate: Candidate
    grow: dict[str, int]
    gain: float
    added_params: int
    added_macs: int

    @property
    def score(self) -> float:
        """Gain per added parameter."""
        return self.gain / max(1, self.added_params)


@dataclass
class SearchBudget:
    """When the search stops: a cost budget or a held-out gain below a threshold.

    Args:
        params: Largest parameter count, a fraction of the stock network's.
        macs: Largest multiply-accumulates per image, a fraction of the stock network's.
        min_rel_gain: Stop once a planting round (plant, train) lowered the
            held-out loss by less than this fraction of its value before.
        max_steps: At most this many planting steps.
    """

    params: float | None = None
    macs: float | None = None
    min_rel_gain: float | None = None
    max_steps: int | None = None
    full: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | None) -> 'SearchBudget':
        """Build from a config dict such as ``dict(params=0.5, min_rel_gain=0.01)``.

        Raises:
            PlantingError: On an unknown key or a value out of range.
        """
        cfg = dict(cfg or {})
        known = BUDGET_KEYS + ('min_rel_gain', 'max_steps')
        unknown = [k for k in cfg if k not in known]
        if unknown:
            raise PlantingError(f'budget keys {unknown} are unknown; use {known}, e.g. '
                                'dict(params=0.5)')
        for key in BUDGET_KEYS:
            if cfg.get(key) is not None and not 0 < float(cfg[key]) <= 1:
                raise PlantingError(f'budget {key}={cfg[key]!r} must be a fraction in (0, 1] '
                                    'of the stock network\'s')
        return cls(**cfg)

    def fits(self, cost: Mapping[str, int]) -> bool:
        """Whether a network of ``cost`` is within the cost budget."""
        return all(getattr(self, key) is None or cost[key] <= getattr(self, key) * self.full[key]
                   for key in BUDGET_KEYS)


def make_candidates(planter: GrowingPlanter,
                    groups: Sequence[str | Sequence[str]] | None = None) -> list[Candidate]:
    """The candidates: each unit alone, or the units matching each group of patterns.

    Args:
        planter: The planter (its units).
        groups: Each entry a glob pattern or a list of them; the units matching
            an entry grow together. Units no entry matches are candidates alone.

    Raises:
        PlantingError: If an entry matches no unit, or a unit matches two entries.
    """
    paths = planter.unit_paths()
    taken: dict[str, str] = {}
    candidates = []
    for group in groups or []:
        patterns = [group] if isinstance(group, str) else list(group)
        members = [p for p in paths if path_matches(p, patterns)]
        name = ' + '.join(patterns)
        if not members:
            raise PlantingError(f'candidate group {patterns} matches no planted unit; units '
                                f'are e.g. {paths[:4]}')
        twice = [p for p in members if p in taken]
        if twice:
            raise PlantingError(f'unit {twice[0]!r} is in candidate groups {taken[twice[0]]!r} '
                                f'and {name!r}: each unit may grow with one group only')
        taken.update({p: name for p in members})
        candidates.append(Candidate(name, members))
    candidates += [Candidate(p, [p]) for p in paths if p not in taken]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(candidates, key=lambda c: order[c.units[0]])


def growth_of(planter: GrowingPlanter, candidate: Candidate, step_fraction: float
              ) -> dict[str, int]:
    """Channels each of the candidate's units gains: ``step_fraction`` of its width (>= 1).

    Units already full gain none.
    """
    full = {u.path: u.conv.out_channels for u in planter.units}
    now = planter.widths()
    return {p: min(full[p] - now[p], start_width(full[p], step_fraction))
            for p in candidate.units if now[p] < full[p]}


def _taylor_gain(planter: GrowingPlanter, data: SearchData) -> float:
    params = [p for p in planter.model.parameters() if p.requires_grad]
    training = planter.model.training
    planter.model.eval()
    try:
        loss = data.heldout_loss(True)
        # The frozen entries' gradient hooks zero them: only the new entries count.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        planter.model.train(training)
    return float(sum(g.double().square().sum() for g in grads if g is not None))


def _trained_gain(planter: GrowingPlanter, data: SearchData, iters: int, lr: float) -> float:
    if data.train_loss is None:
        raise PlantingError("probe='train' needs a training batch (SearchData.train_loss)")
    with torch.no_grad():
        before = float(_eval_loss(planter, data))
    params = [p for p in planter.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    planter.model.train()
    for _ in range(iters):
        optimizer.zero_grad(set_to_none=True)
        data.train_loss().backward()
        optimizer.step()
        planter.restore_frozen()
    with torch.no_grad():
        after = float(_eval_loss(planter, data))
    return before - after


def _eval_loss(planter: GrowingPlanter, data: SearchData) -> Tensor:
    training = planter.model.training
    planter.model.eval()
    try:
        return data.heldout_loss(False)
    finally:
        planter.model.train(training)


def score_candidate(planter: GrowingPlanter, candidate: Candidate, data: SearchData,
                    step_fraction: float, mode: str = 'taylor', iters: int = 5,
                    lr: float = 1e-3) -> CandidateScore | None:
    """Plant ``candidate`` tentatively, measure it, and put everything back.

    Args:
        planter: The planter at the current step.
        candidate: What to plant.
        data: Batches and losses (:class:`SearchData`).
        step_fraction: Channels added per unit, a fraction of its full width.
        mode: ``'taylor'`` or ``'train'`` (see the module docstring).
        iters: Training iterations of a ``'train'`` probe.
        lr: Adam learning rate of a ``'train'`` probe.

    Returns:
        The score, or None when the candidate's units are full.

    Raises:
        PlantingError: If planting the candidate alone changes the function
            (its channels reach an output through a residual add or a linear
            layer): the message names the candidate's units.
    """
    if mode not in PROBE_MODES:
        raise PlantingError(f'probe={mode!r} must be one of {PROBE_MODES}')
    grow = growth_of(planter, candidate, step_fraction)
    if not grow:
        return None
    before = planter.narrow_cost()
    snapshot = planter.snapshot()
    try:
        try:
            planter.plant(grow, data.trace)
        except PlantingError as err:
            raise PlantingError(
                f'unit(s) {candidate.units} cannot be planted on their own: their channels '
                'reach an output other than through a conv that reads them (a residual add, '
                'a linear layer). Plant them with their partners (candidates=[[...]] in one '
                f'group) or exclude them. ({err})') from err
        after = planter.narrow_cost()
        gain = (_taylor_gain(planter, data) if mode == 'taylor'
                else _trained_gain(planter, data, iters, lr))
    finally:
        planter.restore(snapshot)
    return CandidateScore(candidate, grow, gain, after['params'] - before['params'],
                          after['macs'] - before['macs'])


def check_candidates(planter: GrowingPlanter, candidates: Sequence[Candidate],
                     step_fraction: float, trace: Callable[[], Any],
                     probe_shape: Sequence[int]) -> None:
    """Plant each candidate once, tentatively, and build its narrow network; undo both.

    Catches, before any training, a unit whose channels cannot grow on their
    own: one feeding a linear layer (planting would change the function), or
    one joined to another unit by a residual add (the masked network accepts
    it, but the narrow network's add would join tensors of other widths).

    Raises:
        PlantingError: Naming the candidate's units and what would work.
    """
    for candidate in candidates:
        grow = growth_of(planter, candidate, step_fraction)
        if not grow:
            continue
        snapshot = planter.snapshot()
        try:
            planter.plant(grow, trace)
            narrow_subnet(planter, probe_shape)
        except PlantingError as err:
            raise PlantingError(
                f'unit(s) {candidate.units} cannot be planted on their own: their channels '
                'reach an output other than through a conv that reads them (a residual add, a '
                'linear layer). Put them in one candidate group with their partners '
                f'(candidates=[[...]]) or exclude them. ({err})') from err
        finally:
            planter.restore(snapshot)


def rank_candidates(planter: GrowingPlanter, candidates: Sequence[Candidate], data: SearchData,
                    step_fraction: float, mode: str = 'taylor', iters: int = 5,
                    lr: float = 1e-3) -> list[CandidateScore]:
    """Every growable candidate's score, best (highest gain per added parameter) first.

    Ties keep the candidates' order, so a search repeats its choices exactly.
    """
    scores = [score_candidate(planter, c, data, step_fraction, mode, iters, lr)
              for c in candidates]
    return sorted((s for s in scores if s is not None), key=lambda s: -s.score)


def choose(ranked: Sequence[CandidateScore], cost: Mapping[str, int], budget: SearchBudget,
           count: int = 1) -> list[CandidateScore]:
    """The best ``count`` candidates that together keep the network within ``budget``.

    Only candidates with a positive gain are chosen.
    """
    chosen: list[CandidateScore] = []
    total = dict(cost)
    for score in ranked:
        if len(chosen) == count or score.gain <= 0:
            break
        grown = dict(params=total['params'] + score.added_params,
                     macs=total['macs'] + score.added_macs)
        if budget.fits(grown):
            chosen.append(score)
            total = grown
    return chosen


class PlantingSearch:
    """The search's loop body: measure, stop or choose, plant; and its record.

    Args:
        planter: The planter, started (masks on, readers traced).
        candidates: What may grow (:func:`make_candidates`).
        budget: When to stop (its ``full`` cost is set here from the planter).
        step_fraction: Channels a unit gains per step, a fraction of its full width.
        probe: ``'taylor'`` or ``'train'``.
        units_per_step: Candidates planted per step (the best ones that fit).
        probe_iters: Iterations of a ``'train'`` probe.
        probe_lr: Adam learning rate of a ``'train'`` probe.
    """

    def __init__(self, planter: GrowingPlanter, candidates: Sequence[Candidate],
                 budget: SearchBudget, step_fraction: float = 0.125, probe: str = 'taylor',
                 units_per_step: int = 1, probe_iters: int = 5, probe_lr: float = 1e-3) -> None:
        if probe not in PROBE_MODES:
            raise PlantingError(f'probe={probe!r} must be one of {PROBE_MODES}')
        if not 0 < float(step_fraction) <= 1:
            raise PlantingError(f'step_fraction={step_fraction!r} must be in (0, 1], e.g. 0.125')
        self.planter = planter
        self.candidates = list(candidates)
        self.budget = budget
        self.step_fraction = float(step_fraction)
        self.probe = probe
        self.units_per_step = int(units_per_step)
        self.probe_iters = int(probe_iters)
        self.probe_lr = float(probe_lr)
        self.record: list[dict] = []
        self.stopped: str | None = None
        budget.full = planter.full_cost()

    def point(self, heldout_loss: float, **extra: Any) -> dict:
        """A record entry: the network now, its held-out loss and cost."""
        cost = self.planter.narrow_cost()
        full = self.budget.full
        return dict(step=self.planter.stage, heldout_loss=float(heldout_loss),
                    params=cost['params'], macs=cost['macs'],
                    params_fraction=cost['params'] / max(1, full['params']),
                    macs_fraction=cost['macs'] / max(1, full['macs']),
                    widths=self.planter.widths(), **extra)

    def _gain_too_small(self, loss: float) -> bool:
        if self.budget.min_rel_gain is None or not self.record:
            return False
        before = self.record[-1]['heldout_loss']
        return (before - loss) < self.budget.min_rel_gain * abs(before)

    def step(self, data: SearchData, **extra: Any) -> list[CandidateScore]:
        """One planting step; returns what was planted (empty once stopped: see ``stopped``).

        Measures the held-out loss of the network trained so far, stops if the
        last round gained too little or the step limit is reached, ranks the
        candidates, plants the best ones that fit the budget (stops if none
        does) and records the step.
        """
        if self.stopped:
            return []
        with torch.no_grad():
            loss = float(_eval_loss(self.planter, data))
        entry = self.point(loss, **extra)
        if self._gain_too_small(loss):
            self.stopped = 'gain'
        elif self.budget.max_steps is not None and self.planter.stage >= self.budget.max_steps:
            self.stopped = 'max_steps'
        if self.stopped:
            self.record.append(dict(entry, grown=[], stopped=self.stopped))
            return []
        ranked = rank_candidates(self.planter, self.candidates, data, self.step_fraction,
                                 self.probe, self.probe_iters, self.probe_lr)
        chosen = choose(ranked, self.planter.narrow_cost(), self.budget, self.units_per_step)
        entry['scores'] = {s.candidate.name: s.score for s in ranked}
        if not chosen:
            # Nothing left to grow, nothing that helps, or nothing helpful that fits.
            self.stopped = ('full' if not ranked else
                            'gain' if all(s.gain <= 0 for s in ranked) else 'budget')
            self.record.append(dict(entry, grown=[], stopped=self.stopped))
            return []
        grow: dict[str, int] = {}
        for score in chosen:
            grow.update(score.grow)
        self.planter.plant(grow, data.trace)
        self.record.append(dict(entry, grown=[s.candidate.name for s in chosen], added=grow))
        return chosen

    def state(self) -> dict:
        """What a checkpoint keeps to resume the search (plain builtins)."""
        return dict(history=self.planter.history(), record=self.record, stopped=self.stopped)

    def load_state(self, state: Mapping[str, Any], trace: Callable[[], Any]) -> None:
        """Continue from :meth:`state`: the planter's widths of every step, the record."""
        self.planter.resume(state['history'], trace)
        self.record = [dict(e) for e in state.get('record', [])]
        self.stopped = state.get('stopped')
