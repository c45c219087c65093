"""Every start-of-training check of expand_mm, as small functions of what the Runner built.

:class:`~expand_mm.hooks.ExpandNetCheckHook` runs them from the config, so
they fire the same under mmdet's / mmseg's ``tools/train.py``, a user's own
``Runner.from_cfg`` and this repository's ``tools/train.py``. A check that
finds a mistake which would waste or spoil the run raises an
:class:`~expand_mm.errors.ExpandMMError`; one that finds a setting a user may
have meant returns a warning to log.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Iterable, Mapping

from mmengine.config import Config
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (CheckpointError, check_plain_model_checkpoint, compare_state_dict,
                         expanded_chain_paths, expanded_key_shapes, read_checkpoint,
                         refuse_mostly_misfitting, strip_prefix, wrapper_checkpoint_hint)
from .compat import type_name
from .datasets_check import check_annotations
from .errors import ConfigError
from .hooks.contract_checkpoint import ContractCheckpointHook
from .models.deployable import deferring_expandnet, find_deployable
from .models.distributed import ExpandNetDistributedDataParallel
from .optim.factor_lr import (ADAPTIVE_OPTIMIZERS, EXPANDNET_PARAMWISE_KEYS,
                              ExpandNetOptimWrapperConstructor)
from .optim.schedule_check import absolute_floor_problems
from .surgery import expanded_layers


def check_constructor_for_paramwise_keys(optim_wrapper_cfg: Any) -> None:
    """Refuse ExpandNet ``paramwise_cfg`` keys given to a constructor that ignores them.

    MMEngine's default constructor drops unknown ``paramwise_cfg`` keys, so
    ``factor_lr_mult`` or ``weight_decay_on`` without
    ``constructor='ExpandNetOptimWrapperConstructor'`` would silently train
    with the defaults.

    Raises:
        ConfigError: Naming the keys and the constructor to set.
    """
    if not isinstance(optim_wrapper_cfg, Mapping):
        return
    used = [k for k in (optim_wrapper_cfg.get('paramwise_cfg') or {})
            if k in EXPANDNET_PARAMWISE_KEYS]
    constructor = optim_wrapper_cfg.get('constructor')
    cls = (constructor if isinstance(constructor, type) else
           OPTIM_WRAPPER_CONSTRUCTORS.get(constructor) if isinstance(constructor, str) else None)
    ours = isinstance(cls, type) and issubclass(cls, ExpandNetOptimWrapperConstructor)
    if used and not ours:
        raise ConfigError(f'optim_wrapper.paramwise_cfg sets {used}, which only '
                          "constructor='ExpandNetOptimWrapperConstructor' reads, but the "
                          f'constructor is {constructor or "the default"!r}: add '
                          "optim_wrapper=dict(constructor='ExpandNetOptimWrapperConstructor')")


def ddp_wrapper_warning(model: nn.Module) -> str | None:
    """A warning when a stock DDP wrapper would keep an ExpandNet from deferring its
    factor gradients (it runs its own train step), else None."""
    if (not isinstance(model, DistributedDataParallel)
            or isinstance(model, ExpandNetDistributedDataParallel)
            or deferring_expandnet(model) is None):
        return None
    suggestion = ("dict(type='ExpandNetDistributedDataParallel', static_graph=True) "
                  '(in place of find_unused_parameters=True; torch DDP refuses it with '
                  'gradient accumulation)'
                  if model.find_unused_parameters else
                  "dict(type='ExpandNetDistributedDataParallel')")
    return (f'{type(model).__name__} runs its own train step, so the ExpandNet trains with '
            'plain autograd (same gradients, higher peak memory); set '
            f'model_wrapper_cfg={suggestion} to defer the factor gradients as on one device')


def missing_setup_warnings(cfg: Mapping, model: nn.Module, hooks: Iterable[Any]) -> list[str]:
    """What an ExpandNet config leaves out that its training would want.

    An adaptive optimizer (Adam, AdamW, ...) without
    ``ExpandNetOptimWrapperConstructor`` trains the factors at the base rate,
    which moves the composed kernels far more than the compact ones move;
    without ``ContractCheckpointHook`` no compact checkpoint is written.

    Args:
        cfg: The config (its ``optim_wrapper`` is read).
        model: The model being trained (wrappers and DDP included).
        hooks: The runner's hooks.
    """
    deployable, _ = find_deployable(model)
    trained = [path for path, layer in expanded_layers(deployable)
               if any(p.requires_grad for p in layer.parameters())]
    if not trained:
        return []
    warnings = []
    optim_cfg = cfg.get('optim_wrapper') or {}
    optimizer = type_name((optim_cfg.get('optimizer') or {}).get('type', ''))
    constructor = type_name(optim_cfg.get('constructor', ''))
    if optimizer in ADAPTIVE_OPTIMIZERS and constructor != 'ExpandNetOptimWrapperConstructor':
        warnings.append(
            f"{len(trained)} expanded layer{'s' * (len(trained) != 1)} train"
            f"{'s' * (len(trained) == 1)} with {optimizer} at the base rate: set "
            "optim_wrapper.constructor='ExpandNetOptimWrapperConstructor' (per-factor rates; "
            'without them the expanded layers move far faster than compact ones, see '
            'docs/user_guide.md)')
    if not any(isinstance(hook, ContractCheckpointHook) for hook in hooks):
        warnings.append(
            "no ContractCheckpointHook among the hooks: checkpoints are written in the "
            "training form only (add default_hooks=dict(expand_contract=dict(type="
            "'ContractCheckpointHook')) for a stock *_compact.pth beside each, or run "
            "tools/contract.py later)")
    return warnings


def _base_custom_hook_types(filename: str) -> dict[str, list[str]]:
    """The ``custom_hooks`` types of each direct ``_base_`` of the config file ``filename``.

    Read as MMEngine reads them (its parser of the ``_base_`` line and its
    resolution of relative and ``package::`` paths); each base is loaded whole,
    so what it inherits counts. A config without ``_base_`` (a dumped one, or
    the ``read_base()`` style) gives nothing.
    """
    found = {}
    # Config's own helpers: the same files the config was built from.
    for base in Config._get_base_files(filename):
        path, _ = Config._get_cfg_path(base, filename)
        hooks = Config.fromfile(path).get('custom_hooks') or []
        found[base] = [type_name(hook.get('type', '')) for hook in hooks
                       if isinstance(hook, Mapping)]
    return found


def dropped_base_hooks_warning(cfg: Any, hooks: Iterable[Any]) -> str | None:
    """A warning when hooks of the config's ``_base_`` ``custom_hooks`` are not registered.

    MMEngine merges dicts but replaces lists: ``custom_hooks = [...]`` in a
    config drops its base's custom hooks (RTMDet's ``EMAHook`` and
    ``PipelineSwitchHook``, YOLOX's mode switch, norm sync and EMA), which
    changes the recipe and, without EMA, the weights deployed. expand_mm's
    hooks belong in ``default_hooks`` keys, which merge with the base's.

    Args:
        cfg: The runner's config; only a config read from a ``.py`` file that
            still exists is checked (its ``filename``).
        hooks: The runner's hooks.

    Returns:
        The warning, or None when every base hook type is registered (or the
        config has no file to read its bases from).
    """
    filename = getattr(cfg, 'filename', None)
    if not filename or not filename.endswith('.py') or not osp.isfile(filename):
        return None
    registered = {cls.__name__ for hook in hooks for cls in type(hook).__mro__}
    dropped = {base: [name for name in names if name not in registered]
               for base, names in _base_custom_hook_types(filename).items()}
    dropped = {base: names for base, names in dropped.items() if names}
    if not dropped:
        return None
    listed = '; '.join(f"{', '.join(names)} of {base}" for base, names in dropped.items())
    return (f'the base config\'s custom hooks {listed} do not run: custom_hooks in '
            f'{filename} replaces the base\'s list (mmengine merges dicts, not lists). Put '
            "expand_mm's hooks under keys of default_hooks (default_hooks=dict(expand_load="
            "dict(type='ExpandCheckpointLoadHook'), ...), docs/user_guide.md) and list in "
            'custom_hooks only what the config adds, or list the base\'s hooks again')


def schedule_warnings(model: nn.Module, optim_wrapper: Any, param_schedulers: Any) -> list[str]:
    """Schedulers whose absolute floor would undo the per-factor learning rates
    (:func:`~expand_mm.optim.schedule_check.absolute_floor_problems`)."""
    return list(absolute_floor_problems(model, optim_wrapper, param_schedulers))


def submodule_of_checkpoint(model: nn.Module, state_dict: Mapping) -> str | None:
    """The top-level part of ``model`` (``'backbone'``) whose weights ``state_dict`` holds
    without their prefix (an ImageNet-pretrained backbone file), or None."""
    keys = {k: v.shape for k, v in model.state_dict().items()}
    state_dict = strip_prefix(state_dict)
    for name, _ in model.named_children():
        found = sum(keys.get(f'{name}.{k}') == getattr(v, 'shape', None)
                    for k, v in state_dict.items())
        if found and 2 * found >= len(state_dict):
            return name
    return None


def check_plain_load_from(model: nn.Module, path: str, resume: bool) -> None:
    """Refuse a ``load_from`` / resumed checkpoint that a plain model would half-load.

    For a stock (not ExpandNet, not wrapper) model MMEngine loads non-strictly
    and only logs the mismatch. A resume must fit exactly (missing or
    wrong-shaped weights are refused, naming them); ``load_from`` may be
    partial (fine-tuning from a model with another head), but not an ExpandNet
    training checkpoint of this model, whose expanded layers would stay
    random, nor one that gives the model no weight at all (a training-time
    wrapper's checkpoint, whose keys carry a prefix, or another model's).
    ExpandNet and wrapper models are checked by ``ExpandCheckpointLoadHook``.

    Args:
        model: The unwrapped model being trained.
        path: The checkpoint file.
        resume: Whether the run resumes from it.

    Raises:
        CheckpointError: Naming the checkpoint, the keys and what to use.
    """
    deployable, prefix = find_deployable(model)
    if prefix or expanded_layers(deployable):
        return
    state_dict = read_checkpoint(path, mmap=True)['state_dict']
    if resume:
        check_plain_model_checkpoint(model, state_dict, path)
        return
    wrapper = wrapper_checkpoint_hint(expanded_key_shapes(model), state_dict)
    if wrapper:
        raise CheckpointError(f'load_from={path!r} would load nothing: {wrapper}')
    fitting = compare_state_dict(model, state_dict)
    if len(fitting.missing) + len(fitting.wrong_shape) == len(model.state_dict()):
        _refuse_foreign_checkpoint(model, state_dict, path)
    chains = expanded_chain_paths(model, state_dict)
    if chains:
        raise CheckpointError(
            f'load_from={path!r} is an ExpandNet training checkpoint of this model ('
            f'{len(chains)} layers, e.g. {chains[0]!r}, are expanded chains), which would '
            'leave them at their initialisation: load its *_compact.pth (or python '
            'tools/contract.py EXPANDNET_CONFIG CKPT OUT), or train with the ExpandNet config')


def _refuse_foreign_checkpoint(model: nn.Module, state_dict: Mapping, path: str) -> None:
    """Refuse a ``load_from`` that holds none of ``model``'s weights, saying what it holds."""
    part = submodule_of_checkpoint(model, state_dict)
    if part:
        raise CheckpointError(
            f'load_from={path!r} holds the weights of this model\'s {part!r} without the '
            f'{part + "."!r} prefix (e.g. {sorted(strip_prefix(state_dict))[0]!r}), so it '
            f'would load nothing: give it to that part as its init_cfg=dict(type='
            f"'Pretrained', checkpoint={path!r}) (e.g. --cfg-options model.{part}.init_cfg"
            f'.type=Pretrained model.{part}.init_cfg.checkpoint={path}), or save it with '
            'the prefix')
    raise CheckpointError(
        f'load_from={path!r} has none of the {len(model.state_dict())} weights of this '
        f'{type(model).__name__} (with their shapes; it holds e.g. '
        f'{sorted(strip_prefix(state_dict))[:3]}): it is a checkpoint of another model. '
        'Use a checkpoint of this config, or of a model sharing its backbone')


def check_load_from_fits(model: nn.Module, path: Any) -> None:
    """Refuse a plain model's ``load_from`` that would set fewer than half of its entries
    because the shared ones have other shapes (the same model at another width); see
    :func:`~expand_mm.checkpoint.refuse_mostly_misfitting`. ExpandNet and wrapper
    models are checked by ``ExpandCheckpointLoadHook``.

    Args:
        model: The unwrapped model being trained.
        path: ``load_from`` (a local file; anything else is not read here).
    """
    deployable, prefix = find_deployable(model)
    if prefix or expanded_layers(deployable) or not isinstance(path, str) or '://' in path:
        return
    state_dict = read_checkpoint(path, mmap=True)['state_dict']
    refuse_mostly_misfitting(expanded_key_shapes(model), state_dict, f'load_from={path!r}',
                             type(model).__name__)


#: Attribute names of the heads whose ``num_classes`` must cover the data's classes
#: (an RPN head's single class is not the data's).
CLASS_HEADS = ('bbox_head', 'mask_head', 'decode_head', 'auxiliary_head')


def _class_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The deployable network's heads named in :data:`CLASS_HEADS` that have an int
    ``num_classes`` (``roi_head.bbox_head``, a cascade's ``roi_head.bbox_head.0``, ...)."""
    heads = []
    for path, module in find_deployable(model)[0].named_modules():
        names = [part for part in path.split('.') if not part.isdigit()]
        if names and names[-1] in CLASS_HEADS and isinstance(
                getattr(module, 'num_classes', None), int):
            heads.append((path, module))
    return heads


def _leaf_datasets(dataset: Any) -> list:
    """The datasets inside dataset wrappers (``RepeatDataset``, ``ConcatDataset``, ...)."""
    inner = getattr(dataset, 'datasets', None)
    if isinstance(inner, (list, tuple)):
        return [leaf for part in inner for leaf in _leaf_datasets(part)]
    inner = getattr(dataset, 'dataset', None)
    return _leaf_datasets(inner) if inner is not None and inner is not dataset else [dataset]


def check_training_data(model: nn.Module, dataset: Any) -> None:
    """Refuse training data whose classes the model's heads or the annotations do not fit.

    A head with fewer classes than the data (``num_classes=3`` on 10 classes)
    fails in the loss at the first iteration with a bare error; class names
    that are not in the annotations drop their boxes (see
    :func:`~expand_mm.datasets_check.check_annotations`, here on the built
    datasets, which covers runs that do not start from ``tools/train.py``).

    Args:
        model: The model being trained (wrappers and DDP included).
        dataset: The training dataset as built (wrappers included).

    Raises:
        ConfigError: Naming the head, its ``num_classes`` and the data's
            classes, or the class names that fit no annotation.
    """
    heads = [(path, module.num_classes) for path, module in _class_heads(model)]
    for leaf in _leaf_datasets(dataset):
        classes = tuple((getattr(leaf, 'metainfo', None) or {}).get('classes') or ())
        for path, num_classes in heads:
            if num_classes < len(classes):
                raise ConfigError(
                    f'{path}.num_classes={num_classes}, but the training data has '
                    f'{len(classes)} classes {classes[:10]}{" ..." * (len(classes) > 10)}: '
                    f'the labels from {num_classes} on would fail in the loss. Set '
                    f'{path}.num_classes={len(classes)} in the model config, or train on '
                    f"{num_classes} classes with the dataset's metainfo=dict(classes=(...))")
        if isinstance(getattr(leaf, 'ann_file', None), str) and classes:
            check_annotations(dict(type=type(leaf), ann_file=leaf.ann_file,
                                   data_prefix=dict(getattr(leaf, 'data_prefix', {}) or {}),
                                   ann_subdir=getattr(leaf, 'ann_subdir', 'Annotations'),
                                   metainfo=dict(classes=classes)), 'train_dataloader')


#: What one expanded layer's float64 check holds, in units of the layer's
#: parameter count times 8 bytes: its float64 copy and the composition's
#: float64 factors and intermediates (measured on SSD300's largest layer: 3.2).
FLOAT64_WORK_PER_PARAM_BYTES = 3 * 8

#: Below this a save's contraction is not worth a line in the log.
LARGE_SAVE_BYTES = 1 << 30


def contraction_memory(model: nn.Module) -> dict[str, Any] | None:
    """What writing a compact checkpoint adds to a training process's memory.

    :class:`~expand_mm.hooks.ContractCheckpointHook` contracts the model in
    memory: it holds the compact model, and checks one expanded layer at a
    time in float64 (see :func:`~expand_mm.verification.layer_contraction_errors`).

    Args:
        model: The training model (an ExpandNet or a wrapper of one).

    Returns:
        ``compact_bytes``, ``layer_bytes`` (the largest layer's float64 work),
        ``layer`` (its path) and ``total_bytes``; None without expanded layers.
    """
    deployable, _ = find_deployable(model)
    layers = expanded_layers(deployable)
    if not layers:
        return None
    inside = {id(p) for _, layer in layers for p in layer.parameters()}
    compact_bytes = sum(t.numel() * t.element_size()
                        for t in list(deployable.parameters()) + list(deployable.buffers())
                        if id(t) not in inside)
    compact_bytes += sum(layer.num_params_compact() * next(layer.parameters()).element_size()
                         for _, layer in layers)
    path, largest = max(layers, key=lambda item: item[1].num_params_expanded())
    layer_bytes = largest.num_params_expanded() * FLOAT64_WORK_PER_PARAM_BYTES
    return dict(compact_bytes=compact_bytes, layer_bytes=layer_bytes, layer=path,
                total_bytes=compact_bytes + layer_bytes)


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is no such file)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def save_memory_note(model: nn.Module, available: int | None) -> tuple[str, str] | None:
    """``(level, message)`` saying what each save will need, when that is large.

    Large is at least :data:`LARGE_SAVE_BYTES`; the level is ``'warning'``
    when it is more than half of ``available`` (the memory free before
    training starts, which training itself will take a share of).
    """
    need = contraction_memory(model)
    if need is None or need['total_bytes'] < LARGE_SAVE_BYTES:
        return None
    gib = 1 << 30
    message = (f'each checkpoint save writes its compact twin from the model in memory: about '
               f'{need["total_bytes"] / gib:.1f} GiB on top of training (the compact model, '
               f'{need["compact_bytes"] / gib:.2f} GiB, and the float64 check of one expanded '
               f'layer at a time, the largest {need["layer"]!r}: '
               f'{need["layer_bytes"] / gib:.1f} GiB)')
    if available is None:
        return 'info', message
    message += f'; {available / gib:.1f} GiB of memory is available now'
    if need['total_bytes'] > available / 2:
        return 'warning', (message + ': if the save runs out of memory, lower the expansion '
                           'ratio of the largest layers or set '
                           'default_hooks.expand_contract.verify=False (the float64 check) and '
                           'contract afterwards with tools/contract.py')
    return 'info', message
