"""From an expanded training checkpoint to a stock compact checkpoint.

Shared by :class:`~expand_mm.hooks.ContractCheckpointHook` (on every save) and
``tools/contract.py`` (after the fact).

Training-time wrappers (a distiller, an auxiliary-branch model) hold the
deployable network as a submodule and name it through the
``deployable_model() -> nn.Module`` protocol (see
:func:`~expand_mm.models.deployable_model`). Their checkpoints carry the
wrapper's keys (``student.backbone...``, ``teacher.*``, ``aux_head.*``); the
deployable part's entries are found through the module's path in the wrapper
(:func:`find_deployable`), never by guessing attribute names.
"""
from __future__ import annotations

import copy
import os
import os.path as osp
from typing import Any, Sequence

import torch
from mmengine.model import BaseModel, is_model_wrapper
from torch import nn

from .checkpoint import (NONLINEAR_INIT_META_KEY, CheckpointError, match_state_dict,
                         prepare_output_path, read_checkpoint, strip_prefix)
from .models.expandnet import deployable_model
from .surgery import check_contraction, contract_model_, expanded_layers

DEFAULT_PROBE_SHAPE = (1, 3, 128, 128)


def compact_checkpoint_path(path: str, suffix: str = '_compact') -> str:
    """``work_dir/epoch_12.pth`` -> ``work_dir/epoch_12_compact.pth``."""
    stem, ext = osp.splitext(path)
    return f'{stem}{suffix}{ext or ".pth"}'


def probe_forward(model: nn.Module, inputs: torch.Tensor) -> Any:
    """Raw network outputs: ``mode='tensor'`` for MMEngine models, a call otherwise."""
    if isinstance(model, BaseModel):
        return model(inputs, mode='tensor')
    return model(inputs)


def count_macs(model: nn.Module, img_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward of one ``(3, H, W)`` image.

    mmengine's ``FlopAnalyzer`` (a jit trace of ``model(x)``, i.e.
    ``mode='tensor'`` for MMEngine models: network only) in the model's current
    train / eval state and expand mode, on its device and dtype; it counts one
    multiply-add as one flop. The model is not modified.

    Args:
        model: Any module taking a ``(1, 3, H, W)`` tensor.
        img_size: ``(H, W)``.
    """
    import warnings

    from mmengine.analysis import FlopAnalyzer
    param = next(model.parameters())
    inputs = (torch.zeros(1, 3, *img_size, device=param.device, dtype=param.dtype),)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # jit tracer warnings about data-dependent code
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        return int(analyzer.total())


def make_probe(model: nn.Module, shape: Sequence[int] = DEFAULT_PROBE_SHAPE) -> torch.Tensor:
    """A fixed pseudo-random input on the model's device (seeded: reproducible)."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP-style model wrappers (``MMDistributedDataParallel``, ...)."""
    while is_model_wrapper(model):
        model = model.module
    return model


def find_deployable(model: nn.Module) -> tuple[nn.Module, str]:
    """The deployable network of ``model`` and its state-dict prefix in ``model``.

    The deployable network is :func:`~expand_mm.models.deployable_model`'s (a
    wrapper names it through its ``deployable_model()`` method); its prefix is
    its path among the unwrapped model's ``named_modules()``, found by
    identity, so a wrapper may keep it under any attribute, at any depth
    (``'student.'``, ``'student.model.'``).

    Args:
        model: A plain model, an ExpandNet, a training-time wrapper, possibly
            inside a DDP-style model wrapper.

    Returns:
        ``(deployable, prefix)``; ``prefix`` is ``''`` when the model is its
        own deployable network, else ends with ``'.'``.

    Raises:
        ValueError: If the wrapper's ``deployable_model()`` is not one of its
            submodules (its weights would not be in the checkpoint).
    """
    root = unwrap_model(model)
    target = deployable_model(root)
    if target is root:
        return target, ''
    for path, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return target, path + '.'
    raise ValueError(
        f'{type(root).__name__}.deployable_model() returned a {type(target).__name__} that '
        f'is not a submodule of the {type(root).__name__}: the wrapper must hold the '
        'deployable network as a submodule (an nn.Module attribute, e.g. self.student) so '
        'that its weights are in the training checkpoint')


def deployable_state_dict(model: nn.Module, state_dict: dict,
                          source: str = 'checkpoint') -> dict:
    """The entries of ``state_dict`` that belong to ``model``'s deployable network.

    For a plain model or an ExpandNet this is ``state_dict`` itself (without a
    DDP ``module.`` prefix); for a training-time wrapper it is the entries under
    the deployable network's prefix, with the prefix removed (the teacher's,
    the adapters' and the auxiliary branch's entries are dropped).

    Args:
        model: The model (or wrapper) the state dict was saved from.
        state_dict: Its state dict (keys may carry a DDP ``module.`` prefix).
        source: Name used in error messages (e.g. the file path).

    Raises:
        CheckpointError: If no key has the deployable network's prefix.
    """
    state_dict = strip_prefix(state_dict)
    _, prefix = find_deployable(model)
    if not prefix:
        return state_dict
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(
            f'{source} has no key under {prefix!r}, where {type(unwrap_model(model)).__name__} '
            f'keeps its deployable network (keys start with e.g. {sorted(state_dict)[:3]}). '
            'Use a training checkpoint (iter_N.pth / epoch_N.pth) of this config')
    return selected


def contract_state_dict(model: nn.Module, state_dict: dict, probe_shape=DEFAULT_PROBE_SHAPE,
                        rtol: float = 1e-4, verify: bool = True
                        ) -> tuple[dict, dict[str, float] | None]:
    """The compact weights of the deployable network in ``state_dict``.

    ``model`` only provides the architecture: its deployable network (see
    :func:`find_deployable`) is deep-copied, its entries of ``state_dict`` are
    loaded into the copy (strictly), and the copy is contracted. A
    training-time wrapper around a network without expanded layers (a
    distiller with a plain compact student) needs no contraction: its
    deployable entries, checked against the network's keys and shapes, are the
    compact checkpoint as they are.

    Args:
        model: The expanded model, or a wrapper of it (see
            :func:`~expand_mm.models.deployable_model`).
        state_dict: Weights of that model (for a wrapper: with its keys).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``(compact_state_dict, errors)``; ``errors`` is None without ``verify``
        and when there was nothing to contract.

    Raises:
        ValueError: If ``model`` is neither expanded nor a wrapper.
        CheckpointError: If the entries do not fit the deployable network.
        RuntimeError: If the check finds an error above ``rtol`` that is not
            float32 rounding (see :func:`~expand_mm.surgery.check_contraction`).
    """
    deployable, prefix = find_deployable(model)
    state_dict = deployable_state_dict(model, state_dict)
    if not expanded_layers(deployable):
        if not prefix:
            raise ValueError(f'{type(deployable).__name__} has no expanded layer and is not a '
                             'training-time wrapper: nothing to contract')
        # Nothing to contract: the check is that the entries fit the network.
        match_state_dict(deployable, state_dict, source=f'the {prefix!r} entries')
        return {k: v.detach().cpu() for k, v in state_dict.items()}, None
    expanded = copy.deepcopy(deployable)
    match_state_dict(expanded, state_dict)
    expanded.load_state_dict(state_dict, strict=True)
    compact = contract_model_(copy.deepcopy(expanded))
    errors = None
    if verify:
        try:
            errors = check_contraction(expanded, compact, make_probe(expanded, probe_shape),
                                       forward_fn=probe_forward, rtol=rtol)
        except RuntimeError as err:
            raise RuntimeError(f'{err}; refusing to write a compact model that does not '
                               'compute what the trained one does') from err
    return {k: v.detach().cpu() for k, v in compact.state_dict().items()}, errors


def unfinished_planting(meta: dict) -> str | None:
    """Why a checkpoint saved during channel planting has no stock compact form, or None.

    Before the last stage the trained network masks its unplanted channels
    (forward hooks, not weights); the stock network of its state dict would
    run them. Read from the ``channel_planting`` entry ChannelPlantingHook
    writes into ``meta``.
    """
    planting = meta.get('channel_planting')
    if not isinstance(planting, dict):
        return None
    stage, stages = planting.get('stage'), planting.get('stages') or ()
    if stage is None or stage >= len(stages) - 1:
        return None
    return (f'was saved at channel-planting stage {stage + 1} of {len(stages)}, while the '
            'unplanted channels are masked by hooks: the stock compact network of its '
            'weights would run them, so it has no compact equivalent')


def write_compact_checkpoint(model: nn.Module, src: str, dst: str | None = None,
                             probe_shape=DEFAULT_PROBE_SHAPE, rtol: float = 1e-4,
                             verify: bool = True) -> tuple[str, dict[str, float] | None]:
    """Read the training checkpoint ``src`` and write its compact form to ``dst``.

    The compact checkpoint holds ``state_dict`` (stock keys, loads with
    ``strict=True`` into the stock compact config) and ``meta`` (the source's
    ``dataset_meta``, epoch and iter, plus an ``expand_mm`` entry naming the
    source and the verified error). When EMA was on, the source's
    ``state_dict`` already holds the EMA weights (MMEngine's ``EMAHook`` swaps
    them in before saving), so the compact model is the contracted EMA model.
    For a training-time wrapper only its deployable network is written (see
    :func:`contract_state_dict`); ``meta['expand_mm']`` names the wrapper and
    the prefix the entries were taken from.

    Args:
        model: The model the checkpoint was saved from (architecture only).
        src: The training checkpoint.
        dst: Where to write (default: ``src`` with ``_compact`` added).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``(dst, errors)``; ``errors`` is None without ``verify`` and when the
        deployable network had nothing to contract.
    """
    dst = prepare_output_path(src, dst or compact_checkpoint_path(src))
    checkpoint = read_checkpoint(src)
    if (checkpoint.get('meta') or {}).get(NONLINEAR_INIT_META_KEY):
        raise CheckpointError(
            f'{src} was saved during the nonlinear phase of NonlinearInitHook (a nonlinearity '
            'between the sub-layers of every expanded layer): it has no compact equivalent. '
            'Contract a checkpoint saved after the hook\'s `end`')
    unfinished = unfinished_planting(checkpoint.get('meta') or {})
    if unfinished:
        raise CheckpointError(f'{src} {unfinished}; contract a checkpoint saved at the last '
                              'stage')
    state_dict, errors = contract_state_dict(model, checkpoint['state_dict'], probe_shape,
                                             rtol, verify)
    src_meta = checkpoint.get('meta') or {}
    meta = {k: src_meta[k] for k in ('epoch', 'iter', 'dataset_meta', 'mmengine_version',
                                     'experiment_name', 'seed') if k in src_meta}
    deployable, prefix = find_deployable(model)
    meta['expand_mm'] = dict(source=osp.abspath(src), contraction_error=errors,
                             expandnet_cfg=getattr(deployable, 'expandnet_cfg', None),
                             wrapper=type(unwrap_model(model)).__name__ if prefix else None,
                             deployable_prefix=prefix)
    tmp = dst + '.tmp'
    torch.save({'meta': meta, 'state_dict': state_dict}, tmp)
    # Written beside and renamed so a crash never leaves a half-written checkpoint.
    os.replace(tmp, dst)
    return dst, errors
