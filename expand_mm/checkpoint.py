"""Checkpoints of expanded models: read safely, recognise, convert.

A model built by ``type='ExpandNet'`` can meet two kinds of state dict:

* the *expanded* form it writes itself while training (factor keys such as
  ``backbone.conv1.conv.convs.0.weight``), which loads as is;
* the *compact* form of the stock model (``backbone.conv1.conv.weight``), e.g. a
  pretrained compact model or a compact checkpoint written by
  :class:`~expand_mm.hooks.ContractCheckpointHook`. It is converted by
  factorising every compact kernel exactly (``keep_weights``), so the expanded
  model computes what the compact checkpoint did.

Anything else is refused with the keys that do not fit, before a single tensor
is loaded. Independent of mmdet / mmseg.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ExpandMMError
from .contraction import expanded_layer_paths


# ``meta`` key of checkpoints saved while NonlinearInitHook had a nonlinearity
# between the sub-layers: such a checkpoint has no compact equivalent.
NONLINEAR_INIT_META_KEY = 'expand_mm_nonlinear_init'


class CheckpointError(ExpandMMError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class UnreadableCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A file that weights-only loading cannot read: it holds other Python objects
    (the refused global is named), or it is corrupt or no checkpoint. An
    ``UnpicklingError`` too, as torch's own refusal is."""


def read_checkpoint(path: str, map_location: Any = 'cpu', mmap: bool = False) -> dict:
    """Load a checkpoint file with a clear error when it is missing or corrupt.

    Args:
        path: Local path of a ``.pth`` file.
        map_location: Passed to ``torch.load``.
        mmap: Memory-map the tensors instead of reading them (a cheap check of
            a file that will be loaded again later); legacy-format files are read.

    Returns:
        The checkpoint dict; a bare state dict is wrapped as ``{'state_dict': ...}``.

    Raises:
        CheckpointError: Missing, unreadable, truncated, or not a checkpoint.
    """
    if not os.path.isfile(path):
        kind = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise CheckpointError(f'checkpoint {path!r} {kind} (looked at {osp.abspath(path)!r})')
    # torch memory-maps only the zip format; legacy (torch < 1.6) files are read in full.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 -- garbage input raises whatever the unpickler hits
        raise unreadable_checkpoint_error(path, err) from err
    if isinstance(checkpoint, Mapping) and 'state_dict' not in checkpoint and checkpoint \
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {'state_dict': dict(checkpoint)}
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get('state_dict'),
                                                             Mapping):
        raise CheckpointError(f'{path!r} holds no state_dict (found {type(checkpoint).__name__}'
                              f' with keys {list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else "-"})')
    return dict(checkpoint)


# torch's weights-only unpickler names the global it refuses in two wordings: one for
# a global outside the allowlist, one for a module it never unpickles from (os, sys, ...).
_REFUSED_GLOBAL = re.compile(r'GLOBAL (\S+) (?:was not an allowed global|whose module \S+ '
                             r'is blocked)')


def refused_global(err: BaseException) -> str | None:
    """The global that torch's weights-only loading refused in ``err``, or None.

    Args:
        err: What ``torch.load(..., weights_only=True)`` raised.
    """
    found = _REFUSED_GLOBAL.search(str(err))
    return found.group(1) if found else None


def unreadable_checkpoint_error(source: str, err: BaseException) -> UnreadableCheckpointError:
    """The :class:`UnreadableCheckpointError` for a file that weights-only loading could not read.

    A file that holds a Python object other than tensors and plain values
    (the refused global is named: what would run if it were unpickled) is
    told apart from one that is corrupt, truncated or no checkpoint at all.

    Args:
        source: The file (path or URL), for the message.
        err: What ``torch.load`` raised.
    """
    name = refused_global(err)
    if name:
        return UnreadableCheckpointError(
            f'cannot read checkpoint {source!r}: it holds a Python object other than tensors '
            f'and plain values ({name}), which checkpoints are not unpickled with (it could '
            'run any code). Re-save its state_dict (and a meta of plain values) where it was '
            'made, or use a checkpoint written by the training runner or tools/contract.py')
    return UnreadableCheckpointError(
        f'cannot read checkpoint {source!r} ({type(err).__name__}: {_load_error_detail(err)}). '
        'The file is corrupt or truncated, or not a PyTorch checkpoint; use a checkpoint '
        'written by the training runner or tools/contract.py')


def _load_error_detail(err: BaseException, limit: int = 160) -> str:
    """The informative part of a ``torch.load`` error, cut at a word.

    torch's weights-only message leads with advice to retry with
    ``weights_only=False``, which does not apply to a file that is not a
    checkpoint (and executes arbitrary code); its unpickler line says what failed.
    """
    text = str(err)
    marker = 'WeightsUnpickler error:'
    if marker in text:
        text = 'WeightsUnpickler error: ' + text.split(marker, 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[0] if lines else repr(err)
    if detail == 'WeightsUnpickler error:' and len(lines) > 1:
        detail += ' ' + lines[1]
    if len(detail) > limit:
        detail = detail[:limit].rsplit(' ', 1)[0] + ' ...'
    return detail


def prepare_output_path(src: str, dst: str) -> str:
    """Make ``dst`` writable for output derived from ``src``, never overwriting ``src``.

    Creates ``dst``'s folder if needed and returns ``dst``.

    Raises:
        CheckpointError: If ``dst`` is ``src`` (the same file under any name),
            which writing would destroy, or an existing folder.
    """
    if osp.isdir(dst):
        raise CheckpointError(f'the output {dst!r} is a folder; give a file path, e.g. '
                              f'{osp.join(dst, osp.basename(src))!r} for the same name there')
    same = osp.realpath(src) == osp.realpath(dst) or (
        osp.exists(src) and osp.exists(dst) and osp.samefile(src, dst))
    if same:
        raise CheckpointError(f'the output {dst!r} is the input checkpoint {src!r}: writing '
                              'would overwrite it. Choose another output path')
    folder = osp.dirname(osp.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    return dst


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = 'module.') -> dict:
    """``state_dict`` with ``prefix`` removed from the keys that start with it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


@dataclass
class KeyMismatch:
    """How a state dict differs from the keys and shapes a model expects."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Total number of problems."""
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    def describe(self, limit: int = 6) -> str:
        """One line per kind of problem, at most ``limit`` keys each."""
        parts = []
        for name, keys in (('missing', self.missing), ('unexpected', self.unexpected),
                           ('wrong shape', self.wrong_shape)):
            if keys:
                more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
                parts.append(f'{name} ({len(keys)}): {", ".join(keys[:limit])}{more}')
        return '; '.join(parts) or 'none'


def _compare(expected: Mapping[str, torch.Size], state_dict: Mapping[str, Any]) -> KeyMismatch:
    mismatch = KeyMismatch()
    for key, shape in expected.items():
        if key not in state_dict:
            mismatch.missing.append(key)
        elif tuple(state_dict[key].shape) != tuple(shape):
            mismatch.wrong_shape.append(
                f'{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(shape)})')
    mismatch.unexpected = [k for k in state_dict if k not in expected]
    return mismatch


def expanded_key_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Keys and shapes of ``model.state_dict()`` (the expanded form)."""
    return {k: v.shape for k, v in model.state_dict().items()}


def compact_key_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Keys and shapes the contracted ``model`` would have (without copying it); a layer
    shared by several paths (RTMDet's head) has its keys under each of them."""
    layers = expanded_layer_paths(model)
    prefixes = tuple(p + '.' for p, _ in layers)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for path, layer in layers:
        shapes[path + '.weight'] = layer.weight.shape
        if layer.bias is not None:
            shapes[path + '.bias'] = layer.bias.shape
    return shapes


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> KeyMismatch:
    """How ``state_dict`` differs from ``model.state_dict()``'s keys and shapes.

    Args:
        model: The model the state dict is meant for (as it is: an expanded
            model is compared with its expanded form).
        state_dict: Its keys may carry a DDP ``module.`` prefix.
    """
    return _compare(expanded_key_shapes(model), strip_prefix(state_dict))


def match_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                     strict: bool = True, source: str = 'checkpoint') -> str:
    """Recognise ``state_dict`` as the expanded or the compact form of ``model``.

    Both forms load with ``model.load_state_dict``: expanded layers factorise
    compact kernels themselves (see ``ExpandedLayer._load_from_state_dict``).

    Args:
        model: The (expanded) model the state dict is meant for.
        state_dict: Its keys may carry a DDP ``module.`` prefix.
        strict: If False, a partial state dict (e.g. a backbone-only or a
            different-head checkpoint for fine-tuning) is accepted as the form
            it is closest to; the loader reports the rest.
        source: Name used in error messages (e.g. the file path).

    Returns:
        ``'expanded'`` or ``'compact'``.

    Raises:
        CheckpointError: If, with ``strict``, the state dict fits neither form,
            naming the keys that do not fit.
    """
    state_dict = strip_prefix(state_dict)
    expanded_mismatch = _compare(expanded_key_shapes(model), state_dict)
    if expanded_mismatch.count == 0:
        return 'expanded'
    compact_mismatch = _compare(compact_key_shapes(model), state_dict)
    if compact_mismatch.count == 0:
        return 'compact'
    best, kind = min((expanded_mismatch, 'expanded'), (compact_mismatch, 'compact'),
                     key=lambda t: t[0].count)
    if not strict:
        return kind
    # Each form on its own: a wrapper's checkpoint holds one of them, not their union.
    wrapper = (wrapper_checkpoint_hint(expanded_key_shapes(model), state_dict)
               or wrapper_checkpoint_hint(compact_key_shapes(model), state_dict))
    if wrapper:
        raise CheckpointError(f'{source} does not fit {type(model).__name__}: {wrapper}.')
    raise CheckpointError(
        f'{source} fits neither the expanded nor the compact form of '
        f'{type(model).__name__}. Closest: the {kind} form, but {best.describe()}. '
        'Use a checkpoint of this config (iter_N.pth / epoch_N.pth or *_compact.pth) '
        'or of its stock compact config; a training checkpoint of another expansion (other '
        'ratio or strategy) loads once contracted: python tools/contract.py ITS_CONFIG CKPT '
        'OUT, then load_from=OUT.')


def wrapped_model_prefix(model_shapes: Mapping[str, torch.Size],
                         state_dict: Mapping[str, Any]) -> str | None:
    """The key prefix under which ``state_dict`` holds a model of ``model_shapes``, if any.

    A training-time wrapper's checkpoint (a ``Distiller``'s ``student.``, an
    ``AuxOverParam``'s ``model.``) holds its network under a prefix; given with
    the network's own config, it matches (almost) no key. Prefixes of one or
    two dotted components are tried; the one under which the most keys of
    the model are found with their shapes (a wider teacher's have other
    shapes) is returned if that is at least half of them, and more than
    without a prefix.

    Args:
        model_shapes: The model's keys and their shapes.
        state_dict: The checkpoint's state dict.
    """
    state_dict = strip_prefix(state_dict)

    def found_under(prefix: str) -> int:
        return sum(tuple(getattr(state_dict.get(prefix + key), 'shape', ())) == tuple(shape)
                   for key, shape in model_shapes.items() if prefix + key in state_dict)

    candidates = set()
    for key in state_dict:
        parts = key.split('.')
        candidates.update('.'.join(parts[:depth]) + '.' for depth in (1, 2)
                          if len(parts) > depth)
    best, found = None, found_under('')
    for prefix in sorted(candidates):
        count = found_under(prefix)
        if count > found:
            best, found = prefix, count
    return best if best is not None and 2 * found >= len(model_shapes) else None


def wrapper_checkpoint_hint(model_shapes: Mapping[str, torch.Size],
                            state_dict: Mapping[str, Any]) -> str:
    """What to use instead of a wrapper's training checkpoint; ``''`` if it is none.

    See :func:`wrapped_model_prefix` for the arguments.
    """
    prefix = wrapped_model_prefix(model_shapes, state_dict)
    if prefix is None:
        return ''
    if prefix.startswith('teacher.'):
        return (f'its entries for this model are under {prefix!r}: they are the teacher of a '
                'Distiller training checkpoint. To start from them, save them alone without '
                f'the prefix (state_dict={{k[{len(prefix)}:]: v for k, v in '
                f'state_dict.items() if k.startswith({prefix!r})}})')
    return (f'its entries for this model are under {prefix!r}: it is a training checkpoint of '
            'a training-time wrapper (Distiller, AuxOverParam) around it. Use its '
            '*_compact.pth (or python tools/contract.py WRAPPER_CONFIG CKPT OUT), or the '
            'wrapper config it was trained with')


def expanded_chain_paths(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Paths of ``model``'s layers that ``state_dict`` holds as expanded chains.

    A layer at ``path`` whose ``path.weight`` is missing while
    ``path.convs.0.weight`` / ``path.linears.0.weight`` is there: the state
    dict is an ExpandNet training checkpoint of this (compact) model.
    """
    state_dict = strip_prefix(state_dict)
    paths = []
    for key in model.state_dict():
        if key.endswith('.weight') and key not in state_dict:
            path = key[:-len('.weight')]
            if f'{path}.convs.0.weight' in state_dict or f'{path}.linears.0.weight' in state_dict:
                paths.append(path)
    return paths


def check_plain_model_checkpoint(model: nn.Module, state_dict: Mapping[str, Any],
                                 source: str) -> KeyMismatch:
    """Refuse a checkpoint that does not give a plain (not expanded) model all its weights.

    MMEngine loads checkpoints non-strictly and only logs the mismatch, so an
    ExpandNet training checkpoint given with the compact config would run as a
    model with random layers. Missing BatchNorm step counters (older and
    converted checkpoints; eval never reads them) are tolerated; keys the
    model lacks are returned for the caller to report.

    Args:
        model: The plain model (e.g. built from a stock compact config).
        state_dict: The checkpoint's ``state_dict``.
        source: Name used in the message (the file path).

    Returns:
        The mismatch (only ``unexpected`` can be non-empty).

    Raises:
        CheckpointError: Naming the missing and wrong-shaped keys, and what to
            use instead when the checkpoint holds expanded chains.
    """
    mismatch = compare_state_dict(model, state_dict)
    mismatch.missing = [k for k in mismatch.missing if not k.endswith('num_batches_tracked')]
    if mismatch.missing or mismatch.wrong_shape:
        chains = expanded_chain_paths(model, state_dict)
        wrapper = wrapper_checkpoint_hint(expanded_key_shapes(model), state_dict)
        if wrapper:
            hint = wrapper[0].upper() + wrapper[1:]
        elif chains:
            hint = (f'It is an ExpandNet training checkpoint ({len(chains)} layers, e.g. '
                    f'{chains[0]!r}, are expanded chains): use its *_compact.pth (or python '
                    'tools/contract.py EXPANDNET_CONFIG CKPT OUT), or the ExpandNet config it '
                    'was trained with')
        else:
            hint = ('Use a checkpoint trained with this config; an ExpandNet training '
                    'checkpoint (iter_N.pth / epoch_N.pth) goes with the ExpandNet config it '
                    'was trained with, or through python tools/contract.py EXPANDNET_CONFIG '
                    'CKPT OUT; a *_compact.pth goes with the compact config')
        raise CheckpointError(f'{source} does not fit {type(model).__name__}: '
                              f'{mismatch.describe()}. {hint}.')
    return mismatch


def refuse_mostly_misfitting(shapes: Mapping[str, torch.Size], state_dict: Mapping[str, Any],
                             source: str, model_name: str) -> None:
    """Refuse a checkpoint that would set fewer than half of a model's entries because
    entries it shares with the model have other shapes (a model of another width).

    MMEngine loads such a checkpoint non-strictly with a size-mismatch warning
    per entry, and the model trains almost from scratch. A checkpoint that
    holds only a part of the model (a backbone), with the shapes it has, is
    not refused.

    Args:
        shapes: The model's keys and shapes (of the form the checkpoint is
            loaded as).
        state_dict: The checkpoint's state dict (a DDP ``module.`` prefix is
            ignored).
        source: Names the checkpoint in the message (e.g. ``load_from='...'``).
        model_name: Names the model in the message.

    Raises:
        CheckpointError: Naming how many entries fit, examples of the others,
            and what to use instead.
    """
    state_dict = strip_prefix(state_dict)
    shared = {key: tuple(getattr(state_dict[key], 'shape', ())) for key in shapes
              if key in state_dict}
    wrong = [f'{key} (checkpoint {have}, model {tuple(shapes[key])})'
             for key, have in shared.items() if have != tuple(shapes[key])]
    fits = len(shared) - len(wrong)
    if wrong and 2 * fits < len(shapes):
        raise CheckpointError(
            f'{source} fits only {fits} of the {len(shapes)} entries of {model_name}: '
            f'{len(wrong)} have other shapes, e.g. {", ".join(wrong[:3])}, so the model would '
            'train almost from scratch. It is a checkpoint of another variant of the model '
            '(another width or depth): use a checkpoint of this config, or to start one part '
            "from it, give that part init_cfg=dict(type='Pretrained', checkpoint=..., "
            "prefix='backbone.') instead of load_from")
