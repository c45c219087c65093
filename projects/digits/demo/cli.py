"""The demo's command line (``projects/digits/tools/demo.py``, ``make demo``)."""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time
from typing import Sequence

from mmengine.logging import MMLogger

from .data import ensure_data
from .figures import draw_report_figure
from .machine import configure_threads, load_average, machine_info, resolve_jobs
from .report import summary_text, write_report
from .runs import run_tasks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The parsed namespace.
    """
    parser = argparse.ArgumentParser(
        description='Compact model vs its ExpandNet-CL r=4 on the digits sets: train, '
        'contract, evaluate, report.')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data, a few iterations: checks the whole path in about '
                        'two minutes; the numbers mean nothing')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='where runs, checkpoints and the report go')
    parser.add_argument('--task', choices=['det', 'seg', 'both'], default='both')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of both trainings (weights init, data order)')
    parser.add_argument('--jobs', default='auto',
                        help="tasks trained at once: 'auto' (both tasks side by side, one "
                        'process and half the cores each, on a CPU machine with >= 2 usable '
                        'cores; one after the other on CUDA or a single core), 1 or 2')
    parser.add_argument('--data-root', default='data/digits64',
                        help='root of digits_det/ and digits_seg/ (generated if missing or '
                        'made with other settings); --quick uses DATA_ROOT/quick/ so that '
                        'the full sets stay intact')
    return parser.parse_args(argv)



def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        Process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    start = time.perf_counter()
    load_start = load_average()
    os.makedirs(args.work_dir, exist_ok=True)
    logger = MMLogger.get_instance('expand_mm_demo', logger_name='expand_mm_demo',
                                   log_file=osp.join(args.work_dir, 'demo.log'))
    tasks = ['det', 'seg'] if args.task == 'both' else [args.task]
    jobs = resolve_jobs(args.jobs, len(tasks))
    threads, threads_why = configure_threads(jobs)
    info = machine_info()
    info['threads_why'] = threads_why
    logger.info(f'expand_mm demo: tasks {tasks}, seed {args.seed}, '
                f'{"QUICK smoke test, " if args.quick else ""}work dir {args.work_dir}; '
                f'{info["cpu_count"]} CPUs, torch threads {info["torch_threads"]} '
                f'({threads_why}), '
                f'CUDA: {info["cuda"] or "none"}; load average {load_start}')

    data = ensure_data(args.data_root, tasks, args.quick, logger)
    roots = data['roots']

    results = run_tasks(tasks, args, roots, logger, jobs)

    draw_report_figure(results, osp.join(args.work_dir, 'report.png'), args.quick)
    wall = time.perf_counter() - start
    report = write_report(results, args, info, data, wall, (load_start, load_average()))

    print(summary_text(results, args, wall, (load_start, load_average()), report), flush=True)
    return 0
