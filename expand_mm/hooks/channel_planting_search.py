"""``ChannelPlantingSearchHook``: channel planting that chooses where to grow (MMEngine loop)."""
from __future__ import annotations

import copy
import json
import os.path as osp
from typing import Any, Sequence

import torch
from mmengine.config import Config
from mmengine.dataset import BaseDataset, RepeatDataset, pseudo_collate
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..compat import plain_builtins
from ..models.deployable import deployable_model, deployable_model_cfg
from ..planting import (FREEZE_MODES, GrowingPlanter, PlantingError, PlantingSearch,
                        SearchBudget, SearchData, make_candidates, narrow_subnet,
                        subnet_model_cfg)
from ..planting.search import PROBE_MODES, check_candidates
from .channel_planting import model_probe, restore_frozen_after_steps
from .rng_state import rebuild_batch_iterator

RECORD_FILE = 'planting_search.json'
PLOT_FILE = 'planting_search.png'
SUBNET_CONFIG = 'planted_subnet.py'
SUBNET_CHECKPOINT = 'planted_subnet.pth'
META_KEY = 'channel_planting_search'


def _unwrapped(model: Any) -> Any:
    return model.module if is_model_wrapper(model) else model


def carve_heldout(runner, num_samples: int, seed: int, batch_size: int) -> list:
    """Take ``num_samples`` samples out of the training data: the search's held-out batches.

    The train loop's dataloader is rebuilt (same settings) on the other
    samples, so training never sees the held-out ones; the validation set
    stays what is reported. Deterministic for a given ``seed`` (a resumed run
    carves the same split).

    Returns:
        The held-out samples, collated into batches of ``batch_size``.

    Raises:
        PlantingError: If the training set is not larger than ``num_samples``.
    """
    loop = runner.train_loop
    dataset = loop.dataloader.dataset
    # A RepeatDataset (mmdet's YOLOv3 configs) is split inside and wrapped again.
    inner = dataset.dataset if isinstance(dataset, RepeatDataset) else dataset
    if not isinstance(inner, BaseDataset) or len(inner) <= num_samples:
        raise PlantingError(
            f'ChannelPlantingSearchHook: heldout.num_samples={num_samples} needs an MMEngine '
            f'BaseDataset (or a RepeatDataset of one) with more training samples (got '
            f'{type(inner).__name__} of {len(inner) if hasattr(inner, "__len__") else "?"})')
    order = torch.randperm(len(inner), generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:num_samples]), sorted(order[num_samples:])
    heldout = inner.get_subset(held)
    training = inner.get_subset(kept)
    if inner is not dataset:
        training = RepeatDataset(training, dataset.times)
    cfg = copy.deepcopy(runner.cfg.train_dataloader)
    cfg['dataset'] = training
    loop.dataloader = runner.build_dataloader(cfg, seed=runner.seed)
    rebuild_batch_iterator(loop)  # keeps RNGStateHook's wrapper around it
    samples = [heldout[i] for i in range(len(heldout))]
    return [pseudo_collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def batch_loss(model: Any, batch: Any) -> torch.Tensor:
    """The model's total loss (task + distillation) on a batch, in its current mode."""
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    return loss


def _check_positive_int(name: str, value: Any, meaning: str) -> None:
    """Refuses ``value`` for the hook argument ``name`` unless it is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlantingError(f'ChannelPlantingSearchHook: {name}={value!r} must be a positive '
                            f'int ({meaning})')


@HOOKS.register_module()
class ChannelPlantingSearchHook(Hook):
    """Grow the deployable model's channels where they help most, up to a budget.

    Channel planting as an architecture search (Mitsuno et al., ICPR 2020): the
    selected units (mmcv ``ConvModule``) start with ``start_fraction`` of their
    channels (the rest masked: the narrow network); at iteration ``begin`` and
    every ``interval`` iterations after, the candidates are ranked by held-out
    gain per added parameter
    (:mod:`expand_mm.planting.search`), the best ones gain ``step_fraction``
    of their width, the function is kept and everything that existed is
    frozen; the new channels train (with the teacher when the model is a
    ``Distiller``). The search stops at the budget (parameters or MACs, a
    fraction of the stock network) or when a round gains less than
    ``budget.min_rel_gain`` on the held-out data; training goes on to the
    configured end with the widths found.

    Acts at:

    - ``before_train``: carves ``heldout.num_samples`` samples out of the
      training set (the loop's dataloader is rebuilt without them), selects
      the units, hooks the optimizer's step (frozen entries are restored);
    - the first ``before_train_iter``: applies the start widths (or, after a
      resume, every recorded step) and checks that every candidate can be
      planted on its own (else names its units);
    - ``after_train_iter``: a planting step at ``begin`` and every
      ``interval`` iterations after;
    - ``before_save_checkpoint``: the search's state in
      ``meta['channel_planting_search']`` (resumes with the same choices) and
      ``meta['channel_planting']`` (the compact copy is the narrow network of
      the step, zero-filled, stock shapes);
    - ``after_train``: writes ``planting_search.json`` / ``.png`` (held-out loss
      against parameters per step) and the network found with its never-planted
      channels removed: ``planted_subnet.py`` + ``planted_subnet.pth``, which
      load strictly through the stock ``init_detector`` / ``init_model``.

    Args:
        include: Glob patterns of the units to plant, e.g. ``['backbone.*', 'neck.*']``.
        start_fraction: Planted fraction of each unit at the start.
        step_fraction: Fraction of a unit's full width planted per step.
        interval: Iterations between planting steps.
        begin: Iteration of the first step (default: ``interval``). The paper
            trains the initial narrow network before planting into it; with
            ``freeze='all'`` a first step during the warm-up freezes an
            untrained network for the rest of the run.
        budget: ``dict(params=f)`` and / or ``macs=f`` (fractions of the stock
            network), ``min_rel_gain``, ``max_steps``.
        candidates: Groups of glob patterns whose units grow together
            (partners joined by a residual add); other units grow alone.
        exclude: Units kept at full width.
        probe: ``'taylor'`` (first-order held-out gain) or ``'train'`` (a short
            training of the new channels, then the held-out loss drop).
        units_per_step: Candidates planted per step.
        probe_iters: Iterations of a ``'train'`` probe.
        probe_lr: Its Adam learning rate.
        heldout: ``dict(num_samples=64, seed=0, batch_size=16)``.
        freeze: ``'all'`` (the paper) or ``'none'``.
        export: Whether ``after_train`` writes the narrow subnet.
        verify_rtol: Largest accepted relative change of outputs at a step.
    """

    priority = 'NORMAL'

    def __init__(self, include: Sequence[str], start_fraction: float = 0.25,
                 step_fraction: float = 0.125, interval: int = 100,
                 budget: dict | None = None, candidates: Sequence | None = None,
                 exclude: Sequence[str] | None = None, probe: str = 'taylor',
                 units_per_step: int = 1, probe_iters: int = 5, probe_lr: float = 1e-3,
                 heldout: dict | None = None, freeze: str = 'all', export: bool = True,
                 verify_rtol: float = 1e-5, begin: int | None = None) -> None:
        _check_positive_int('interval', interval, 'iterations between planting steps')
        begin = interval if begin is None else begin
        _check_positive_int('begin', begin, 'the iteration of the first planting step')
        if probe not in PROBE_MODES:
            raise PlantingError(f'ChannelPlantingSearchHook: probe={probe!r} must be one of '
                                f'{PROBE_MODES}')
        if freeze not in FREEZE_MODES:
            raise PlantingError(f'ChannelPlantingSearchHook: freeze={freeze!r} must be one of '
                                f'{FREEZE_MODES}')
        self.budget_cfg = plain_builtins(dict(budget or dict(params=0.5)))
        SearchBudget.from_cfg(self.budget_cfg)  # validates
        heldout = {**dict(num_samples=64, seed=0, batch_size=16), **dict(heldout or {})}
        unknown = set(heldout) - {'num_samples', 'seed', 'batch_size'}
        if unknown:
            raise PlantingError(f'ChannelPlantingSearchHook: heldout keys {sorted(unknown)} are '
                                'unknown; use num_samples, seed, batch_size')
        self.include = [include] if isinstance(include, str) else list(include)
        self.exclude = list(exclude or [])
        self.start_fraction = float(start_fraction)
        self.step_fraction = float(step_fraction)
        self.interval = interval
        self.begin = begin
        self.candidate_groups = plain_builtins(list(candidates or []))
        self.probe = probe
        self.units_per_step = units_per_step
        self.probe_iters = probe_iters
        self.probe_lr = probe_lr
        self.heldout_cfg = heldout
        self.freeze = freeze
        self.export = export
        self.verify_rtol = verify_rtol
        self.planter: GrowingPlanter | None = None
        self.search: PlantingSearch | None = None
        self.heldout: list = []
        self._resumed: dict | None = None

    # ------------------------------------------------------------------- set-up
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the search state of a resumed checkpoint for the first iteration."""
        self._resumed = (checkpoint.get('meta') or {}).get(META_KEY)

    def before_train(self, runner) -> None:
        """Carve the held-out split, select the units, hook the optimizer's step."""
        self.heldout = carve_heldout(runner, self.heldout_cfg['num_samples'],
                                     self.heldout_cfg['seed'], self.heldout_cfg['batch_size'])
        model = deployable_model(runner.model)
        self.planter = GrowingPlanter(model, self.include, self.start_fraction, self.exclude,
                                      self.freeze, self.verify_rtol)
        restore_frozen_after_steps(runner, self.planter, type(self).__name__)
        planter = self.planter
        self.search = None
        runner.logger.info(
            f'ChannelPlantingSearchHook: {len(planter.units)} units start at '
            f'{self.start_fraction:.0%} of their channels; steps at iteration {self.begin} '
            f'and every {self.interval} iterations after, budget {self.budget_cfg}, '
            f'probe {self.probe!r}, {self.heldout_cfg["num_samples"]} training samples held out')

    def _search_data(self, runner, train_batch: Any = None) -> SearchData:
        """The held-out losses and the tracing batch (the first held-out one) of this run."""
        whole = _unwrapped(runner.model)
        trace = model_probe(self.planter.model, self.heldout[0])

        def heldout_loss(with_grad: bool) -> torch.Tensor:
            with torch.set_grad_enabled(with_grad):
                return sum(batch_loss(whole, b) for b in self.heldout) / len(self.heldout)

        train_loss = (lambda: batch_loss(whole, train_batch)) if train_batch is not None else None
        return SearchData(trace, heldout_loss, train_loss)

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        """On the first iteration, apply the start widths or the resumed steps."""
        if self.search is not None:
            return
        planter = self.planter
        data = self._search_data(runner)
        planter.start(0, data.trace)
        planter.record_spatial_sizes(data.trace)
        self.search = PlantingSearch(
            planter, make_candidates(planter, self.candidate_groups),
            SearchBudget.from_cfg(self.budget_cfg), self.step_fraction, self.probe,
            self.units_per_step, self.probe_iters, self.probe_lr)
        check_candidates(planter, self.search.candidates, self.step_fraction, data.trace,
                         self._probe_shape())
        if self._resumed:
            self.search.load_state(self._resumed, data.trace)
        self._log(runner, 'resumed at' if self._resumed else 'starting at')

    # --------------------------------------------------------------------- steps
    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """At ``begin`` and every ``interval`` iterations after (before the last), one step."""
        done = runner.iter + 1
        if (done < self.begin or (done - self.begin) % self.interval
                or done >= runner.max_iters or self.search.stopped):
            return
        whole = _unwrapped(runner.model)
        grads = {p: p.grad for p in whole.parameters()}
        chosen = self.search.step(self._search_data(runner, data_batch), iter=done)
        for param, grad in grads.items():  # the probes leave the run's gradients as they were
            param.grad = grad
        entry = self.search.record[-1]
        what = (f'planted {entry["grown"]} ({entry["added"]})' if chosen
                else f'search stopped ({self.search.stopped})')
        runner.logger.info(f'ChannelPlantingSearchHook: iteration {done}: held-out loss '
                           f'{entry["heldout_loss"]:.4f} at {entry["params"]:,} parameters; '
                           f'{what}')
        self._write_record(runner)

    def _log(self, runner, what: str) -> None:
        cost, full = self.planter.narrow_cost(), self.planter.full_cost()
        runner.logger.info(
            f'ChannelPlantingSearchHook: {what} step {self.planter.stage}: '
            f'{cost["params"]:,} of {full["params"]:,} parameters '
            f'({cost["params"] / max(1, full["params"]):.1%}), widths {self.planter.widths()}; '
            f'{self.planter.num_trainable_entries():,} parameter entries train')

    # -------------------------------------------------------------------- record
    def _write_record(self, runner, final: dict | None = None) -> None:
        record = dict(budget=self.budget_cfg, full=self.search.budget.full,
                      full_widths={u.path: u.conv.out_channels for u in self.planter.units},
                      stopped=self.search.stopped, steps=self.search.record, final=final)
        with open(osp.join(runner.work_dir, RECORD_FILE), 'w') as f:
            json.dump(plain_builtins(record), f, indent=1)
        points = self.search.record + ([final] if final else [])
        _plot(points, osp.join(runner.work_dir, PLOT_FILE))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Record the search state, and the masks for the compact copy, in ``meta``."""
        if self.search is None:
            return
        planter = self.planter
        meta = checkpoint.setdefault('meta', {})
        meta[META_KEY] = plain_builtins(self.search.state())
        # Read by the compact-copy writers as a stage before the last: masked channels zeroed.
        meta['channel_planting'] = plain_builtins(dict(
            stage=planter.stage, stages=planter.fractions[:planter.stage + 1] + [1.0],
            widths=planter.widths(), masked_entries=planter.masked_entries()))

    def after_train(self, runner) -> None:
        """Write the record and plot, and export the narrow network found."""
        if self.search is None:
            return
        data = self._search_data(runner)
        with torch.no_grad():
            whole = _unwrapped(runner.model)
            training = whole.training
            whole.eval()
            loss = float(data.heldout_loss(False))
            whole.train(training)
        final = self.search.point(loss, iter=runner.iter, final=True)
        self._write_record(runner, final)
        if self.export:
            self._export(runner)

    def _export(self, runner) -> None:
        narrow, state, shapes = narrow_subnet(self.planter, self._probe_shape())
        cfg = Config(copy.deepcopy(runner.cfg._cfg_dict.to_dict()))
        cfg.model = subnet_model_cfg(deployable_model_cfg(runner.cfg.model), shapes)
        cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                            if h.get('type') != type(self).__name__]
        cfg.load_from, cfg.resume = None, False
        cfg.pop('work_dir', None)
        cfg.dump(osp.join(runner.work_dir, SUBNET_CONFIG))
        dataset_meta = getattr(self.planter.model, 'dataset_meta', None) or \
            getattr(runner.train_loop.dataloader.dataset, 'metainfo', None)
        torch.save(dict(state_dict=state, meta=plain_builtins(dict(
            dataset_meta=dataset_meta, expand_mm=dict(planted_subnet=dict(
                widths=self.planter.widths(), cost=self.planter.narrow_cost()))))),
            osp.join(runner.work_dir, SUBNET_CHECKPOINT))
        runner.logger.info(
            f'ChannelPlantingSearchHook: wrote {SUBNET_CONFIG} + {SUBNET_CHECKPOINT} in '
            f'{runner.work_dir}: {sum(p.numel() for p in narrow.parameters()):,} parameters, '
            'never-planted channels removed')

    def _probe_shape(self) -> tuple:
        """One image of the first held-out batch as the model sees it (padded, preprocessed)."""
        with torch.no_grad():
            inputs = self.planter.model.data_preprocessor(self.heldout[0], False)['inputs']
        return (1,) + tuple(inputs.shape[1:])


def _plot(points: list[dict], path: str) -> None:
    """Held-out loss against parameters, one point per step."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p['params'] for p in points], [p['heldout_loss'] for p in points], 'o-')
    for p in points:
        label = 'end' if p.get('final') else ','.join(p.get('grown', [])) or p.get('stopped', '')
        ax.annotate(label[:24], (p['params'], p['heldout_loss']), fontsize=6)
    ax.set_xlabel('parameters of the planted network')
    ax.set_ylabel('held-out loss (task + distillation)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
