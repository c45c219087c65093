"""Distributed training of an ExpandNet: two CPU processes (gloo), the real MMEngine Runner.

``ExpandNetDistributedDataParallel`` must defer the factor gradients under DDP
and still give what the stock ``MMDistributedDataParallel`` gives: the same
all-reduced gradients, hence the same weights on every rank and the same weights
as the stock wrapper. Two cases, each with the config's own DDP settings:

- the digits detector (every parameter gets a gradient), gradients accumulated
  over 2 iterations, so ``no_sync`` iterations too;
- the digits U-Net, whose full-resolution decoder stage gets no gradient:
  ``static_graph=True`` for the ExpandNet wrapper, against the stock wrapper
  with ``find_unused_parameters=True`` (what the compact config uses).

The stock wrapper around a deferring ExpandNet gets a warning from
``ContractCheckpointHook``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

from wrapper_test_utils import DET_COMPACT, ROOT, SEG_COMPACT, load_stock, tiny_cfg

pytestmark = pytest.mark.slow

WORLD = 2
OURS = 'ExpandNetDistributedDataParallel'
STOCK = 'StockDDPOnCPU'
# name: (config, task, iterations, accumulative_counts, our wrapper, the stock one)
CASES = {
    'det': (ROOT / 'projects/digits/configs/digits/expandnet-cl-r4_yolo-lite_1xb16-900i_digits-'
                   'det-64x64.py',
            'det', 3, 2, dict(type=OURS), dict(type=STOCK)),
    'seg': (ROOT / 'projects/digits/configs/digits/expandnet-cl-r4_unet-s4-d16-c16-fcn_1xb16-'
                   '800i_digits-seg-64x64.py',
            'seg', 2, 1, dict(type=OURS, static_graph=True),
            dict(type=STOCK, find_unused_parameters=True)),
}


@MODEL_WRAPPERS.register_module(force=True)
class StockDDPOnCPU(MMDistributedDataParallel):
    """The stock wrapper as the Runner builds it by default (``broadcast_buffers=False``),
    minus the ``device_ids`` that CPU DDP refuses."""

    def __init__(self, module, device_ids=None, **kwargs):
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=None, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _train_on_rank(rank: int, port: int, data: str, out: str) -> None:
    """One rank: train every case under both wrappers, save what it saw."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    import expand_mm
    from expand_mm.layers import base

    # Compositions back-propagated by each flush (a flush of nothing does not count).
    flushes = []
    flush = base._DEFERRED_GRADS.flush

    def counting_flush(task):
        flushes.append(sum(entry[0] == task for entry in base._DEFERRED_GRADS._pending))
        return flush(task)

    base._DEFERRED_GRADS.flush = counting_flush
    result = {}
    for case, (config, task, iters, accumulate, ours, stock) in CASES.items():
        for wrapper_cfg in (ours, stock):
            work_dir = Path(out) / case / wrapper_cfg['type']
            cfg = tiny_cfg(config, Path(data), work_dir, task, max_iters=iters)
            cfg.optim_wrapper.accumulative_counts = accumulate
            cfg.launcher = 'pytorch'
            cfg.model_wrapper_cfg = wrapper_cfg
            flushes.clear()
            runner = Runner.from_cfg(cfg)
            assert is_model_wrapper(runner.model)
            runner.train()
            log = next(work_dir.glob('*/*.log')).read_text() if rank == 0 else ''
            module = runner.model.module
            result[case, wrapper_cfg['type']] = dict(
                flushes=sum(n > 0 for n in flushes),
                broadcast_buffers=runner.model.broadcast_buffers,
                defers=getattr(runner.model, 'defers_factor_grads', None),
                state={k: v.detach().clone() for k, v in module.state_dict().items()},
                param_names=[k for k, _ in module.named_parameters()],
                warned='plain autograd' in log)
    # Options that walk the loss graph for parameters cannot be served with
    # deferred gradients; under a static graph DDP skips the unused search.
    for key, options in (('find_unused', dict(find_unused_parameters=True)),
                         ('anomalous', dict(detect_anomalous_params=True)),
                         ('static_find_unused', dict(find_unused_parameters=True,
                                                     static_graph=True))):
        model = expand_mm.models.ExpandNetDistributedDataParallel(
            runner.model.module, device_ids=[rank], **options)
        result[key + '_defers'] = model.defers_factor_grads
    torch.save(result, Path(out) / f'rank{rank}.pt')
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_wrapper_defers_factor_grads_with_the_same_weights(digits_data, tmp_path):
    mp.start_processes(_train_on_rank, args=(_free_port(), str(digits_data), str(tmp_path)),
                       nprocs=WORLD, start_method='spawn')
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    for result in ranks:
        assert result['find_unused_defers'] is result['anomalous_defers'] is False
        assert result['static_find_unused_defers'] is True
        for case, (*_, iters, _, _, _) in CASES.items():
            ours, stock = result[case, OURS], result[case, STOCK]
            # every backward pass back-propagated compositions into factors
            assert ours['defers'] is True and ours['flushes'] == iters
            assert stock['flushes'] == 0
            assert ours['broadcast_buffers'] is stock['broadcast_buffers'] is False
            assert ours['state'].keys() == stock['state'].keys()
            for key, value in ours['state'].items():
                torch.testing.assert_close(value, stock['state'][key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, key=key: f'{case} {key}: {m}')
    for case in CASES:
        # DDP kept the ranks' parameters in step (different batches, all-reduced
        # gradients); BN statistics are each rank's own (broadcast_buffers=False).
        first, second = (r[case, OURS] for r in ranks)
        assert any('.convs.' in key for key in first['param_names'])  # the factors
        for key in first['param_names']:
            torch.testing.assert_close(first['state'][key], second['state'][key], rtol=0,
                                       atol=0, msg=lambda m, key=key: f'{case} {key}: {m}')
        # Rank 0 logged the warning for the stock wrapper only.
        assert ranks[0][case, STOCK]['warned'] and not ranks[0][case, OURS]['warned']
    # The compact checkpoints of the distributed runs are the stock models'.
    for case, compact_config, it in (('det', DET_COMPACT, 3), ('seg', SEG_COMPACT, 2)):
        compact = torch.load(tmp_path / case / OURS / f'iter_{it}_compact.pth')
        load_stock(compact_config, compact['state_dict'])
