"""The digits demo: a compact model against its ExpandNet-CL (r=4), trained, contracted, evaluated.

    python projects/digits/tools/demo.py [--quick] [--work-dir work_dirs/demo]
        [--task det|seg|both] [--seed 0] [--data-root data/digits64]

(``make demo`` runs it.)

For each task -- digit detection (the compact YOLO-LITE-style detector, COCO
mAP) and digit segmentation (the compact U-Net, mIoU) -- the demo

1. generates the digits data set if it is missing (:mod:`projects.digits.digits_data`);
2. trains the compact model and its ExpandNet-CL r=4 (online mode) with the same
   seed, data and schedule through the stock MMEngine ``Runner``;
3. takes the ExpandNet's compact checkpoint (``iter_N_compact.pth``, written by
   ``ContractCheckpointHook``) and evaluates it with the *compact* config, exactly
   like the baseline's ``iter_N.pth``: the deployed model, stock metric;
4. measures parameters and MACs of both deployed models (identical by
   construction; checked), the training-form parameters of the ExpandNet, the
   train time per iteration and the inference time per image;

and writes ``report.md``, ``report.json``, ``report.png`` (loss curves, metric
bars) and side-by-side prediction images into the work dir. ``--quick`` runs the
same path on a tiny data set for a few iterations (a smoke test; its numbers
mean nothing).

Modules: :mod:`.tasks` (the two tasks and the fixed settings), :mod:`.data`,
:mod:`.configs` (the configs as the demo runs them, and the equivalent
commands), :mod:`.runs` (train, evaluate, time), :mod:`.machine` (processes,
threads, host), :mod:`.figures`, :mod:`.report` and :mod:`.cli`.
"""
from .cli import main, parse_args

__all__ = ['main', 'parse_args']
