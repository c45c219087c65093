"""What ContractCheckpointHook adds to a checkpoint save: time and peak memory.

Builds the config's model (no data), gives it an SGD momentum state, and
times, ``--repeat`` times, the plain ``torch.save`` of the training checkpoint
(what ``CheckpointHook`` costs) against the same save with the hook's work
(``before_save_checkpoint``: contraction from the model in memory, the probe
check, the compact file)::

    python tools/analysis/checkpoint_save_cost.py \\
        configs/expandnet/expandnet-cl-r4_yolov3-mobilenetv2_8xb24-320-300e_coco.py

Prints the medians and their ratio, and the process's peak RSS.
"""
import argparse
import os.path as osp
import resource
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import expand_mm  # noqa: E402,F401  (registers ExpandNet)
from expand_mm.cli import run_tool  # noqa: E402
from expand_mm.hooks import ContractCheckpointHook  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import MODELS, DefaultScope  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='an ExpandNet (or wrapper) config')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--probe-size', type=int, default=128, help="the hook's probe H = W")
    parser.add_argument('--threads', type=int, default=1)
    return parser.parse_args()


def build_model(config: str) -> torch.nn.Module:
    """The config's model, built in its default scope."""
    cfg = Config.fromfile(config)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        return MODELS.build(cfg.model).train()


def timed_saves(model: torch.nn.Module, work: str, step: int, probe_size: int
                ) -> tuple[float, float]:
    """Seconds of a plain save and of a save with the hook's work, at one step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for param in model.parameters():
        optimizer.state[param]['momentum_buffer'] = torch.zeros_like(param)
    info: dict = {}
    runner = SimpleNamespace(model=model, hooks=[], logger=MMLogger.get_current_instance(),
                             message_hub=SimpleNamespace(runtime_info=info))
    hook = ContractCheckpointHook(probe_shape=(1, 3, probe_size, probe_size))
    hook.before_train(runner)
    path = osp.join(work, f'iter_{step}.pth')
    checkpoint = {'meta': {'iter': step},
                  'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  'optimizer': optimizer.state_dict()}
    start = time.perf_counter()
    torch.save(checkpoint, path + '.plain')
    plain = time.perf_counter() - start
    info['last_ckpt'] = path  # CheckpointHook names the checkpoint, then saves it
    start = time.perf_counter()
    hook.before_save_checkpoint(runner, checkpoint)
    torch.save(checkpoint, path)
    return plain, time.perf_counter() - start


def main() -> int:
    """Measure and print."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.config)
    plain, hooked = [], []
    with tempfile.TemporaryDirectory() as work:
        for step in range(args.repeat):
            a, b = timed_saves(model, work, step, args.probe_size)
            plain.append(a)
            hooked.append(b)
            print(f'save {a:.2f} s, save + ContractCheckpointHook {b:.2f} s', flush=True)
    a, b = sorted(plain)[len(plain) // 2], sorted(hooked)[len(hooked) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f'median: save {a:.2f} s, with the hook {b:.2f} s ({b / a:.2f}x); '
          f'peak RSS {peak:.2f} GB')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
