"""Export the deployed (compact) network of a config to ONNX and check it.

    python tools/export_onnx.py CONFIG CKPT OUT.onnx [--img-size H W] [--opset 17]

CONFIG may be an ExpandNet config, a training-time wrapper's (``Distiller``,
``AuxOverParam``) or a stock compact one; CKPT may be a compact checkpoint
(``*_compact.pth``) or a training checkpoint of CONFIG (its deployable network,
contracted first). What is exported is the network's raw output (``mode='tensor'``: the
detection head's per-level maps, the segmentation logits); box decoding and NMS
stay in the host code, as with mmdet / mmseg's own ``mode='tensor'``. The file
is run with onnxruntime on a random input and compared with PyTorch. A
checkpoint, compact model or output holding a NaN or an Inf is refused, naming
the tensors, and nothing is exported.
"""
import argparse
import os
import sys

import numpy as np
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import expand_mm  # noqa: F401  (registers ExpandNet and the wrappers)
from expand_mm.apis import compact_checkpoint_of
from expand_mm.checkpoint import (CheckpointError, prepare_output_path, read_checkpoint,
                                  strip_prefix)
from expand_mm.cli import require_file, run_tool
from expand_mm.cost import config_input_size
from expand_mm.errors import NonFiniteError
from expand_mm.models import deployable_model_cfg
from expand_mm.planting import refuse_unfinished_planting
from expand_mm.verification import (_largest, flatten_tensors, listed, non_finite_entries,
                                    non_finite_outputs, non_finite_tensors)


class RawOutputs(torch.nn.Module):
    """``model(x, mode='tensor')`` flattened into a tuple of tensors (ONNX outputs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple:
        """Raw network outputs for a normalised NCHW batch."""
        return tuple(flatten_tensors(self.model(inputs, mode='tensor')))


def build_compact(config: str, checkpoint: str) -> torch.nn.Module:
    """The compact model of ``config`` with the weights of ``checkpoint``.

    ``config`` may be a stock compact config, an ExpandNet config or a
    training-time wrapper's (``Distiller``, ``AuxOverParam``); ``checkpoint``
    a compact one, or a training checkpoint of ``config``, whose deployable
    network is taken (and contracted, if it is an ExpandNet).

    Raises:
        CheckpointError: If the checkpoint is unreadable or fits neither form
            (a training checkpoint given with the compact config is named as
            such, with its ``*_compact.pth`` to use).
    """
    cfg = Config.fromfile(config)
    saved = read_checkpoint(checkpoint, mmap=True)
    refuse_unfinished_planting(saved.get('meta') or {}, checkpoint, 'Export')
    refuse_non_finite(non_finite_entries(strip_prefix(saved['state_dict'])),
                      f'checkpoint {checkpoint!r}', CheckpointError)
    compact_ckpt, _ = compact_checkpoint_of(cfg, checkpoint)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        compact = MODELS.build(deployable_model_cfg(cfg.model))
    compact.load_state_dict(strip_prefix(compact_ckpt['state_dict']), strict=False)
    refuse_non_finite(non_finite_tensors(compact), 'the compact model made from '
                      f'{checkpoint!r}', CheckpointError)
    return compact.eval()


def refuse_non_finite(names: list[str], what: str, error: type = NonFiniteError) -> None:
    """Raise ``error`` naming the tensors of ``what`` that hold a NaN or an Inf, if any."""
    if names:
        raise error(f'{what} holds NaN or Inf in {len(names)} tensor'
                    f'{"s" * (len(names) != 1)}: {listed(names)}; nothing is exported. A '
                    'network with non-finite weights or outputs computes nothing usable: '
                    'export a checkpoint saved before training diverged')


def export(model: torch.nn.Module, out: str, img_size, opset: int = 17) -> float:
    """Write ``out`` and return the largest |onnxruntime - torch| on a random input.

    Raises:
        NonFiniteError: If PyTorch's or onnxruntime's outputs hold a NaN or an
            Inf (naming them); a file onnxruntime computes them with is removed.
    """
    import onnxruntime
    wrapped = RawOutputs(model).eval()
    x = torch.randn(1, 3, *img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refuse_non_finite(non_finite_outputs(model(x, mode='tensor')),
                          f'the output of the compact model on a random 1x3x{img_size[0]}x'
                          f'{img_size[1]} input')
        torch_out = wrapped(x)
    torch.onnx.export(wrapped, (x,), out, dynamo=False, opset_version=opset,
                      input_names=['inputs'])
    session = onnxruntime.InferenceSession(out, providers=['CPUExecutionProvider'])
    onnx_out = session.run(None, {'inputs': x.numpy()})
    bad = [f'output[{i}]' for i, a in enumerate(onnx_out) if not np.isfinite(a).all()]
    if bad:
        os.remove(out)
        refuse_non_finite(bad, f'onnxruntime\'s output of {out} (PyTorch\'s is finite)')
    return _largest(float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_out, torch_out))


def main() -> int:
    """Build, export, check."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the config's sliding-window crop_size, "
                        'else its test-pipeline Resize scale, else 320 320)')
    parser.add_argument('--opset', type=int, default=17)
    args = parser.parse_args()
    require_file(args.config, 'config')
    require_file(args.checkpoint, 'checkpoint')
    prepare_output_path(args.checkpoint, args.out)
    model = build_compact(args.config, args.checkpoint)
    img_size, size_source = ((args.img_size, '--img-size') if args.img_size else
                             config_input_size(Config.fromfile(args.config))
                             or ((320, 320), 'default, none in the config'))
    error = export(model, args.out, img_size, args.opset)
    print(f'wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} params, input '
          f'1x3x{img_size[0]}x{img_size[1]} ({size_source}); onnxruntime vs torch max abs '
          f'error {error:.2e}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
