"""The command line of the generator (``projects/digits/tools/make_digits_data.py``)."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .dataset import generate
from .preview import render_preview
from .settings import GenSettings
from .writing import task_root


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The parsed namespace.
    """
    parser = argparse.ArgumentParser(
        description='Build digit detection (COCO) and segmentation (mmseg '
        'folder) datasets from sklearn.datasets.load_digits().')
    d = GenSettings()
    parser.add_argument('--out', default='data', help='output root')
    parser.add_argument('--task', choices=['det', 'seg', 'both'],
                        default='both')
    parser.add_argument('--num-train', type=int, default=d.num_train)
    parser.add_argument('--num-val', type=int, default=d.num_val)
    parser.add_argument('--img-size', type=int, default=d.img_size,
                        help='canvas side in pixels')
    parser.add_argument('--min-digits', type=int, default=d.min_digits)
    parser.add_argument('--max-digits', type=int, default=d.max_digits)
    parser.add_argument('--min-scale', type=int, default=d.min_scale,
                        help='min side in pixels of an upscaled digit')
    parser.add_argument('--max-scale', type=int, default=d.max_scale,
                        help='max side in pixels of an upscaled digit')
    parser.add_argument('--seed', type=int, default=d.seed)
    parser.add_argument('--workers', type=int, default=None,
                        help='worker processes (default: available CPUs, '
                        'at most 8); does not change the output')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output is up to date')
    parser.add_argument('--preview', metavar='PATH',
                        help='also write a PNG mosaic of samples with boxes')
    return parser.parse_args(argv)


def _print_summary(task: str, result: dict) -> None:
    state = 'up to date, skipped' if result['skipped'] else 'generated'
    print(f'[{task}] {state}')
    for split, s in result['summary'].items():
        per_class = ' '.join(f'{k}:{v}' for k, v in s['per_class'].items())
        print(f'  {split}: {s["images"]} images, {s["objects"]} digits '
              f'({s["occluded"]} partly occluded, {s["sources_used"]} '
              f'distinct source digits)')
        print(f'    per class  {per_class}')
        if 'pixels' in s:
            total = sum(s['pixels'].values())
            fg = total - s['pixels']['background'] - s['pixels']['ignore']
            print(f'    pixels     {100 * fg / total:.1f}% digit, '
                  f'{100 * s["pixels"]["ignore"] / total:.1f}% ignore (255)')


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line tool.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        Process exit status.
    """
    args = parse_args(argv)
    settings = GenSettings(
        num_train=args.num_train, num_val=args.num_val,
        img_size=args.img_size, min_digits=args.min_digits,
        max_digits=args.max_digits, min_scale=args.min_scale,
        max_scale=args.max_scale, seed=args.seed)
    try:
        settings.validate()
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = generate(args.out, args.task, settings, force=args.force,
                       progress=lambda line: print(line, flush=True),
                       workers=args.workers)
    for task, result in results.items():
        _print_summary(task, result)
        print(f'  -> {task_root(args.out, task)}')
    if args.preview:
        path = Path(args.preview)
        path.parent.mkdir(parents=True, exist_ok=True)
        render_preview(settings).save(path)
        print(f'preview written to {path}')
    print(f'done in {time.perf_counter() - start:.1f}s')
    return 0
