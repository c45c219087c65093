"""Turn an ExpandNet training checkpoint into a stock compact checkpoint.

    python tools/contract.py CONFIG CKPT OUT [--verify] [--img-size H W]

Prints parameters and MACs of the training form (the explicit chain, what the
paper's training pays) and of the deployed compact model, and, with
``--verify``, the largest error between the two on a probe input.
"""
import argparse
import sys

import expand_mm  # noqa: F401
from expand_mm.checkpoint import CheckpointError, read_checkpoint
from expand_mm.deploy import count_macs, write_compact_checkpoint
from expand_mm.models import compact_model_cfg, deployable_model
from expand_mm.surgery import count_params, set_expand_mode
from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, DefaultScope


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='the ExpandNet config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='training checkpoint (epoch_N.pth / iter_N.pth)')
    parser.add_argument('out', help='where to write the compact checkpoint')
    parser.add_argument('--verify', action='store_true',
                        help='check the contraction on a probe input (refuses to write on a '
                        'mismatch)')
    parser.add_argument('--img-size', type=int, nargs=2, default=(320, 320),
                        metavar=('H', 'W'), help='input size for MACs and the probe')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def main() -> int:
    """Contract, verify, report."""
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if compact_model_cfg(cfg.model) is cfg.model:
        print(f'error: {args.config} is not an ExpandNet config (model.type is '
              f'{cfg.model.get("type")!r}, expected "ExpandNet")', file=sys.stderr)
        return 2
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        expanded = deployable_model(MODELS.build(cfg.model)).eval()
        compact = MODELS.build(compact_model_cfg(cfg.model)).eval()
    try:
        read_checkpoint(args.checkpoint)
        out, errors = write_compact_checkpoint(expanded, args.checkpoint, args.out,
                                               probe_shape=(1, 3, *args.img_size),
                                               verify=args.verify)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    set_expand_mode(expanded, 'explicit')
    rows = [('training form (explicit chain)', count_params(expanded),
             count_macs(expanded, args.img_size)),
            ('deployed compact model', count_params(compact), count_macs(compact, args.img_size))]
    print(f'{"":32s}{"params":>14s}{"MACs @" + "x".join(map(str, args.img_size)):>18s}')
    for name, params, flops in rows:
        print(f'{name:32s}{params:>14,d}{flops:>18,d}')
    print(f'ratio training/deployed: params {rows[0][1] / rows[1][1]:.2f}x, '
          f'MACs {rows[0][2] / rows[1][2]:.2f}x')
    if errors is not None:
        print(f'verified: max abs error {errors["max_abs"]:.3e}, max relative error '
              f'{errors["max_rel"]:.3e} (probe 1x3x{args.img_size[0]}x{args.img_size[1]})')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
