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
from mmengine.model import BaseModel
from torch import nn

from .checkpoint import (NONLINEAR_INIT_META_KEY, CheckpointError, match_state_dict,
                         prepare_output_path, read_checkpoint, strip_prefix)
from .compat import type_name
from .models.expandnet import deployable_model, wraps_a_model
from .planting import PlantingError, bake_masks, masked_units, remove_mask_hooks, stage_label
from .surgery import (ContractionCheckError, check_contraction, contract_model_, expanded_layers,
                      verify_contraction)

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
    multiply-add as one flop, and not what the trace finds dead (a module
    whose output reaches no output). The model is not modified.

    Args:
        model: Any module taking a ``(1, 3, H, W)`` tensor.
        img_size: ``(H, W)``.
    """
    return int(_flop_analyzer(model, img_size).total())


def _flop_analyzer(model: nn.Module, img_size: Sequence[int]) -> Any:
    import warnings

    from mmengine.analysis import FlopAnalyzer
    param = next(model.parameters())
    inputs = (torch.zeros(1, 3, *img_size, device=param.device, dtype=param.dtype),)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # jit tracer warnings about data-dependent code
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        with torch.no_grad():  # the counts are the same; autograd would keep every activation
            analyzer.total()  # runs the trace, inside the filter
    return analyzer


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one conv / linear call (bias not counted, as mmengine's FlopAnalyzer)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    raise TypeError(f'no MAC count for a {type(module).__name__} sub-layer')


def count_training_macs(model: nn.Module, compact: nn.Module,
                        img_size: Sequence[int]) -> tuple[int, int]:
    """MACs of one forward of ``compact`` and of ``model``'s explicit chains (the paper's cost).

    Without running the chains: ``compact`` (the contraction of ``model``) is
    traced once at ``img_size`` (:func:`count_macs`), recording the input shape
    of each expanded layer's compact counterpart; each layer's chain then runs
    on the ``meta`` device (shapes only) from those inputs, and its sub-layers'
    MACs replace the compact layer's (in proportion to what the trace counted
    of it: a layer whose output the trace finds dead counts nothing, as in
    :func:`count_macs`). Equal to :func:`count_macs` of ``model`` in explicit
    mode at a fraction of its time and memory (the Cityscapes U-Net at
    1024x2048 on this project's 2-core machine: the explicit trace took 100 s
    and 4.5 GB without autograd, 15 GB with it).

    Args:
        model: A model (or deployable network) with expanded layers.
        compact: Its contraction (:func:`~expand_mm.surgery.contract_model`).
        img_size: ``(H, W)``.

    Returns:
        ``(compact_macs, training_macs)``; the first is :func:`count_macs` of ``compact``.
    """
    layers = dict(expanded_layers(model))
    inputs: dict[str, list[tuple]] = {path: [] for path in layers}
    called_macs = dict.fromkeys(layers, 0)
    handles = []
    for path in layers:
        def hook(module, args, out, path=path):
            inputs[path].append(tuple(args[0].shape))
            called_macs[path] += int(_layer_macs(module, out))
        handles.append(compact.get_submodule(path).register_forward_hook(hook))
    try:
        analyzer = _flop_analyzer(compact, img_size)
    finally:
        for handle in handles:
            handle.remove()
    by_module = analyzer.by_module()
    compact_macs = total = int(analyzer.total())
    for path, layer in layers.items():
        traced = int(by_module.get(path, 0))
        if not traced:
            continue
        chain = copy.deepcopy(layer).to('meta').set_mode('explicit')
        counted: list[int] = []
        sub_handles = [sub.register_forward_hook(
            lambda m, a, out: counted.append(int(_layer_macs(m, out))))
            for sub in chain.sublayers]
        with torch.no_grad():
            for shape in inputs[path]:
                chain(torch.empty(shape, device='meta'))
        for handle in sub_handles:
            handle.remove()
        total += sum(counted) * traced // called_macs[path] - traced
    return compact_macs, total


def config_input_size(cfg: Any) -> tuple[tuple[int, int], str] | None:
    """``((H, W), source)`` of the network's input under an mm config's test settings.

    With sliding-window testing (mmseg's ``test_cfg.mode='slide'``, found in
    the model config through wrappers) the network sees windows of at most
    ``crop_size`` (clipped at the image border), so that is the size.
    Otherwise it is the ``scale`` of the test-pipeline ``Resize``, read from
    ``cfg.test_dataloader``'s dataset
    (through dataset wrappers) or ``cfg.test_pipeline``; mmcv's ``scale`` is
    ``(W, H)`` or one int. With ``keep_ratio`` the scale is only the box an
    image is fitted into (one side can come out smaller), which ``source``
    says, unless a later ``Pad`` pads to it (``size`` or ``pad_to_square``:
    YOLOX). None when neither is in the config.
    """
    test_cfg = _find_test_cfg(cfg.get('model'))
    if test_cfg is not None and test_cfg.get('mode') == 'slide':
        crop = _size_pair(test_cfg.get('crop_size'))  # mmseg's crop_size is (H, W)
        if crop is not None:
            return crop, 'sliding-window test_cfg.crop_size (H, W)'
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    while isinstance(dataset, dict) and 'pipeline' not in dataset and 'dataset' in dataset:
        dataset = dataset['dataset']
    pipeline = (dataset.get('pipeline') if isinstance(dataset, dict) else None) \
        or cfg.get('test_pipeline') or []
    types = [type_name(step.get('type', '')) if isinstance(step, dict) else ''
             for step in pipeline]
    for index, step in enumerate(pipeline):
        scale = _size_pair(step.get('scale')) if types[index] == 'Resize' else None
        if scale is None:
            continue
        source = 'test-pipeline Resize scale'
        if step.get('keep_ratio'):
            pads = [pad for pad, kind in zip(pipeline[index:], types[index:]) if kind == 'Pad']
            if pads and (_size_pair(pads[0].get('size')) == scale or (
                    pads[0].get('pad_to_square') and scale[0] == scale[1])):
                source += ', padded to it'
            else:
                source += ' (keep_ratio: images are fitted into this box)'
        return (scale[1], scale[0]), source  # mmcv's scale is (W, H)
    return None


def _size_pair(value: Any) -> tuple[int, int] | None:
    """``value`` as two positive ints (one int is both), or None if it is neither."""
    if isinstance(value, int) and value > 0:
        return value, value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _find_test_cfg(model_cfg: Any) -> Any:
    """The first ``test_cfg`` dict with a ``mode`` in a model config, wrappers included."""
    if not isinstance(model_cfg, dict):
        return None
    test_cfg = model_cfg.get('test_cfg')
    if isinstance(test_cfg, dict) and 'mode' in test_cfg:
        return test_cfg
    for value in model_cfg.values():
        found = _find_test_cfg(value)
        if found is not None:
            return found
    return None


def make_probe(model: nn.Module, shape: Sequence[int] = DEFAULT_PROBE_SHAPE) -> torch.Tensor:
    """A fixed pseudo-random input on the model's device (seeded: reproducible)."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP-style model wrappers (``MMDistributedDataParallel``, ...)
    and test-time-augmentation models, as MMEngine's checkpoint loading unwraps them."""
    while wraps_a_model(model):
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
        ContractionCheckError: If the check finds an error above ``rtol`` that is not
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
        except ContractionCheckError as err:  # not a probe that crashed: that keeps its trace
            raise ContractionCheckError(f'{err}; refusing to write a compact model that does '
                                        'not compute what the trained one does') from err
    return {k: v.detach().cpu() for k, v in compact.state_dict().items()}, errors


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
                errors = verify_contraction(masked, plain, make_probe(plain, probe_shape),
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

    A channel-planting checkpoint saved before the last stage is written as
    the narrower network of its stage (:func:`bake_planting_masks`, always
    checked; ``meta['expand_mm']['channel_planting']`` records the stage).

    Returns:
        ``(dst, errors)``; ``errors`` is None without ``verify`` and when the
        deployable network had nothing to contract.

    Raises:
        PlantingBakeError: For a channel-planting checkpoint that cannot be baked.
    """
    dst = prepare_output_path(src, dst or compact_checkpoint_path(src))
    checkpoint = read_checkpoint(src)
    if (checkpoint.get('meta') or {}).get(NONLINEAR_INIT_META_KEY):
        raise CheckpointError(
            f'{src} was saved during the nonlinear phase of NonlinearInitHook (a nonlinearity '
            'between the sub-layers of every expanded layer): it has no compact equivalent. '
            'Contract a checkpoint saved after the hook\'s `end`')
    planting = unfinished_planting(checkpoint.get('meta') or {})
    if planting:
        state_dict, errors = bake_planting_masks(
            model, deployable_state_dict(model, checkpoint['state_dict'], source=src),
            planting, probe_shape, rtol, source=src)
    else:
        state_dict, errors = contract_state_dict(model, checkpoint['state_dict'], probe_shape,
                                                 rtol, verify)
    src_meta = checkpoint.get('meta') or {}
    meta = {k: src_meta[k] for k in ('epoch', 'iter', 'dataset_meta', 'mmengine_version',
                                     'experiment_name', 'seed') if k in src_meta}
    deployable, prefix = find_deployable(model)
    meta['expand_mm'] = dict(source=osp.abspath(src),
                             contraction_error=None if planting else errors,
                             expandnet_cfg=getattr(deployable, 'expandnet_cfg', None),
                             wrapper=type(unwrap_model(model)).__name__ if prefix else None,
                             deployable_prefix=prefix)
    if planting:
        # The narrower network of that stage: say so, and how well baking was checked.
        meta['expand_mm']['channel_planting'] = dict(
            stage=planting['stage'], stages=planting['stages'], widths=planting.get('widths'),
            bake_error=errors)
    tmp = dst + '.tmp'
    try:
        torch.save({'meta': meta, 'state_dict': state_dict}, tmp)
        # Written beside and renamed so a crash never leaves a half-written checkpoint.
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return dst, errors
