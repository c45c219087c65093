"""Distributed training of an ExpandNet: two CPU processes (gloo), the real MMEngine Runner.

``ExpandNetDistributedDataParallel`` must defer the factor gradients under DDP
and still give what the stock ``MMDistributedDataParallel`` gives: the same
all-reduced gradients, hence the same weights on every rank and the same weights
as the stock wrapper. The stock wrapper around a deferring ExpandNet gets a
warning from ``ContractCheckpointHook``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

from wrapper_test_utils import ROOT, DET_COMPACT, load_stock, make_digits, tiny_cfg

DET_EXPANDNET = ROOT / 'configs/digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-det-64x64.py'
WRAPPERS = ('ExpandNetDistributedDataParallel', 'StockDDPOnCPU')
WORLD = 2


@MODEL_WRAPPERS.register_module(force=True)
class StockDDPOnCPU(MMDistributedDataParallel):
    """The stock wrapper, minus the ``device_ids`` that the Runner passes and CPU DDP refuses."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module=module, device_ids=None, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _train_on_rank(rank: int, port: int, data: str, out: str) -> None:
    """One rank: train the ExpandNet for 3 iterations under each wrapper, save what it saw.

    Gradients are accumulated over 2 iterations (``accumulative_counts=2``), so
    the run has a ``no_sync`` iteration, a synchronised step and a last partial
    step."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    import expand_mm
    from expand_mm.layers import base

    flushes = []
    flush = base._DEFERRED_GRADS.flush
    base._DEFERRED_GRADS.flush = lambda: (flushes.append(1), flush())[1]
    result = {}
    for wrapper in WRAPPERS:
        work_dir = Path(out) / wrapper
        cfg = tiny_cfg(DET_EXPANDNET, Path(data), work_dir, 'det', max_iters=3)
        cfg.optim_wrapper.accumulative_counts = 2
        cfg.launcher = 'pytorch'
        cfg.model_wrapper_cfg = dict(type=wrapper)
        flushes.clear()
        runner = Runner.from_cfg(cfg)
        assert is_model_wrapper(runner.model)
        runner.train()
        log = next(work_dir.glob('*/*.log')).read_text() if rank == 0 else ''
        result[wrapper] = dict(
            flushes=len(flushes),
            defers=getattr(runner.model, 'defers_factor_grads', None),
            state={k: v.detach().clone()
                   for k, v in runner.model.module.state_dict().items()},
            param_names=[k for k, _ in runner.model.module.named_parameters()],
            warned='plain autograd' in log)
    # find_unused_parameters=True cannot be served with deferred gradients.
    model = expand_mm.models.ExpandNetDistributedDataParallel(
        runner.model.module, device_ids=[rank], find_unused_parameters=True)
    result['find_unused_defers'] = model.defers_factor_grads
    torch.save(result, Path(out) / f'rank{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_wrapper_defers_factor_grads_with_the_same_weights(tmp_path):
    data = make_digits(tmp_path / 'data')
    mp.start_processes(_train_on_rank, args=(_free_port(), str(data), str(tmp_path)),
                       nprocs=WORLD, start_method='spawn')
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    for result in ranks:
        ours, stock = result['ExpandNetDistributedDataParallel'], result['StockDDPOnCPU']
        assert ours['defers'] is True and ours['flushes'] >= 3  # one per backward pass
        assert stock['flushes'] == 0
        assert result['find_unused_defers'] is False
        assert ours['state'].keys() == stock['state'].keys()
        for key, value in ours['state'].items():
            torch.testing.assert_close(value, stock['state'][key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f'{key}: {m}')
    # DDP kept the ranks' parameters in step (different batches, all-reduced
    # gradients); buffers such as BN statistics are each rank's own.
    first, second = (r['ExpandNetDistributedDataParallel'] for r in ranks)
    assert any('.convs.' in key for key in first['param_names'])  # the factors
    for key in first['param_names']:
        torch.testing.assert_close(first['state'][key], second['state'][key], rtol=0, atol=0,
                                   msg=lambda m, key=key: f'{key}: {m}')
    # Rank 0 logged the warning for the stock wrapper only.
    assert ranks[0]['StockDDPOnCPU']['warned']
    assert not ranks[0]['ExpandNetDistributedDataParallel']['warned']
    # The compact checkpoint of the distributed run is the stock detector's.
    compact = torch.load(tmp_path / 'ExpandNetDistributedDataParallel' / 'iter_3_compact.pth')
    load_stock(DET_COMPACT, compact['state_dict'])
