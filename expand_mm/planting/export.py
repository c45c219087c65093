"""The narrower network a planting found, as a model of its own: channels removed, not masked.

:func:`narrow_subnet` slices the weights of the planted model: each unit
keeps its planted output channels (conv rows, norm entries) and each conv
that reads a unit keeps the input columns of the planted channels, as the
planter traced them. The shapes go into a model config of type
``'PlantedSubnet'`` (:func:`PlantedSubnet`): the stock model's config with
its own type under ``architecture`` and the shapes under
``planted_channels``; building it builds the stock model and replaces
those convs and norms by narrower ones of the same kind. So the stock
``init_detector`` / ``init_model`` build it, and the sliced weights load
into it strictly. This is the pattern of OpenMMLab's mmrazor
(``type='mmrazor.sub_model'`` with a ``fix_subnet``), which cannot be used
here: mmrazor 1.0.0 imports, but its channel mutators import
``torch.ao.quantization.fuser_method_mappings.reverse2``, gone from current
torch (2.14), so ``mmrazor.models`` does not import.

Handled: plain conv chains with norms after the convs, channel-wise ops in
between (activations, pooling, upsampling, concatenation). Refused, naming
the module: a grouped conv reading planted channels, a norm before a conv
reading them, and anything else that makes the narrow network compute
something other than the masked one (checked on a probe input).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..probe import make_probe, probe_forward
from ..verification import contraction_errors
from .planter import ChannelPlanter, PlantingError, _norm_follows_conv, remove_mask_hooks


def _index(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def subnet_channels(planter: ChannelPlanter) -> dict[str, dict[str, Any]]:
    """Which rows and columns each narrowed conv and norm keeps.

    Needs the planter's readers of unplanted channels traced (a started planter
    with a probe).

    Returns:
        ``{'convs': {path: {'rows': [...], 'cols': [...]}}, 'norms': {path: [...]}}``
        for the modules that lose channels.

    Raises:
        PlantingError: On a grouped reader or a norm placed before a reader.
    """
    names = {m: p for p, m in planter.model.named_modules()}
    convs: dict[str, dict[str, list[int]]] = {}
    norms: dict[str, list[int]] = {}
    for unit in planter.units:
        rows = planter._active_rows(unit.conv)
        if bool(rows.all()):
            continue
        convs[names[unit.conv]] = dict(rows=_index(rows), cols=list(range(unit.conv.in_channels)))
        if unit.norm is not None and _norm_follows_conv(unit.module):
            norms[names[unit.norm]] = _index(rows.cpu())
    for conv, cols in planter.unplanted_columns.items():
        path = names[conv]
        if conv.groups != 1:
            raise PlantingError(f'{path}: a grouped conv (groups={conv.groups}) reads planted '
                                'channels; its input cannot be narrowed alone. Exclude the units '
                                'that feed it')
        parent = planter.model.get_submodule(path.rpartition('.')[0]) if '.' in path else None
        if parent is not None and getattr(parent, 'conv', None) is conv \
                and getattr(parent, 'norm_name', None) and not _norm_follows_conv(parent):
            raise PlantingError(f'{path}: its unit normalises its input before the conv '
                                "(order=('norm', 'conv', 'act')); the norm cannot lose the "
                                'unplanted channels. Exclude the units that feed it')
        entry = convs.setdefault(path, dict(rows=list(range(conv.out_channels))))
        entry['cols'] = _index(~cols.cpu())
    return dict(convs=convs, norms=norms)


def narrow_state_dict(model: nn.Module, channels: Mapping[str, Mapping]) -> dict[str, Tensor]:
    """The weights of ``model`` with the rows and columns of :func:`subnet_channels` kept."""
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    for path, keep in channels['convs'].items():
        rows, cols = torch.tensor(keep['rows']), torch.tensor(keep['cols'])
        state[f'{path}.weight'] = state[f'{path}.weight'][rows][:, cols].contiguous()
        if f'{path}.bias' in state:
            state[f'{path}.bias'] = state[f'{path}.bias'][rows].contiguous()
    for path, rows in channels['norms'].items():
        index = torch.tensor(rows)
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            if f'{path}.{name}' in state:
                state[f'{path}.{name}'] = state[f'{path}.{name}'][index].contiguous()
    return state


def channel_shapes(channels: Mapping[str, Mapping]) -> dict[str, dict[str, Any]]:
    """The sizes a config needs: ``{'convs': {path: [out, in]}, 'norms': {path: n}}``."""
    return dict(convs={p: [len(k['rows']), len(k['cols'])] for p, k in channels['convs'].items()},
                norms={p: len(rows) for p, rows in channels['norms'].items()})


def _narrow_conv(conv: nn.Conv2d, out_channels: int, in_channels: int) -> nn.Conv2d:
    new = type(conv)(in_channels, out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _narrow_norm(norm: nn.Module, features: int) -> nn.Module:
    if not isinstance(norm, nn.modules.batchnorm._NormBase):
        raise PlantingError(f'a {type(norm).__name__} norm cannot be narrowed (BatchNorm-style '
                            'norms only)')
    new = type(norm)(features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats)
    ref = next(iter(norm.buffers()), None)
    return new.to(device=ref.device) if ref is not None else new


def apply_channel_shapes(model: nn.Module, shapes: Mapping[str, Mapping]) -> nn.Module:
    """Replace the named convs and norms of ``model`` by narrower ones of the same kind.

    Raises:
        PlantingError: If a path names no conv / norm of ``model``.
    """
    modules = dict(model.named_modules())
    for kind, build in (('convs', lambda m, s: _narrow_conv(m, *s)),
                        ('norms', lambda m, s: _narrow_norm(m, int(s)))):
        for path, size in shapes.get(kind, {}).items():
            if path not in modules:
                raise PlantingError(f'planted_channels.{kind}: {path!r} is no module of '
                                    f'{type(model).__name__}')
            parent_path, _, name = path.rpartition('.')
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, build(modules[path], size))
    return model


@MODELS.register_module()
def PlantedSubnet(architecture: str, planted_channels: Mapping[str, Mapping],
                  **cfg: Any) -> nn.Module:
    """Build the stock model ``architecture`` with the convs and norms a planting narrowed.

    A model config of this type is the stock config with its ``type`` moved to
    ``architecture`` (so ``init_detector`` / ``init_model`` find the backbone
    where they expect it) and the narrowed shapes under ``planted_channels``
    (``{'convs': {path: [out, in]}, 'norms': {path: features}}``).

    Returns:
        The stock model class, narrowed: checkpoints of :func:`export_planted_subnet`
        load into it strictly.
    """
    model = MODELS.build(dict(type=architecture, **cfg))
    return apply_channel_shapes(model, planted_channels)


def subnet_model_cfg(model_cfg: Mapping[str, Any], shapes: Mapping[str, Mapping]) -> dict:
    """The ``type='PlantedSubnet'`` model config of a stock model config and its shapes."""
    cfg = copy.deepcopy(dict(model_cfg))
    return dict(cfg, type='PlantedSubnet', architecture=cfg['type'],
                planted_channels=copy.deepcopy(dict(shapes)))


def narrow_subnet(planter: ChannelPlanter, probe_shape=(1, 3, 64, 64), rtol: float = 1e-4
                  ) -> tuple[nn.Module, dict[str, Tensor], dict[str, dict]]:
    """The narrow network of the planter's current widths, checked against the masked one.

    Args:
        planter: A started planter (masks on, unplanted readers traced).
        probe_shape: Input of the check.
        rtol: Largest accepted relative difference of the outputs.

    Returns:
        ``(narrow model, its state dict, shapes)``.

    Raises:
        PlantingError: If the narrow network cannot run the probe or computes
            something else than the masked network.
    """
    channels = subnet_channels(planter)
    shapes = channel_shapes(channels)
    state = narrow_state_dict(planter.model, channels)
    narrow = copy.deepcopy(planter.model)
    remove_mask_hooks(narrow)
    apply_channel_shapes(narrow, shapes)
    narrow.load_state_dict(state, strict=True)
    masked_training, narrow_training = planter.model.training, narrow.training
    planter.model.eval()
    narrow.eval()
    try:
        with torch.no_grad():
            errors = contraction_errors(planter.model, narrow,
                                        make_probe(planter.model, probe_shape),
                                        forward_fn=probe_forward)
    except RuntimeError as err:
        raise PlantingError(f'the narrow network does not run: {str(err).splitlines()[0]}; a '
                            'planted channel reaches something other than a conv that reads it '
                            '(a residual add, a linear layer): plant such units together with '
                            'their partners or exclude them') from err
    finally:
        planter.model.train(masked_training)
        narrow.train(narrow_training)
    if not errors['max_rel'] <= rtol:
        raise PlantingError(f'the narrow network differs from the masked one by '
                            f'{errors["max_rel"]:.2e} (relative) on the probe: a planted channel '
                            'reaches an output other than through a conv that reads it')
    return narrow, state, shapes
