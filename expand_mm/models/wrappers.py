"""Common base of training-time wrappers: a model trained around a deployable network.

A training-time wrapper (:class:`~expand_mm.models.Distiller`,
:class:`~expand_mm.models.AuxOverParam`) is an MMEngine ``BaseModel`` that
holds the network to deploy -- a stock compact model or an ExpandNet of one --
as a submodule and adds what only training needs (a teacher, adapters, a wider
auxiliary branch). It joins the protocol of :mod:`expand_mm.models.deployable`
(``deployable_model()``, and ``deployable_cfg()`` for its config), through which
:class:`~expand_mm.hooks.ContractCheckpointHook`, ``tools/contract.py`` and
:class:`~expand_mm.hooks.ExpandCheckpointLoadHook` find the deployable entries
of its checkpoints.

Everything but the training loss goes to the deployable network: the data
preprocessor is its own, and ``predict`` / ``tensor`` forwards (hence
``val_step`` / ``test_step``, the mmdet / mmseg metrics and visualisation) run
it alone, so what is evaluated during training is what is deployed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Mapping, Sequence

from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from ..errors import ConfigError
from ..layers import deferred_factor_grads
from .deployable import deferring_expandnet, deployable_model_cfg  # noqa: F401  (public here too)
from .model_cfg import apply_data_preprocessor


def build_inner_model(cfg: Mapping, key: str, owner: str,
                      data_preprocessor: dict | None = None,
                      overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a wrapped model from its config, as MMEngine's Runner would build it alone.

    Args:
        cfg: The model config (may be ``type='ExpandNet'`` or another wrapper).
        key: Its config key, for error messages (e.g. ``'model.student'``).
        owner: The wrapper's type name, for error messages.
        data_preprocessor: The config's top-level ``data_preprocessor`` that the
            Runner hands to the top-level model; given to the inner model when
            its config has none.
        overrides: Other keys mm APIs set on the top-level model dict (mmseg's
            ``init_model`` sets ``pretrained`` and ``train_cfg``).
    """
    if not isinstance(cfg, Mapping) or 'type' not in cfg:
        raise ConfigError(f'{owner}: `{key}` must be a model config dict with a `type` (e.g. '
                          f'{{{{_base_.model}}}} or dict(type=\'ExpandNet\', model=...)), got '
                          f'{type(cfg).__name__}')
    cfg = copy.deepcopy(dict(cfg))
    apply_data_preprocessor(cfg, data_preprocessor, owner)
    cfg.update(overrides or {})
    model = MODELS.build(cfg)
    if not isinstance(model, BaseModel):
        raise ConfigError(f'{owner}: `{key}` built a {type(model).__name__}, not an MMEngine '
                          'BaseModel (a detector / segmentor config was expected)')
    return model


def get_submodule(model: nn.Module, path: str, key: str, owner: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error naming the config key and the choices."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        children = [name for name, _ in model.named_children()]
        raise ConfigError(f'{owner}: `{key}`={path!r} is not a module path of the '
                          f'{type(model).__name__} (its top-level modules: {children}); '
                          "use a path such as 'neck', 'bbox_head' or 'decode_head'") from None


@contextlib.contextmanager
def record_forward(modules: Mapping[str, nn.Module], inputs: bool = False
                   ) -> Iterator[dict[str, Any]]:
    """Record what each module's ``forward`` returns (or receives) inside the block.

    The instance's ``forward`` is replaced for the duration of the block rather
    than hooked: mmseg's heads call ``self.forward(...)`` directly in
    ``loss()``, which module hooks never see. The last call of each module is
    kept.

    Args:
        modules: Name -> module to record.
        inputs: Record the first positional argument instead of the output.

    Yields:
        Name -> recorded value (filled as the modules run).
    """
    record: dict[str, Any] = {}
    patched = []
    for name, module in modules.items():
        if any(module is m for m, _ in patched):
            continue
        names = [n for n, m in modules.items() if m is module]
        had_own = 'forward' in vars(module)
        original = module.forward

        def forward(*args, _original=original, _names=names, **kwargs):
            out = _original(*args, **kwargs)
            for n in _names:
                record[n] = args[0] if inputs else out
            return out

        module.forward = forward
        patched.append((module, original if had_own else None))
    try:
        yield record
    finally:
        for module, original in patched:
            if original is None:
                del module.forward
            else:
                module.forward = original


class TrainingWrapper(BaseModel):
    """Base of the training-time wrappers (see the module docstring).

    Subclasses build their submodules, set ``self.data_preprocessor`` to the
    deployable network's, and implement :meth:`deployable_model`,
    :meth:`deployable_cfg`, :meth:`loss` and :meth:`_init_parts`.
    """

    @classmethod
    def deployable_cfg(cls, cfg: Mapping) -> Any:
        """The config of the deployable network inside this wrapper's config ``cfg``."""
        raise NotImplementedError

    def deployable_model(self) -> nn.Module:
        """The wrapped network that is deployed (the protocol's one method)."""
        raise NotImplementedError

    def _init_parts(self) -> Sequence[nn.Module]:
        """Submodules whose own ``init_weights()`` initialises them."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Initialise each part on its own.

        Each part is initialised as a top-level model: an ExpandNet's
        ``init_weights`` swaps its expanded layers for compact stand-ins while
        its ``init_cfg`` acts, which MMEngine's recursive initialisation (that
        records every parameter of the top-level model first) would refuse.
        """
        for part in self._init_parts():
            if callable(getattr(part, 'init_weights', None)):
                part.init_weights()
        self._is_init = True

    def forward(self, inputs: Any, data_samples: Any = None, mode: str = 'tensor') -> Any:
        """``mode='loss'``: :meth:`loss`; ``'predict'`` / ``'tensor'``: the deployable network."""
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        return self.deployable_model()(inputs, data_samples, mode=mode)

    def loss(self, inputs: Any, data_samples: Any) -> dict:
        """The training losses (implemented by each wrapper)."""
        raise NotImplementedError

    def predict(self, inputs: Any, data_samples: Any = None) -> Any:
        """The deployable network's predictions."""
        return self.deployable_model().predict(inputs, data_samples)

    def train_step(self, data: Any, optim_wrapper: Any) -> dict:
        """MMEngine's ``train_step``, with an ExpandNet's deferred factor gradients.

        An ExpandNet built with ``defer_factor_grads=True`` defers its factor
        gradients inside its own ``train_step``, which a wrapper does not call;
        the same switch is made here around the wrapper's step. As for a bare
        ExpandNet, distributed training runs the DDP wrapper's train step, not
        this one: ``ExpandNetDistributedDataParallel`` makes the switch there.
        """
        inner = deferring_expandnet(self)
        with deferred_factor_grads(inner) if inner is not None else contextlib.nullcontext():
            return super().train_step(data, optim_wrapper)


def add_loss_prefix(losses: Mapping[str, Any], prefix: str, weight: float = 1.0) -> dict:
    """``losses`` with ``prefix`` on every key and the loss terms scaled by ``weight``.

    Keys containing ``'loss'`` are the ones MMEngine's ``parse_losses`` sums;
    their values (a tensor or a list of tensors) are scaled, the other logged
    values (e.g. ``acc_seg``) are kept as they are.
    """
    out = {}
    for key, value in losses.items():
        if 'loss' in key and weight != 1.0:
            value = ([weight * v for v in value] if isinstance(value, (list, tuple))
                     else weight * value)
        out[prefix + key] = value
    return out
