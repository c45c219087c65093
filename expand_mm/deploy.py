"""Write the compact checkpoint of an expanded (or wrapped, or planted) training model.

Shared by :class:`~expand_mm.hooks.ContractCheckpointHook` (from the model in
memory, before every save) and ``tools/contract.py`` / ``tools/export_onnx.py``
(from a training checkpoint file, after the fact). A compact checkpoint holds
``state_dict`` (stock keys: it loads with ``strict=True`` into the stock
compact config) and ``meta`` (the source's epoch, iter and ``dataset_meta``,
plus an ``expand_mm`` entry naming the source and the checked error).

Which entries are the deployable network's is the protocol of
:mod:`expand_mm.models.deployable`: a wrapper's checkpoint carries its own
keys (``student.backbone...``, ``teacher.*``, ``aux_head.*``) and only the
deployable network's are written, without their prefix.
"""
from __future__ import annotations

import copy
import io
import os
import os.path as osp
import warnings
from typing import Any, Mapping

import torch
from mmengine.fileio import get_file_backend
from mmengine.fileio.backends import LocalBackend
from torch import nn

from .checkpoint import (NONLINEAR_INIT_META_KEY, CheckpointError, match_state_dict,
                         prepare_output_path, read_checkpoint, strip_prefix)
from .errors import ConfigError
from .models.deployable import find_deployable, unwrap_model
from .planting import bake_planting_masks, unfinished_planting
from .probe import DEFAULT_PROBE_SHAPE, make_probe, probe_forward
from .contraction import compact_copy, expanded_layers
from .verification import ContractionCheckError, check_contraction

#: The source checkpoint's meta entries a compact checkpoint keeps.
KEPT_META_KEYS = ('epoch', 'iter', 'dataset_meta', 'mmengine_version', 'experiment_name', 'seed')


def compact_checkpoint_path(path: str, suffix: str = '_compact') -> str:
    """``work_dir/epoch_12.pth`` -> ``work_dir/epoch_12_compact.pth``."""
    stem, ext = osp.splitext(path)
    return f'{stem}{suffix}{ext or ".pth"}'


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


def _on_cpu(state_dict: Mapping) -> dict:
    """Detached CPU copies of a state dict's tensors (what a checkpoint file holds)."""
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def _contract_network(expanded: nn.Module, probe_shape, rtol: float, verify: bool
                      ) -> tuple[dict, dict[str, Any] | None]:
    """The compact weights of an expanded network, checked against it on a probe."""
    compact = compact_copy(expanded)
    errors = None
    if verify:
        try:
            errors = check_contraction(expanded, compact, make_probe(expanded, probe_shape),
                                       forward_fn=probe_forward, rtol=rtol)
        except ContractionCheckError as err:  # not a probe that crashed: that keeps its trace
            raise ContractionCheckError(f'{err}; refusing to write a compact model that does '
                                        'not compute what the trained one does') from err
    return _on_cpu(compact.state_dict()), errors


def _nothing_to_contract(deployable: nn.Module, prefix: str) -> None:
    """Refuse a plain model that is not a training-time wrapper: it has no compact form."""
    if not prefix:
        raise ConfigError(f'{type(deployable).__name__} has no expanded layer and is not a '
                          'training-time wrapper: nothing to contract')


def contract_deployable(model: nn.Module, probe_shape=DEFAULT_PROBE_SHAPE, rtol: float = 1e-4,
                        verify: bool = True) -> tuple[dict, dict[str, Any] | None]:
    """The compact weights of ``model``'s deployable network, from its weights in memory.

    No checkpoint is read and the expanded network is not copied (see
    :func:`compact_copy`). A training-time wrapper around a network without
    expanded layers gives its deployable network's weights as they are.

    Args:
        model: An ExpandNet or a training-time wrapper (possibly DDP-wrapped).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``(compact_state_dict, errors)`` on the CPU; ``errors`` is None without
        ``verify`` and when there was nothing to contract.

    Raises:
        ConfigError: If ``model`` is neither expanded nor a wrapper.
        ContractionCheckError: If the check finds an error above ``rtol`` that
            is not float32 rounding (see :func:`~expand_mm.surgery.check_contraction`).
    """
    deployable, prefix = find_deployable(model)
    if not expanded_layers(deployable):
        _nothing_to_contract(deployable, prefix)
        return _on_cpu(deployable.state_dict()), None
    return _contract_network(deployable, probe_shape, rtol, verify)


def contract_state_dict(model: nn.Module, state_dict: dict, probe_shape=DEFAULT_PROBE_SHAPE,
                        rtol: float = 1e-4, verify: bool = True
                        ) -> tuple[dict, dict[str, Any] | None]:
    """The compact weights of the deployable network in a training ``state_dict``.

    ``model`` only provides the architecture: its deployable network (see
    :func:`~expand_mm.models.deployable.find_deployable`) is deep-copied once,
    its entries of ``state_dict`` are loaded into the copy (strictly), and the
    copy is contracted (:func:`contract_deployable`). A training-time wrapper
    around a network without expanded layers needs no contraction: its
    deployable entries, checked against the network's keys and shapes, are
    the compact checkpoint as they are.

    Args:
        model: The expanded model, or a wrapper of it.
        state_dict: Weights of that model (for a wrapper: with its keys).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``(compact_state_dict, errors)``; ``errors`` is None without ``verify``
        and when there was nothing to contract.

    Raises:
        ConfigError: If ``model`` is neither expanded nor a wrapper.
        CheckpointError: If the entries do not fit the deployable network.
        ContractionCheckError: If the check finds an error above ``rtol`` that
            is not float32 rounding.
    """
    deployable, prefix = find_deployable(model)
    state_dict = deployable_state_dict(model, state_dict)
    if not expanded_layers(deployable):
        _nothing_to_contract(deployable, prefix)
        match_state_dict(deployable, state_dict, source=f'the {prefix!r} entries')
        return _on_cpu(state_dict), None
    expanded = copy.deepcopy(deployable)
    match_state_dict(expanded, state_dict)
    expanded.load_state_dict(state_dict, strict=True)
    return _contract_network(expanded, probe_shape, rtol, verify)


def refuse_nonlinear_phase(meta: Mapping, source: str) -> None:
    """Refuse a checkpoint saved while ``NonlinearInitHook`` had a nonlinearity in the chains.

    Raises:
        CheckpointError: For such a checkpoint: its chains are not linear, so
            it has no compact equivalent.
    """
    if meta.get(NONLINEAR_INIT_META_KEY):
        raise CheckpointError(
            f'{source} was saved during the nonlinear phase of NonlinearInitHook (a '
            'nonlinearity between the sub-layers of every expanded layer): it has no compact '
            "equivalent. Contract a checkpoint saved after the hook's `end`")


def compact_checkpoint(model: nn.Module, meta: Mapping, source: str,
                       state_dict: Mapping | None = None, probe_shape=DEFAULT_PROBE_SHAPE,
                       rtol: float = 1e-4, verify: bool = True
                       ) -> tuple[dict, dict[str, Any] | None]:
    """The compact checkpoint of a training checkpoint, as a dict ready to save.

    A channel-planting checkpoint saved before the last stage becomes the
    narrower network of its stage (:func:`~expand_mm.planting.bake_planting_masks`,
    always checked; ``meta['expand_mm']['channel_planting']`` records the stage).

    Args:
        model: The model the training checkpoint is of (or its EMA copy).
        meta: The training checkpoint's ``meta``.
        source: The training checkpoint's path, recorded in the meta.
        state_dict: The training checkpoint's weights; None: ``model``'s own
            weights in memory (:func:`contract_deployable`).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``({'meta': ..., 'state_dict': ...}, errors)``.

    Raises:
        CheckpointError: For a checkpoint of the nonlinear phase, or one whose
            entries do not fit (``PlantingBakeError`` for a planting stage that
            cannot be baked).
    """
    refuse_nonlinear_phase(meta, source)
    planting = unfinished_planting(dict(meta))
    if planting:
        weights = unwrap_model(model).state_dict() if state_dict is None else state_dict
        compact, errors = bake_planting_masks(
            model, deployable_state_dict(model, weights, source=source), planting,
            probe_shape, rtol, source=source)
    elif state_dict is None:
        compact, errors = contract_deployable(model, probe_shape, rtol, verify)
    else:
        compact, errors = contract_state_dict(model, dict(state_dict), probe_shape, rtol, verify)
    return {'meta': _compact_meta(model, meta, source, errors, planting),
            'state_dict': compact}, errors


def _compact_meta(model: nn.Module, meta: Mapping, source: str, errors: dict | None,
                  planting: dict | None) -> dict:
    """The compact checkpoint's ``meta``: the source's, and what expand_mm did."""
    kept = {k: meta[k] for k in KEPT_META_KEYS if k in meta}
    deployable, prefix = find_deployable(model)
    kept['expand_mm'] = dict(
        source=source if '://' in source else osp.abspath(source),
        contraction_error=None if planting else errors,
        expandnet_cfg=getattr(deployable, 'expandnet_cfg', None),
        wrapper=type(unwrap_model(model)).__name__ if prefix else None,
        deployable_prefix=prefix)
    if planting:
        kept['expand_mm']['channel_planting'] = dict(
            stage=planting['stage'], stages=planting['stages'], widths=planting.get('widths'),
            bake_error=errors)
    return kept


def save_checkpoint_file(checkpoint: dict, dst: str, backend_args: dict | None = None) -> None:
    """``torch.save`` ``checkpoint`` to ``dst`` through MMEngine's file backend for it.

    On a local disk it is written beside ``dst`` and renamed, so a crash never
    leaves a half-written checkpoint; another backend (``s3://``, a
    ``register_backend`` one) gets the bytes in one ``put``.
    """
    backend = get_file_backend(dst, backend_args=backend_args)
    if not isinstance(backend, LocalBackend):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        backend.put(buffer.getvalue(), dst)
        return
    tmp = dst + '.tmp'
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def write_compact_checkpoint(model: nn.Module, src: str, dst: str | None = None,
                             probe_shape=DEFAULT_PROBE_SHAPE, rtol: float = 1e-4,
                             verify: bool = True, load_into_model: bool = False
                             ) -> tuple[str, dict[str, Any] | None]:
    """Read the training checkpoint file ``src`` and write its compact form to ``dst``.

    When EMA was on, the source's ``state_dict`` holds the EMA weights
    (MMEngine's ``EMAHook`` swaps them in before saving), so the compact model
    is the contracted EMA model. See :func:`compact_checkpoint` for what is
    written.

    Args:
        model: The model the checkpoint was saved from (architecture only).
        src: The training checkpoint.
        dst: Where to write (default: ``src`` with ``_compact`` added).
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.
        load_into_model: Load the weights into ``model``'s deployable network
            itself (its own weights are overwritten) and drop the file's
            tensors before contracting: the memory is then the expanded model
            once, plus the compact model and one layer's float64 check, where
            the default (a copy of the deployable network) holds the expanded
            weights twice.

    Returns:
        ``(dst, errors)``; ``errors`` is None without ``verify`` and when the
        deployable network had nothing to contract.
    """
    dst = prepare_output_path(src, dst or compact_checkpoint_path(src))
    # Memory-mapped: the optimizer state and whatever else is not contracted is never read.
    checkpoint = read_checkpoint(src, mmap=True)
    meta = checkpoint.get('meta') or {}
    if load_into_model:
        load_deployable_weights(model, checkpoint['state_dict'], source=src)
        del checkpoint  # the model holds the weights now; the rest of the file is never read
        compact, errors = compact_checkpoint(model, meta, src, None, probe_shape, rtol, verify)
    else:
        compact, errors = compact_checkpoint(model, meta, src, checkpoint['state_dict'],
                                             probe_shape, rtol, verify)
    save_checkpoint_file(compact, dst)
    return dst, errors


def load_deployable_weights(model: nn.Module, state_dict: Mapping, source: str) -> None:
    """Load the deployable network's entries of a training ``state_dict`` into ``model``.

    The tensors are assigned, not copied (``load_state_dict(assign=True)``):
    the model's own tensors are freed one by one as the file's take their
    place, so the expanded weights are held once, not twice.

    Raises:
        CheckpointError: If the entries fit neither the expanded nor the
            compact form of the deployable network.
    """
    deployable, _ = find_deployable(model)
    weights = deployable_state_dict(model, dict(state_dict), source=source)
    match_state_dict(deployable, weights, source=source)
    deployable.load_state_dict(weights, strict=True, assign=True)


def __getattr__(name: str) -> Any:
    """Deprecated aliases: the cost, probe, planting and deployable-protocol names, once
    importable from here, warn and name their own module."""
    from . import cost, planting, probe
    from .models import deployable
    for module in (cost, planting, probe, deployable):
        if hasattr(module, name) and not name.startswith('_'):
            warnings.warn(f'expand_mm.deploy.{name} is deprecated: import it from '
                          f'{module.__name__}', DeprecationWarning, stacklevel=2)
            return getattr(module, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
