"""The machine: how many tasks train at once, with how many threads, and what the report says."""
from __future__ import annotations

import os
import platform
from typing import Any

import torch


def usable_cpus() -> int:
    """CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return cpus or 1


def resolve_jobs(jobs: str, num_tasks: int) -> int:
    """How many tasks train at once (``--jobs``).

    Two tasks side by side, each in its own process with its share of the
    cores, beat one process using all of them: on this project's 2-vCPU
    machine a second intra-op thread made an ExpandNet step only 1.1x faster
    (seg: 0.38 -> 0.34 s), while two 1-thread trainings side by side each ran
    only 1.1-1.35x slower than one training alone with both threads (compact
    seg 0.21 vs 0.19 s, ExpandNet det 0.55 vs 0.41 s): 1.5-1.8x the
    throughput. On CUDA one device is shared, so
    the tasks run one after the other.

    Args:
        jobs: ``'auto'`` or a positive integer as text.
        num_tasks: Tasks the demo runs.

    Returns:
        The number of worker processes (1 = in this process).
    """
    if jobs == 'auto':
        if torch.cuda.is_available() or usable_cpus() < 2:
            return 1
        return min(num_tasks, 2)
    if not jobs.isdigit() or int(jobs) < 1:
        raise SystemExit(f"--jobs must be 'auto' or a positive integer, got {jobs!r}")
    return min(int(jobs), num_tasks)


def configure_threads(jobs: int = 1) -> tuple[int, str]:
    """Sets torch's intra-op threads for CPU training.

    Measured on a 2-core machine (one train step of the digits U-Net
    ExpandNet): 2 threads were 1.4x faster than 1 while the machine was
    otherwise idle, and slower than 1 once other jobs kept the cores busy.
    So: all usable cores when the 1-minute load average says they are free,
    one core fewer otherwise (left to the data loader worker and the other
    jobs); with ``jobs`` tasks side by side, an equal share each.
    ``OMP_NUM_THREADS`` set by the user, or a CUDA device, leaves torch's
    default alone.

    Args:
        jobs: Training processes running at once.

    Returns:
        ``(threads, why)``.
    """
    if torch.cuda.is_available():
        return torch.get_num_threads(), 'CUDA device: torch default'
    if 'OMP_NUM_THREADS' in os.environ:
        return torch.get_num_threads(), 'OMP_NUM_THREADS set by the user'
    cpus = usable_cpus()
    if jobs > 1:
        threads = max(1, cpus // jobs)
        torch.set_num_threads(threads)
        return threads, f'{jobs} tasks side by side on {cpus} cores: {threads} each'
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float(cpus)
    if load < 1.0:
        threads, why = cpus, f'load average {load:.2f} < 1: all {cpus} cores'
    else:
        threads = max(1, cpus - 1)
        why = f'load average {load:.2f} >= 1 (shared machine): {threads} of {cpus} cores'
    torch.set_num_threads(threads)
    return threads, why



def machine_info() -> dict[str, Any]:
    """Host, CPU, threads, accelerator and load average (for the report)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(
        python=platform.python_version(), platform=platform.platform(), cpu=cpu,
        cpu_count=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def load_average() -> str:
    """``os.getloadavg()`` as ``'a, b, c'`` (1, 5, 15 minutes), or ``'n/a'``."""
    try:
        return ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'n/a'
