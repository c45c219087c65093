"""How the composed kernels of an ExpandNet's start compare in size with the compact model's,
and what giving them the compact size would do to their relative Adam step.

    python projects/digits/tools/kernel_scale.py EXPANDNET_CONFIG [--seed 0]

For every expanded layer: ``s = rms(compact init kernel) / rms(composed kernel)``,
both as the config initialises them. Scaling each of the ``L`` factors by
``s ** (1 / L)`` gives the composed kernel the compact size; for a layer
followed by batch norm that leaves the function unchanged, and under sign-like
(Adam) steps the kernel's relative step shrinks by exactly ``s ** (-1 / L)``
(the composition is multilinear: ``tests/test_kernel_step.py`` checks it), the
same as that change of the factor rate (``docs/studies.md``, "Why r = 2 trains
below r = 4").
"""
from __future__ import annotations

import argparse
import statistics

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import expand_mm
from expand_mm.apis import compact_config
from expand_mm.models.deployable import find_deployable
from expand_mm.optim.step_response import composed_weight, rms


def kernel_scales(config: str, seed: int = 0) -> list[tuple[str, float, float]]:
    """``(layer path, s, s ** (-1 / L))`` per expanded layer."""
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
        rows.append((path, scale, scale ** (-1 / len(layer.sublayers))))
    return rows


def main() -> None:
    """Print the medians and ranges over the config's expanded layers."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an ExpandNet config')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    rows = kernel_scales(args.config, args.seed)
    for name, values in (('compact / composed kernel RMS', [r[1] for r in rows]),
                         ('relative step at the compact size, s^(-1/L)', [r[2] for r in rows])):
        print(f'{name}: median {statistics.median(values):.3f} '
              f'({min(values):.3f}..{max(values):.3f}) over {len(rows)} layers')


if __name__ == '__main__':
    main()
