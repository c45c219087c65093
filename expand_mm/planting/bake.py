"""A checkpoint saved mid-way through channel planting, given its compact form.

Before the last stage the trained network masks its unplanted channels with
forward hooks that the stock network does not have; zeroing those channels'
weights gives stock weights that compute the same (the narrower network of
that stage). Used wherever a compact checkpoint is written or a raw one is
refused (:mod:`expand_mm.deploy`, the tools).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..models.deployable import find_deployable
from ..probe import DEFAULT_PROBE_SHAPE, make_probe, probe_forward
from ..verification import contraction_errors
from .planter import PlantingError, bake_masks, masked_units, remove_mask_hooks, stage_label


class PlantingBakeError(CheckpointError):
    """A channel-planting checkpoint saved before the last stage has no compact form."""


def unfinished_planting(meta: dict) -> dict | None:
    """The ``channel_planting`` entry of a checkpoint saved before the last stage, or None.

    Before the last stage the trained network masks its unplanted channels
    with forward hooks; the stock network of its weights would run them.
    :func:`bake_planting_masks` gives such a checkpoint its compact form.
    Read from what :class:`~expand_mm.hooks.ChannelPlantingHook` writes into
    ``meta``.
    """
    planting = meta.get('channel_planting')
    if not isinstance(planting, dict):
        return None
    stage, stages = planting.get('stage'), planting.get('stages') or ()
    if stage is None or stage >= len(stages) - 1:
        return None
    return planting


def planting_stage(planting: dict) -> str:
    """``'channel-planting stage 2 of 4 (50% of channels)'`` for a ``meta['channel_planting']``
    entry, numbered as the hook's log lines (:func:`~expand_mm.planting.stage_label`)."""
    return f'channel-planting {stage_label(planting["stage"], planting["stages"])}'


def refuse_unfinished_planting(meta: dict, source: str, use: str) -> None:
    """Refuse a raw checkpoint saved before the last stage of channel planting.

    Its unplanted channels were masked by hooks that its stock network does
    not have; its compact copy (:func:`bake_planting_masks`) is the network
    that was trained.

    Args:
        meta: The checkpoint's ``meta``.
        source: The checkpoint's name, for the message.
        use: The verb the tool offers instead, e.g. ``'Test'`` / ``'Export'``.

    Raises:
        CheckpointError: For such a checkpoint.
    """
    planting = unfinished_planting(meta)
    if planting:
        raise CheckpointError(
            f'{source} was saved at {planting_stage(planting)}: the trained network masks its '
            'unplanted channels with hooks, which the weights alone do not carry. '
            f'{use} its compact copy (*_compact.pth, or python tools/contract.py CONFIG CKPT '
            'OUT) with the compact config')


def bake_planting_masks(model: nn.Module, state_dict: dict, planting: dict,
                        probe_shape=DEFAULT_PROBE_SHAPE, rtol: float = 1e-4,
                        source: str = 'checkpoint') -> tuple[dict, dict[str, float]]:
    """The stock weights that compute what a network mid-way through channel planting does.

    The unplanted channels' filters, biases and norm parameters are set to zero
    (:func:`~expand_mm.planting.bake_masks`), so each unit outputs exactly zero
    there -- the narrower network, with the stock keys and shapes. Checked on a
    probe input: the weights as saved, run with the stage's masks
    (:func:`~expand_mm.planting.masked_units`), against the baked weights run
    without them.

    Args:
        model: The planted model or its training-time wrapper (architecture only).
        state_dict: The deployable network's entries of the checkpoint.
        planting: The checkpoint's ``meta['channel_planting']``.
        probe_shape: Input shape of the check.
        rtol: Largest accepted relative difference on the probe.
        source: Name used in messages.

    Returns:
        ``(baked_state_dict, errors)`` with the check's ``max_abs`` / ``max_rel``.

    Raises:
        PlantingBakeError: If the checkpoint predates the record of masked
            entries, or a unit's output is not zero once its weights are (an
            activation with ``act(0) != 0``, a norm without affine parameters).
    """
    where = f'{source} was saved at {planting_stage(planting)}'
    entries, widths = planting.get('masked_entries'), planting.get('widths') or {}
    if not isinstance(entries, dict):
        raise PlantingBakeError(f'{where} by an older expand_mm that did not record which '
                                'entries are masked: it has no compact form; use a checkpoint '
                                'saved at the last stage')
    deployable, _ = find_deployable(model)
    try:
        baked = bake_masks(state_dict, entries)
        masked, plain = copy.deepcopy(deployable).eval(), copy.deepcopy(deployable).eval()
        # During training the deployable carries the planter's own masks: without
        # removing them the baked copy would be masked too, and the check vacuous.
        remove_mask_hooks(masked)
        remove_mask_hooks(plain)
        masked.load_state_dict(state_dict, strict=True)
        plain.load_state_dict(baked, strict=True)
        outputs: dict[str, torch.Tensor] = {}  # each unit's output in the baked network
        handles = [plain.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: outputs.__setitem__(path, out.detach()))
            for path in widths]
        try:
            with torch.no_grad(), masked_units(masked, widths):
                errors = contraction_errors(masked, plain, make_probe(plain, probe_shape),
                                            forward_fn=probe_forward)
        finally:
            for handle in handles:
                handle.remove()
    except (PlantingError, RuntimeError) as err:
        raise PlantingBakeError(f'{where}; its weights do not fit the planted network: '
                                f'{err}') from err
    if not errors['max_rel'] <= rtol:
        leaks = {path: float(out[:, int(widths[path]):].abs().max())
                 for path, out in outputs.items()
                 if out.dim() > 1 and out[:, int(widths[path]):].numel()}
        culprits = sorted((p for p, v in leaks.items() if v > 0), key=lambda p: -leaks[p])
        raise PlantingBakeError(
            f'{where}; with the unplanted channels\' weights set to zero the stock network '
            f'differs from the masked one by {errors["max_rel"]:.2e} (relative) on the probe: '
            + (f'unit(s) {culprits[:3]} still output up to {leaks[culprits[0]]:.3g} there (an '
               'activation with act(0) != 0, or a norm without affine parameters)'
               if culprits else 'no unit outputs anything there, so a planted channel is read '
               'by something other than a conv')
            + '; use a checkpoint saved at the last stage')
    return {k: v.detach().cpu() for k, v in baked.items()}, errors

