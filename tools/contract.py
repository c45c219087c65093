"""Turn an ExpandNet (or training-time wrapper) checkpoint into a stock compact checkpoint.

    python tools/contract.py CONFIG CKPT OUT [--verify] [--img-size H W]

Prints parameters and MACs of the training form (the explicit chain, what the
paper's training pays) and of the deployed compact model, and, with
``--verify``, the largest error between the two on a probe input. With a
training-time wrapper config (``type='Distiller'``, ``type='AuxOverParam'``)
only its deployable network's entries are kept (contracted if it is an
ExpandNet, as they are otherwise); the teacher, adapters or auxiliary branch
are counted but not written. A checkpoint saved before the last stage of
channel planting becomes the network of its stage (unplanted channels zeroed).

Beside ``OUT`` it writes ``OUT`` with the extension ``.py``: the config of
the compact model (:func:`expand_mm.apis.compact_config`), so
``init_detector('OUT.py', 'OUT.pth')`` / mmseg's ``init_model`` run it.
"""
import argparse
import os.path as osp
import sys

import expand_mm  # noqa: F401
from expand_mm.apis import build_training_model, compact_config
from expand_mm.checkpoint import prepare_output_path, read_checkpoint, strip_prefix
from expand_mm.cli import UsageError, require_file, run_tool
from expand_mm.cost import config_input_size, count_macs, count_training_macs
from expand_mm.deploy import write_compact_checkpoint
from expand_mm.models import find_deployable
from expand_mm.planting import unfinished_planting
from expand_mm.surgery import contract_model, count_params, expanded_layers
from mmengine.config import Config, DictAction


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='the ExpandNet (or Distiller / AuxOverParam) config the '
                        'checkpoint was trained with')
    parser.add_argument('checkpoint', help='training checkpoint (epoch_N.pth / iter_N.pth)')
    parser.add_argument('out', help='where to write the compact checkpoint (its config is '
                        'written beside it, with the extension .py)')
    parser.add_argument('--verify', action='store_true',
                        help='check the contraction on a probe input (refuses to write on a '
                        'mismatch)')
    parser.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size for MACs (default: the config's sliding-window "
                        'crop_size, else its test-pipeline Resize scale, else 320 320) and the '
                        'probe (each side at most 512)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def compact_config_path(out: str, config: str) -> str:
    """Where the compact config goes: ``OUT`` with the extension ``.py``.

    Raises:
        UsageError: If that path is ``OUT`` itself or the input config.
    """
    path = osp.splitext(out)[0] + '.py'
    if osp.realpath(path) == osp.realpath(out):
        raise UsageError(f'the output {out!r} ends in .py, where the compact config is '
                         f'written: give the checkpoint path, e.g. {path[:-3] + ".pth"!r}')
    if osp.exists(path) and osp.samefile(path, config):
        raise UsageError(f'the compact config would be written to {path!r}, the input config: '
                         'give an output path elsewhere (the config goes beside it, as .py)')
    return path


def main() -> int:
    """Contract, verify, report."""
    args = parse_args()
    # Before the model is built: a wrong path costs nothing.
    require_file(args.config, 'config')
    require_file(args.checkpoint, 'checkpoint')
    prepare_output_path(args.checkpoint, args.out)
    config_out = compact_config_path(args.out, args.config)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    size_source = '--img-size'
    if args.img_size is None:
        args.img_size, size_source = (config_input_size(cfg)
                                      or ((320, 320), 'default, none in the config'))
    model = build_training_model(cfg).eval()
    deployable, prefix = find_deployable(model)
    # Memory-mapped: only the meta and the keys are read here.
    header = read_checkpoint(args.checkpoint, mmap=True)
    meta = header.get('meta') or {}
    layers = expanded_layers(deployable)
    keys = set(strip_prefix(header.get('state_dict') or {}))
    del header
    # A wrapper's training checkpoint holds the deployable part under its prefix; a
    # compact checkpoint of it holds the deployable network alone.
    if layers and any(all(f'{start}{path}.weight' in keys for path, _ in layers)
                      for start in {prefix, ''}):
        print(f'note: {args.checkpoint} already holds the compact form (e.g. a *_compact.pth); '
              f'{args.out} will be the same network, checked again')
    # A plain model mid-way through channel planting has a compact form: its stage's
    # network, unplanted channels zeroed.
    if not prefix and not expanded_layers(deployable) and not unfinished_planting(meta):
        raise UsageError(f'{args.config} is neither an ExpandNet config nor a training-time '
                         f'wrapper (model.type is {cfg.model.get("type")!r}; expected '
                         '"ExpandNet", or a wrapper such as "Distiller" / "AuxOverParam")')
    # The check does not depend on the image size; a Cityscapes-size probe would
    # only cost memory (and, on a float32 rounding alarm, a float64 re-run).
    probe_size = tuple(min(side, 512) for side in args.img_size)
    out, errors = write_compact_checkpoint(model, args.checkpoint, args.out,
                                           probe_shape=(1, 3, *probe_size), verify=args.verify,
                                           load_into_model=True)
    compact = contract_model(deployable).eval()
    if expanded_layers(deployable):
        # Counted from the chains' shapes: tracing them would run the explicit model.
        compact_macs, training_macs = count_training_macs(deployable, compact, args.img_size)
        row = ('training form (explicit chain)', training_macs)
    else:
        compact_macs = count_macs(compact, args.img_size)
        row = ('training form (deployable part)', compact_macs)
    rows = [(row[0], count_params(deployable), row[1]),
            ('deployed compact model', count_params(compact), compact_macs)]
    if prefix:
        print(f'{type(model).__name__}: {count_params(model):,} parameters in training, of '
              f'which {count_params(model) - count_params(deployable):,} outside the '
              f'deployable {prefix.rstrip(".")!r} (not written)')
    print(f'input size {args.img_size[0]}x{args.img_size[1]} ({size_source})')
    print(f'{"":32s}{"params":>14s}{"MACs @" + "x".join(map(str, args.img_size)):>18s}')
    for name, params, flops in rows:
        print(f'{name:32s}{params:>14,d}{flops:>18,d}')
    print(f'ratio training/deployed: params {rows[0][1] / rows[1][1]:.2f}x, '
          f'MACs {rows[0][2] / rows[1][2]:.2f}x')
    if errors is not None:
        print(f'verified: max abs error {errors["max_abs"]:.3e}, max relative error '
              f'{errors["max_rel"]:.3e} (probe 1x3x{probe_size[0]}x{probe_size[1]})')
        if 'layers_max_rel' in errors:
            print(f'  the probe output barely depends on the input (relative change '
                  f'{errors["input_sensitivity"]:.1e}; e.g. untrained batch norm statistics), so '
                  f'each expanded layer was also checked on its own: max relative error '
                  f'{errors["layers_max_rel"]:.3e}')
    compact_config(cfg).dump(config_out)
    print(f'wrote {out}')
    print(f'wrote {config_out} (its config: init_detector / init_model({config_out!r}, '
          f'{out!r}))')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
