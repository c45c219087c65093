"""Contract a whole module: every expanded layer back into its compact layer.

Below :mod:`expand_mm.verification` (which checks a contraction) and
:mod:`expand_mm.surgery` (which expands, and offers the checked
:func:`~expand_mm.surgery.contract_model`); knows nothing of mmdet or mmseg.
"""
from __future__ import annotations

import copy

from torch import nn

from .layers import ExpandedLayer


def expanded_layers(model: nn.Module) -> list[tuple[str, ExpandedLayer]]:
    """``(path, layer)`` for every expanded layer in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ExpandedLayer)]


def expanded_layer_paths(model: nn.Module) -> list[tuple[str, ExpandedLayer]]:
    """``(path, layer)`` for every path to an expanded layer, a shared layer once per path
    (as ``model.state_dict()`` lists it)."""
    return [(p, m) for p, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, ExpandedLayer)]


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``path`` of ``root`` (e.g. ``'backbone.conv1.conv'``)."""
    parent_path, _, name = path.rpartition('.')
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def contract_model_(model: nn.Module) -> nn.Module:
    """Contract every expanded layer of ``model`` in place and return it.

    Prefer :func:`compact_copy` (or :func:`~expand_mm.surgery.contract_model`),
    which leave their input untouched; this form is for callers that already
    own a copy.
    """
    compact: dict[int, nn.Module] = {}  # a layer shared by several paths stays shared
    for path, layer in list(model.named_modules(remove_duplicate=False)):
        if isinstance(layer, ExpandedLayer):
            if id(layer) not in compact:
                compact[id(layer)] = layer.contract()
            replace_submodule(model, path, compact[id(layer)])
    return model


def compact_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every expanded layer replaced by its contraction.

    Same result as ``contract_model_(copy.deepcopy(model))``, at the compact
    model's memory instead of the expanded one's: the expanded layers are
    swapped for their contractions while the copy is made and put back (the
    same objects) afterwards, so ``model`` (which may be training, inside DDP
    or on a GPU) is left as it was. A layer shared by several paths stays
    shared in the copy.
    """
    paths = [(path, layer) for path, layer in model.named_modules(remove_duplicate=False)
             if isinstance(layer, ExpandedLayer)]
    contracted: dict[int, nn.Module] = {}
    for _, layer in paths:
        if id(layer) not in contracted:
            contracted[id(layer)] = layer.contract()
    try:
        for path, layer in paths:
            replace_submodule(model, path, contracted[id(layer)])
        return copy.deepcopy(model)
    finally:
        for path, layer in paths:
            replace_submodule(model, path, layer)
