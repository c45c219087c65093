"""Turn an ExpandNet (or training-time wrapper) checkpoint into a stock compact checkpoint.

    python tools/contract.py CONFIG CKPT OUT [--verify] [--img-size H W]

Prints parameters and MACs of the training form (the explicit chain, what the
paper's training pays) and of the deployed compact model, and, with
``--verify``, the largest error between the two on a probe input. With a
training-time wrapper config (``type='Distiller'``, ``type='AuxOverParam'``)
only its deployable network's entries are kept (contracted if it is an
ExpandNet, as they are otherwise); the teacher, adapters or auxiliary branch
are counted but not written.
"""
import argparse
import sys

import expand_mm  # noqa: F401
from expand_mm.checkpoint import CheckpointError, prepare_output_path
from expand_mm.deploy import count_macs, find_deployable, write_compact_checkpoint
from expand_mm.surgery import contract_model, count_params, expanded_layers, set_expand_mode
from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, DefaultScope


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='the ExpandNet (or Distiller / AuxOverParam) config the '
                        'checkpoint was trained with')
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
    try:  # before the model is built: a wrong output path costs nothing
        prepare_output_path(args.checkpoint, args.out)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as the Runner builds the model
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        model = MODELS.build(model_cfg).eval()
    try:
        deployable, prefix = find_deployable(model)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if not prefix and not expanded_layers(deployable):
        print(f'error: {args.config} is neither an ExpandNet config nor a training-time wrapper '
              f'(model.type is {cfg.model.get("type")!r}; expected "ExpandNet", or a wrapper '
              'such as "Distiller" / "AuxOverParam")', file=sys.stderr)
        return 2
    try:
        out, errors = write_compact_checkpoint(model, args.checkpoint, args.out,
                                               probe_shape=(1, 3, *args.img_size),
                                               verify=args.verify)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    compact = contract_model(deployable).eval()
    set_expand_mode(deployable, 'explicit')
    label = ('training form (explicit chain)' if expanded_layers(deployable)
             else 'training form (deployable part)')
    rows = [(label, count_params(deployable),
             count_macs(deployable, args.img_size)),
            ('deployed compact model', count_params(compact), count_macs(compact, args.img_size))]
    if prefix:
        print(f'{type(model).__name__}: {count_params(model):,} parameters in training, of '
              f'which {count_params(model) - count_params(deployable):,} outside the '
              f'deployable {prefix.rstrip(".")!r} (not written)')
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
