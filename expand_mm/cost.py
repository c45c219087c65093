"""What a model costs: multiply-accumulates of one forward, what expanding a layer adds, the
training state's bytes, and the input size a config tests at.

Used by the tools that report or compare training and deployment cost
(``tools/benchmark.py``, ``tools/contract.py``), by :func:`expand_mm.expand_model`'s memory
check and by the budget planner (:mod:`expand_mm.budget`); nothing here changes a model.
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .compat import type_name
from .contraction import expanded_layers
from .layers import ExpandConv2d, ExpandLinear
from .verification import flatten_tensors

FLOAT_BYTES = 4  # training runs in float32 (AMP keeps float32 master weights and state)


def count_macs(model: nn.Module, img_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward of one ``(3, H, W)`` image.

    mmengine's ``FlopAnalyzer`` (a jit trace of ``model(x)``, i.e.
    ``mode='tensor'`` for MMEngine models: network only) in the model's current
    train / eval state and expand mode, on its device and dtype; it counts one
    multiply-add as one flop, and not what the trace finds dead (a module
    whose output reaches no output). The model is not modified.

    Args:
        model: Any module taking a ``(1, 3, H, W)`` tensor.
        img_size: ``(H, W)``.
    """
    return int(_flop_analyzer(model, img_size).total())


def _flop_analyzer(model: nn.Module, img_size: Sequence[int]) -> Any:
    import warnings

    from mmengine.analysis import FlopAnalyzer
    param = next(model.parameters())
    inputs = (torch.zeros(1, 3, *img_size, device=param.device, dtype=param.dtype),)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # jit tracer warnings about data-dependent code
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        with torch.no_grad():  # the counts are the same; autograd would keep every activation
            buffers = [(b, b.clone()) for b in model.buffers()]
            analyzer.total()  # runs the trace, inside the filter
            # A trace in train mode updates batch-norm statistics; put them back.
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return analyzer


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one conv / linear call (bias not counted, as mmengine's FlopAnalyzer)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    raise TypeError(f'no MAC count for a {type(module).__name__} sub-layer')


def count_training_macs(model: nn.Module, compact: nn.Module,
                        img_size: Sequence[int]) -> tuple[int, int]:
    """MACs of one forward of ``compact`` and of ``model``'s explicit chains (the paper's cost).

    Without running the chains: ``compact`` (the contraction of ``model``) is
    traced once at ``img_size`` (:func:`count_macs`), recording the input shape
    of each expanded layer's compact counterpart; each layer's chain then runs
    on the ``meta`` device (shapes only) from those inputs, and its sub-layers'
    MACs replace the compact layer's (in proportion to what the trace counted
    of it: a layer whose output the trace finds dead counts nothing, as in
    :func:`count_macs`). Equal to :func:`count_macs` of ``model`` in explicit
    mode at a fraction of its time and memory (the Cityscapes U-Net at
    1024x2048 on this project's 2-core machine: the explicit trace took 100 s
    and 4.5 GB without autograd, 15 GB with it).

    Args:
        model: A model (or deployable network) with expanded layers.
        compact: Its contraction (:func:`~expand_mm.surgery.contract_model`).
        img_size: ``(H, W)``.

    Returns:
        ``(compact_macs, training_macs)``; the first is :func:`count_macs` of ``compact``.
    """
    layers = dict(expanded_layers(model))
    inputs: dict[str, list[tuple]] = {path: [] for path in layers}
    called_macs = dict.fromkeys(layers, 0)
    handles = []
    for path in layers:
        def hook(module, args, out, path=path):
            inputs[path].append(tuple(args[0].shape))
            called_macs[path] += int(_layer_macs(module, out))
        handles.append(compact.get_submodule(path).register_forward_hook(hook))
    try:
        analyzer = _flop_analyzer(compact, img_size)
    finally:
        for handle in handles:
            handle.remove()
    by_module = analyzer.by_module()
    compact_macs = total = int(analyzer.total())
    for path, layer in layers.items():
        traced = int(by_module.get(path, 0))
        if not traced:
            continue
        chain = copy.deepcopy(layer).to('meta').set_mode('explicit')
        counted: list[int] = []
        sub_handles = [sub.register_forward_hook(
            lambda m, a, out: counted.append(int(_layer_macs(m, out))))
            for sub in chain.sublayers]
        with torch.no_grad():
            for shape in inputs[path]:
                chain(torch.empty(shape, device='meta'))
        for handle in sub_handles:
            handle.remove()
        total += sum(counted) * traced // called_macs[path] - traced
    return compact_macs, total


def config_input_size(cfg: Any) -> tuple[tuple[int, int], str] | None:
    """``((H, W), source)`` of the network's input under an mm config's test settings.

    With sliding-window testing (mmseg's ``test_cfg.mode='slide'``, found in
    the model config through wrappers) the network sees windows of at most
    ``crop_size`` (clipped at the image border), so that is the size.
    Otherwise it is the ``scale`` of the test-pipeline ``Resize``, read from
    ``cfg.test_dataloader``'s dataset
    (through dataset wrappers) or ``cfg.test_pipeline``; mmcv's ``scale`` is
    ``(W, H)`` or one int. With ``keep_ratio`` the scale is only the box an
    image is fitted into (one side can come out smaller), which ``source``
    says, unless a later ``Pad`` pads to it (``size`` or ``pad_to_square``:
    YOLOX). None when neither is in the config.
    """
    test_cfg = _find_test_cfg(cfg.get('model'))
    if test_cfg is not None and test_cfg.get('mode') == 'slide':
        crop = _size_pair(test_cfg.get('crop_size'))  # mmseg's crop_size is (H, W)
        if crop is not None:
            return crop, 'sliding-window test_cfg.crop_size (H, W)'
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    while isinstance(dataset, dict) and 'pipeline' not in dataset and 'dataset' in dataset:
        dataset = dataset['dataset']
    pipeline = (dataset.get('pipeline') if isinstance(dataset, dict) else None) \
        or cfg.get('test_pipeline') or []
    types = [type_name(step.get('type', '')) if isinstance(step, dict) else ''
             for step in pipeline]
    for index, step in enumerate(pipeline):
        scale = _size_pair(step.get('scale')) if types[index] == 'Resize' else None
        if scale is None:
            continue
        source = 'test-pipeline Resize scale'
        if step.get('keep_ratio'):
            pads = [pad for pad, kind in zip(pipeline[index:], types[index:]) if kind == 'Pad']
            if pads and (_size_pair(pads[0].get('size')) == scale or (
                    pads[0].get('pad_to_square') and scale[0] == scale[1])):
                source += ', padded to it'
            else:
                source += ' (keep_ratio: images are fitted into this box)'
        return (scale[1], scale[0]), source  # mmcv's scale is (W, H)
    return None


def _size_pair(value: Any) -> tuple[int, int] | None:
    """``value`` as two positive ints (one int is both), or None if it is neither."""
    if isinstance(value, int) and value > 0:
        return value, value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _find_test_cfg(model_cfg: Any) -> Any:
    """The first ``test_cfg`` dict with a ``mode`` in a model config, wrappers included."""
    if not isinstance(model_cfg, dict):
        return None
    test_cfg = model_cfg.get('test_cfg')
    if isinstance(test_cfg, dict) and 'mode' in test_cfg:
        return test_cfg
    for value in model_cfg.values():
        found = _find_test_cfg(value)
        if found is not None:
            return found
    return None



@dataclass(frozen=True)
class LayerExpansionCost:
    """What one layer costs in training form at one ratio (closed forms, nothing allocated).

    Attributes:
        params: Parameters of the layer's training form (the compact layer's at ratio 1).
        composition_macs: Multiply-adds of composing its compact kernel once, what
            online mode pays per training step on top of the compact layer, whatever
            the batch and image size (0 at ratio 1).
    """

    params: int
    composition_macs: int


def layer_expansion_cost(module: nn.Module, strategy: str, ratio: int) -> LayerExpansionCost:
    """:class:`LayerExpansionCost` of expanding the compact conv / linear ``module`` at ``ratio``.

    The expanded layer is built on the ``meta`` device (shapes only, no memory),
    so a ratio whose factors would not fit in memory can still be costed; its
    parameters are counted and :meth:`~expand_mm.layers.ExpandedLayer.composition_macs`
    counts the composition, as the benchmark does. Layers of the same shape share
    one count.

    Args:
        module: A plain ``nn.Conv2d`` or ``nn.Linear``.
        strategy: ``'cl'`` or ``'ck'`` for a conv (ignored for a linear layer).
        ratio: Expansion ratio; 1 is the compact layer itself.
    """
    if ratio == 1:
        return LayerExpansionCost(sum(p.numel() for p in module.parameters()), 0)
    return LayerExpansionCost(expanded_params(module, strategy, ratio),
                              _composition_macs_of_shape(_shape_key(module, strategy, ratio)))


def expanded_params(module: nn.Module, strategy: str, ratio: int) -> int:
    """Parameters of the compact conv / linear ``module`` expanded at ``ratio`` (nothing
    allocated; the cheap half of :func:`layer_expansion_cost`)."""
    if ratio == 1:
        return sum(p.numel() for p in module.parameters())
    layer = _meta_expanded_layer(_shape_key(module, strategy, ratio))
    return sum(p.numel() for p in layer.parameters())


def _shape_key(module: nn.Module, strategy: str, ratio: int) -> tuple:
    """What an expanded layer's costs depend on: its compact shape, strategy and ratio."""
    if isinstance(module, nn.Conv2d):
        return ('conv', module.in_channels, module.out_channels, module.kernel_size,
                module.stride, module.padding, module.dilation, module.groups,
                module.bias is not None, module.padding_mode, strategy, ratio)
    return ('linear', module.in_features, module.out_features, module.bias is not None, ratio)


@functools.lru_cache(maxsize=256)
def _meta_expanded_layer(key: tuple) -> nn.Module:
    """The expanded layer that ``key`` (:func:`_shape_key`) describes, on the ``meta`` device."""
    if key[0] == 'conv':
        (_, cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode,
         strategy, ratio) = key
        return ExpandConv2d(cin, cout, kernel, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, bias=bias,
                            padding_mode=padding_mode, strategy=strategy, ratio=ratio,
                            device='meta')
    _, cin, cout, bias, ratio = key
    return ExpandLinear(cin, cout, bias=bias, ratio=ratio, device='meta')


@functools.lru_cache(maxsize=4096)
def _composition_macs_of_shape(key: tuple) -> int:
    """Composition MACs of the expanded layer that ``key`` (:func:`_shape_key`) describes."""
    return int(_meta_expanded_layer(key).composition_macs())


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of a model's persistent training state, predicted from its parameter count.

    Attributes:
        params: Parameters (trainable or not).
        param_bytes: The parameters and buffers.
        grad_bytes: One gradient per trainable parameter (all exist when the optimizer steps).
        optimizer_bytes: The optimizer's state (``optimizer_slots`` tensors per
            trainable parameter: 1 for SGD with momentum, 2 for Adam / AdamW).
        checkpoint_bytes: A training checkpoint (parameters, buffers, optimizer state).
    """

    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    checkpoint_bytes: int

    @property
    def total_bytes(self) -> int:
        """Parameters, buffers, gradients and optimizer state: what training holds at least."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def training_memory(params: int, trainable_params: int, buffer_elements: int,
                    optimizer_slots: int = 1) -> TrainingMemory:
    """:class:`TrainingMemory` of a float32 model with these element counts.

    Args:
        params: Parameters.
        trainable_params: Those that need a gradient.
        buffer_elements: Elements of the buffers (batch-norm statistics, ...).
        optimizer_slots: Optimizer state tensors per trainable parameter.
    """
    param_bytes = (params + buffer_elements) * FLOAT_BYTES
    optimizer_bytes = trainable_params * optimizer_slots * FLOAT_BYTES
    return TrainingMemory(params=params, param_bytes=param_bytes,
                          grad_bytes=trainable_params * FLOAT_BYTES,
                          optimizer_bytes=optimizer_bytes,
                          checkpoint_bytes=param_bytes + optimizer_bytes)


def format_bytes(size: int) -> str:
    """``size`` bytes in words: ``'512.0 MiB'``, ``'38.12 GiB'``."""
    if size >= 1024 ** 3:
        return f'{size / 1024 ** 3:,.2f} GiB'
    return f'{size / 1024 ** 2:,.1f} MiB'


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory that tensors on ``device`` can take, or None where it cannot be read.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``); CPU: the
    kernel's ``MemAvailable`` (``/proc/meminfo``), else the free physical pages.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != 'cpu':
        return None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def count_activation_bytes(model: nn.Module, img_size: Sequence[int]) -> int:
    """Bytes of the outputs of every leaf module in one forward of one ``(3, H, W)`` image.

    An estimate of what a training step keeps for the backward pass per image
    (autograd saves roughly every intermediate output of convs, norms and
    activations): outputs that share storage (in-place activations) count once.
    Runs the model (``model(x)``, i.e. ``mode='tensor'`` for MMEngine models)
    under ``no_grad`` in its current train / eval state; the model is not modified.

    Args:
        model: Any module taking a ``(1, 3, H, W)`` tensor.
        img_size: ``(H, W)``.
    """
    kept: dict[int, torch.Tensor] = {}  # held so that no storage is reused during the count

    def hook(module, args, out):
        for tensor in flatten_tensors(out):
            kept.setdefault(tensor.untyped_storage().data_ptr(), tensor)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not any(True for _ in m.children())]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *img_size, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def peak_step_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above those allocated when it began.

    CUDA: ``max_memory_allocated`` after a peak reset. CPU: the peak of the
    running sum of the allocation / free events that ``torch.profiler`` records
    with ``profile_memory=True``, in time order.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The kineto events hold every allocation and free (FunctionEvents fold the
    # ones made inside an op into that op); nbytes() is negative for a free.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return int(peak)
