"""The fixed input on which a contracted (or baked) network is checked against its source."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from mmengine.model import BaseModel
from torch import nn

#: NCHW shape of the default probe input.
DEFAULT_PROBE_SHAPE = (1, 3, 128, 128)


def probe_forward(model: nn.Module, inputs: torch.Tensor) -> Any:
    """Raw network outputs: ``mode='tensor'`` for MMEngine models, a call otherwise."""
    if isinstance(model, BaseModel):
        return model(inputs, mode='tensor')
    return model(inputs)


def make_probe(model: nn.Module, shape: Sequence[int] = DEFAULT_PROBE_SHAPE) -> torch.Tensor:
    """A fixed pseudo-random input on the model's device (seeded: reproducible)."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)
