"""What both analysis tools do per config: pair configs with checkpoints, build the model.

``tools/analysis/gradient_confusion.py`` and ``tools/analysis/loss_landscape.py``
take the same ``CONFIG ... --checkpoint ... --labels ...`` arguments and build
each model the same way; this is that one way.
"""
from __future__ import annotations

import copy
import os.path as osp
import re
import time
from typing import Any, Sequence

from mmengine.config import Config
from torch import nn

from ..datasets_check import check_datasets
from ..errors import ExpandMMError
from .gradient_confusion import build_mm_model_and_loader

NO_CHECKPOINT = ('none', '-')


class RunSettingsError(ExpandMMError, ValueError):
    """Configs, checkpoints, labels or the output path that do not go together."""


def resolve_runs(configs: Sequence[str | Config], checkpoints: Sequence[str] | None,
                 labels: Sequence[str] | None) -> list[dict[str, Any]]:
    """Pair every config with its checkpoint and a unique label.

    Args:
        configs: Config paths or already-built ``Config`` objects.
        checkpoints: ``None``, or one entry per config (``none`` / ``-``: none).
        labels: ``None`` (file stems, numbered when repeated) or one per config.

    Returns:
        ``[{'config': ..., 'checkpoint': ..., 'label': ...}, ...]``.

    Raises:
        RunSettingsError: If the counts of checkpoints or labels do not match the
            configs, or labels repeat.
    """
    if checkpoints is not None and len(checkpoints) != len(configs):
        raise RunSettingsError(
            f'--checkpoint: got {len(checkpoints)} for {len(configs)} configs; give one per '
            'config (`none` for the initialisation), after the configs: CONFIG [CONFIG ...] '
            '--checkpoint CKPT [CKPT ...]')
    if labels is not None and len(labels) != len(configs):
        raise RunSettingsError(f'--labels: got {len(labels)} for {len(configs)} configs')
    if labels is None:
        stems = [osp.splitext(osp.basename(c if isinstance(c, str) else c.filename or
                                           'config'))[0] for c in configs]
        labels = [s if stems.count(s) == 1 else f'{s}#{i}' for i, s in enumerate(stems)]
    if len(set(labels)) != len(labels):
        raise RunSettingsError(f'--labels must be unique, got {labels}')
    ckpts = [None if c is None or c.lower() in NO_CHECKPOINT else c
             for c in (checkpoints or [None] * len(configs))]
    return [dict(config=c, checkpoint=k, label=lab)
            for c, k, lab in zip(configs, ckpts, labels)]


def split_seed_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per checkpoint where a run's checkpoint lists several, comma-separated.

    ``--checkpoint s0.pth,s1.pth,s2.pth`` gives one config the checkpoints of
    several trainings (seeds); each becomes a run of its own, labelled
    ``<label>#<i>`` and carrying ``group=<label>`` (every run has a ``group``:
    its label when it stands alone).

    Args:
        runs: The runs of :func:`resolve_runs`.

    Returns:
        The runs, those with several checkpoints split.
    """
    split = []
    for run in runs:
        checkpoint = run['checkpoint']
        parts = checkpoint.split(',') if checkpoint and ',' in checkpoint else [checkpoint]
        parts = [None if p is None or p.lower() in NO_CHECKPOINT else p for p in parts]
        for i, part in enumerate(parts):
            label = run['label'] if len(parts) == 1 else f'{run["label"]}#{i}'
            split.append(dict(run, checkpoint=part, label=label, group=run['label']))
    return split


def check_run_files(runs: Sequence[dict[str, Any]], out: str) -> None:
    """Check every run's config and checkpoint file, and ``out``, before any work.

    An analysis of several configs takes minutes each; a wrong path found
    after the first one would waste them.

    Raises:
        RunSettingsError: For a missing config file or an ``out`` that is a file.
        CheckpointError: For a missing or unreadable checkpoint (only the
            header is read: memory-mapped), or one saved before the last stage
            of channel planting (its ``*_compact.pth`` is the trained network;
            see
            :func:`~expand_mm.analysis.gradient_confusion.check_checkpoint_fits`).
    """
    from ..checkpoint import read_checkpoint
    from ..planting import refuse_unfinished_planting
    for run in runs:
        if isinstance(run['config'], str) and not osp.isfile(run['config']):
            raise RunSettingsError(f'config {run["config"]!r} does not exist')
        if run['checkpoint'] and '://' not in run['checkpoint']:  # remote: the loader checks
            meta = read_checkpoint(run['checkpoint'], mmap=True).get('meta') or {}
            refuse_unfinished_planting(meta, run['checkpoint'], 'Analyse')
    if osp.exists(out) and not osp.isdir(out):
        raise RunSettingsError(f'--out {out!r} is a file; give a folder (it is created)')


def load_config(config: str | Config, cfg_options: dict | None) -> Config:
    """A private copy of ``config`` with ``cfg_options`` merged."""
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def safe_name(label: str) -> str:
    """``label`` usable as a file name."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', label)


def build_run(run: dict[str, Any], cfg_options: dict | None, seed: int,
              out: str, verbose: bool = False) -> tuple[Config, nn.Module, Any]:
    """The config, model and train loader of one run of :func:`resolve_runs`.

    Checks the config's training data exists, gives the runner a unique
    experiment name (one runner per config in one process: their loggers,
    message hubs and visualisers stay apart) and a work dir under
    ``out/runs/<label>``, and builds as :func:`build_mm_model_and_loader` does.
    Unless ``verbose`` (or a ``log_level`` in ``cfg_options``), the runner logs
    warnings only: its environment table, config dump and per-parameter
    initialisation report, once per config, would bury the tool's own output.
    """
    cfg = load_config(run['config'], cfg_options)
    if not verbose and 'log_level' not in (cfg_options or {}):
        cfg.log_level = 'WARNING'
    check_datasets(cfg, ('train_dataloader',))
    name = safe_name(run['label'])
    cfg.experiment_name = f'{name}_{time.strftime("%Y%m%d_%H%M%S")}'
    model, loader = build_mm_model_and_loader(cfg, run['checkpoint'], seed=seed,
                                              work_dir=osp.join(out, 'runs', name))
    return cfg, model, loader
