"""From an expanded training checkpoint to a stock compact checkpoint.

Shared by :class:`~expand_mm.hooks.ContractCheckpointHook` (on every save) and
``tools/contract.py`` (after the fact).
"""
from __future__ import annotations

import copy
import os
import os.path as osp
from typing import Any, Sequence

import torch
from mmengine.model import BaseModel
from torch import nn

from .checkpoint import match_state_dict, read_checkpoint, strip_prefix
from .models.expandnet import deployable_model
from .surgery import contract_model_, expanded_layers, verify_contraction

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


def contract_state_dict(model: nn.Module, state_dict: dict, probe_shape=DEFAULT_PROBE_SHAPE,
                        rtol: float = 1e-4, verify: bool = True
                        ) -> tuple[dict, dict[str, float] | None]:
    """Contract the expanded weights ``state_dict`` of ``model``'s architecture.

    ``model`` only provides the architecture: it is deep-copied, the weights
    are loaded into the copy (strictly), and the copy is contracted.

    Args:
        model: The expanded model (or a wrapper of it, see
            :func:`~expand_mm.models.deployable_model`).
        state_dict: Expanded (or compact) weights of that model.
        probe_shape: Shape of the random input used to check the contraction.
        rtol: Largest accepted relative error of the check.
        verify: Run the check.

    Returns:
        ``(compact_state_dict, errors)``; ``errors`` is None without ``verify``.

    Raises:
        RuntimeError: If the check finds an error above ``rtol``.
    """
    expanded = copy.deepcopy(deployable_model(model))
    if not expanded_layers(expanded):
        raise ValueError(f'{type(expanded).__name__} has no expanded layer: nothing to contract')
    match_state_dict(expanded, state_dict)
    expanded.load_state_dict(strip_prefix(state_dict), strict=True)
    compact = contract_model_(copy.deepcopy(expanded))
    errors = None
    if verify:
        errors = verify_contraction(expanded, compact, make_probe(expanded, probe_shape),
                                    forward_fn=probe_forward)
        if not errors['max_rel'] <= rtol:
            raise RuntimeError(
                f'contraction check failed: max relative error {errors["max_rel"]:.3g} > {rtol:g} '
                f'(max abs {errors["max_abs"]:.3g}); refusing to write a compact model that '
                'does not compute what the trained one does')
    return {k: v.detach().cpu() for k, v in compact.state_dict().items()}, errors


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

    Returns:
        ``(dst, errors)``.
    """
    dst = dst or compact_checkpoint_path(src)
    checkpoint = read_checkpoint(src)
    state_dict, errors = contract_state_dict(model, checkpoint['state_dict'], probe_shape,
                                             rtol, verify)
    src_meta = checkpoint.get('meta') or {}
    meta = {k: src_meta[k] for k in ('epoch', 'iter', 'dataset_meta', 'mmengine_version',
                                     'experiment_name', 'seed') if k in src_meta}
    meta['expand_mm'] = dict(source=osp.abspath(src), contraction_error=errors,
                             expandnet_cfg=getattr(deployable_model(model), 'expandnet_cfg',
                                                   None))
    tmp = dst + '.tmp'
    torch.save({'meta': meta, 'state_dict': state_dict}, tmp)
    # Written beside and renamed so a crash never leaves a half-written checkpoint.
    os.replace(tmp, dst)
    return dst, errors
