"""How the composed kernels of an ExpandNet's start compare in size with the compact model's,
and what giving them the compact size would do to their relative Adam step.

    python projects/digits/tools/kernel_scale.py EXPANDNET_CONFIG [--seed 0]

For every expanded layer: ``s = rms(compact init kernel) / rms(composed kernel)``,
both as the config initialises them, and the relative one-step move of the
composed kernel (:func:`~expand_mm.optim.step_response.sign_step_response` under
the ``'fan_in'`` shape, divided by the kernel's RMS) after each of the ``L``
factors is scaled by ``s ** (1 / L)``, over the same before scaling. For a
layer followed by batch norm the scaling leaves the function unchanged, and the
ratio is ``s ** (-1 / L)`` to first order: the same as that change of the
factor rate (``docs/studies.md``, "Why r = 2 trains below r = 4").
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import expand_mm
from expand_mm.apis import compact_config
from expand_mm.layers import ExpandedLayer
from expand_mm.models.deployable import find_deployable
from expand_mm.optim.factor_lr import factor_lr_multipliers
from expand_mm.optim.step_response import composed_weight, rms, sign_step_response


def relative_step(layer: ExpandedLayer) -> float:
    """The composed kernel's one-step move per unit rate, relative to its RMS."""
    return sign_step_response(layer, factor_lr_multipliers(layer, 'fan_in')) / rms(
        composed_weight(layer))


def rescaled(layer: ExpandedLayer, scale: float) -> ExpandedLayer:
    """A copy of ``layer`` whose composed kernel is ``scale`` times as large (factors alike)."""
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        for sub in copied.sublayers:
            sub.weight.mul_(scale ** (1 / len(copied.sublayers)))
    return copied


def kernel_scales(config: str, seed: int = 0) -> list[tuple[str, float, float]]:
    """``(layer path, s, relative step after / before scaling)`` per expanded layer."""
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        torch.manual_seed(seed)
        expandnet = MODELS.build(cfg.model)
        expandnet.init_weights()
        compact = MODELS.build(compact_config(cfg).model)
        compact.init_weights()
    compact_weights = dict(compact.named_parameters())
    rows = []
    for path, layer in expand_mm.expanded_layers(find_deployable(expandnet)[0]):
        scale = rms(compact_weights[f'{path}.weight']) / rms(composed_weight(layer))
        rows.append((path, scale, relative_step(rescaled(layer, scale)) / relative_step(layer)))
    return rows


def main() -> None:
    """Print the medians and ranges over the config's expanded layers."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an ExpandNet config')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    rows = kernel_scales(args.config, args.seed)
    for name, values in (('compact / composed kernel RMS', [r[1] for r in rows]),
                         ('relative step after / before scaling', [r[2] for r in rows])):
        print(f'{name}: median {statistics.median(values):.3f} '
              f'({min(values):.3f}..{max(values):.3f}) over {len(rows)} layers')


if __name__ == '__main__':
    main()
