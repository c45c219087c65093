"""``model_wrapper_cfg=dict(type='ExpandNetDistributedDataParallel')``: DDP with deferred factor gradients.

MMEngine trains a distributed model through ``MMDistributedDataParallel.train_step``,
not the model's own ``train_step``, so an ExpandNet's deferred factor gradients
(see :func:`expand_mm.surgery.deferred_factor_grads`) are off under the stock
wrapper: the same gradients, at the higher peak memory of plain autograd. This
wrapper is the stock one with the switch made around its step.

Why it is correct under DDP: DDP all-reduces a parameter's gradient from a hook
on its gradient accumulator and finishes the step in a callback it queues on
the autograd engine once every bucket is ready. Deferred layers hand their
factors' gradients over in a callback queued on the same engine; the
accumulator hooks fire there like anywhere else, the last buckets become ready
there, and DDP's own finishing callback runs after them.

Models with parameters that get no gradient (a layer whose output feeds no
loss) need DDP to know which ones. ``find_unused_parameters=True`` finds them
by walking the graph at the end of ``forward``, which cannot see the factors
behind a deferred composition: it would declare them unused and mark them
ready before their gradients exist, so with it the wrapper keeps plain
autograd and says so once. ``static_graph=True`` instead records, in the first
step, which gradients arrived by the end of the backward pass (a callback that
DDP queues from its output node); the wrapper queues the flush when the
backward pass starts, ahead of that callback, so the factors count as used and
their gradients are reduced. Use ``static_graph=True`` when the set of
parameters that get gradients is the same in every step (as in stock
detectors and segmentors).
"""
from __future__ import annotations

from typing import Any

from mmengine.logging import MMLogger
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor, nn

from ..layers import deferred_factor_grads, flush_deferred_factor_grads_first
from .deployable import deferring_expandnet


@MODEL_WRAPPERS.register_module()
class ExpandNetDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` whose ``train_step`` defers ExpandNet factor gradients.

    Use it in the config of a distributed ExpandNet run::

        model_wrapper_cfg = dict(type='ExpandNetDistributedDataParallel')

    or, for a model with parameters that get no gradient,
    ``dict(type='ExpandNetDistributedDataParallel', static_graph=True)``. Other
    ``DistributedDataParallel`` arguments go in the same dict: once
    ``model_wrapper_cfg`` is set, MMEngine ignores a top-level
    ``find_unused_parameters``.

    The model may be an ExpandNet or a training-time wrapper around one (a
    ``Distiller``, ``AuxOverParam``); a model without expanded layers, or an
    ExpandNet built with ``defer_factor_grads=False``, trains exactly as under
    ``MMDistributedDataParallel``. The gradients are the ones plain autograd
    gives; only the peak memory of the step is lower.

    MMEngine's Runner passes ``device_ids=[LOCAL_RANK]`` to every DDP wrapper;
    for a model on the CPU (the gloo backend) they are dropped, because
    ``DistributedDataParallel`` refuses device ids for CPU modules.
    ``broadcast_buffers`` defaults to ``False``, as for the Runner's default
    wrapper. With ``find_unused_parameters=True`` (without ``static_graph``)
    or ``detect_anomalous_params=True`` the ExpandNet keeps plain autograd.

    Args:
        module: The model to wrap.
        device_ids: As for ``DistributedDataParallel``.
        **kwargs: Other ``MMDistributedDataParallel`` arguments.
    """

    def __init__(self, module: nn.Module, device_ids: Any = None, **kwargs: Any) -> None:
        if device_ids is not None and all(p.device.type == 'cpu' for p in module.parameters()):
            device_ids = None
        # What MMEngine's Runner gives its default wrapper: each rank keeps its
        # own BN statistics (DDP's own default would copy rank 0's every step).
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=device_ids, **kwargs)
        self._deferring = deferring_expandnet(self.module)
        # Both walk the loss graph, which holds the deferred leaves, not the factors.
        blocker = ('find_unused_parameters=True' if self.find_unused_parameters
                   and not self.static_graph else
                   'detect_anomalous_params=True' if self.detect_anomalous_params else None)
        if self._deferring is not None and blocker:
            MMLogger.get_current_instance().warning(
                f'ExpandNetDistributedDataParallel: {blocker}, so the ExpandNet keeps plain '
                'autograd (same gradients, higher peak memory): it looks for the parameters '
                'that the loss reaches, and the factors behind a deferred composition get '
                'their gradients after the backward pass.'
                + (' Use static_graph=True instead (parameters without a gradient allowed, '
                   'the same ones in every step, no gradient accumulation), or '
                   'find_unused_parameters=False if every parameter gets a gradient.'
                   if blocker.startswith('find_unused') else ''))
            self._deferring = None

    @property
    def defers_factor_grads(self) -> bool:
        """Whether ``train_step`` runs with deferred factor gradients."""
        return self._deferring is not None

    def train_step(self, data: Any, optim_wrapper: Any) -> dict:
        """``MMDistributedDataParallel.train_step`` with deferred factor gradients."""
        if self._deferring is None:
            return super().train_step(data, optim_wrapper)
        with deferred_factor_grads(self._deferring):
            return super().train_step(data, optim_wrapper)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """DDP's forward; the losses of a deferring ExpandNet flush its factor
        gradients when their backward pass starts (see the module's notes on
        ``static_graph``)."""
        outputs = super().forward(*inputs, **kwargs)
        if self._deferring is not None and kwargs.get('mode') == 'loss':
            nodes = {}
            for loss in _tensors(outputs):
                if loss.grad_fn is not None:
                    nodes.setdefault(id(loss.grad_fn), loss)
            for loss in nodes.values():
                flush_deferred_factor_grads_first(loss)
        return outputs


def _tensors(outputs: Any) -> list[Tensor]:
    """The tensors in a (nested) dict / list / tuple of model outputs."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in _tensors(item)]
    return []
