"""Does a contracted model compute what its expanded model does? Measure it, or refuse.

Two kinds of function, and their names say which:

- :func:`contraction_errors` (also importable as :func:`verify_contraction`),
  :func:`layer_contraction_errors` and :func:`non_finite_tensors` *return*
  figures and raise only when the models cannot be compared at all; reading
  them is the caller's job.
- :func:`check_contraction` and :func:`check_layer_contractions` *raise*
  :class:`ContractionCheckError` for a contraction that is wrong, and return
  their figures otherwise.

The check runs the two models in float32 on a probe; a disagreement there is
re-checked in float64 on CPU, one layer at a time (the memory of one layer's
float64 copy, not of the model's), which tells a wrong contraction from
float32 rounding that the network amplifies; a probe whose outputs barely
depend on the input is replaced by a check of every expanded layer on its own.
A NaN or an Inf in a weight, a buffer or an output is never read as agreement.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError, ExpandMMError, VerificationUnavailableError
from .layers import ExpandConv2d, ExpandedLayer
from .contraction import expanded_layer_paths

ForwardFn = Callable[[nn.Module, Any], Any]

# Below this change of the outputs (relative) between two random probes, a probe
# says too little about the kernels and each layer is checked on its own.
WEAK_PROBE_SENSITIVITY = 1e-3


class ContractionCheckError(ExpandMMError, RuntimeError):
    """The contracted model does not compute what the expanded one does (beyond
    rounding), or one of them holds or outputs a NaN or an Inf."""


def _largest(values: Iterable[float]) -> float:
    """The largest of ``values`` (0.0 for none), a NaN counting as +inf.

    Python's ``max`` keeps or skips a NaN depending on where it sits, so a
    NaN error could otherwise read as a small one.
    """
    return max((math.inf if math.isnan(v) else v for v in values), default=0.0)


def _all_finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def non_finite_entries(state_dict: Mapping[str, Any]) -> list[str]:
    """Keys of ``state_dict`` whose floating-point tensors hold a NaN or an Inf.

    Args:
        state_dict: A state dict (e.g. a checkpoint's); non-tensor values and
            integer tensors are skipped.

    Returns:
        The keys, in the state dict's order; empty when every tensor is finite.
    """
    return [key for key, value in state_dict.items()
            if isinstance(value, Tensor) and value.is_floating_point()
            and not _all_finite(value)]


def non_finite_tensors(model: nn.Module) -> list[str]:
    """State-dict keys of ``model`` whose floating-point tensors hold a NaN or an Inf.

    Args:
        model: Any module (its parameters and persistent buffers are looked at).

    Returns:
        The keys, in state-dict order; empty when every tensor is finite.
    """
    return non_finite_entries(model.state_dict())


def non_finite_outputs(out: Any, name: str = 'output') -> list[str]:
    """Where a model's output holds a NaN or an Inf, e.g. ``['output[1]']``.

    Args:
        out: Tensors, dicts, lists, tuples or mmengine data elements, nested.
        name: What the top level is called in the returned names.
    """
    return [where for where, tensor in _named_tensors(out, name)
            if tensor.is_floating_point() and not _all_finite(tensor)]


def _named_tensors(out: Any, name: str = 'output') -> list[tuple[str, Tensor]]:
    """Every tensor in a model's output, with where it sits (e.g. ``output['cls'][0]``)."""
    if isinstance(out, Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        return [item for key in sorted(out)
                for item in _named_tensors(out[key], f'{name}[{key!r}]')]
    if isinstance(out, (list, tuple)):
        return [item for i, value in enumerate(out)
                for item in _named_tensors(value, f'{name}[{i}]')]
    if hasattr(out, 'to_dict'):  # mmengine data elements
        return _named_tensors(out.to_dict(), name)
    return []


def flatten_tensors(out: Any) -> list[Tensor]:
    """Every tensor in a model's (or a module's) output: tensors, dicts by sorted
    key, lists, tuples, mmengine data elements, nested, in a fixed order."""
    return [tensor for _, tensor in _named_tensors(out)]


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@contextlib.contextmanager
def _in_eval_mode(*models: nn.Module) -> Iterator[None]:
    """All ``models`` in eval mode inside the block (together: they may share
    submodules), each one's train/eval flag restored after it."""
    flags = [(model, model.training) for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, flag in flags:
            model.train(flag)


@torch.no_grad()
def contraction_errors(expanded: nn.Module, compact: nn.Module, inputs: Any,
                       forward_fn: ForwardFn | None = None) -> dict[str, Any]:
    """Run both models in eval mode on ``inputs`` and measure how their outputs differ.

    Measures only: a large error is returned, not raised (see
    :func:`check_contraction` for the check that refuses). Both models'
    train/eval flags are restored afterwards.

    Args:
        expanded: The model with expanded layers.
        compact: Its contraction.
        inputs: A tensor, a tuple of positional args or a dict of keyword args.
        forward_fn: ``forward_fn(model, inputs)`` when a plain call does not fit
            (e.g. mm models: ``lambda m, x: m(x, mode='tensor')``).

    Returns:
        ``{'max_abs': ..., 'max_rel': ..., 'max_ref': ...}`` where ``max_rel`` is
        ``max_abs`` divided by the largest magnitude of the compact outputs.
        When an output of either model holds a NaN or an Inf, ``max_abs`` and
        ``max_rel`` are ``inf`` (so no tolerance accepts them) and
        ``non_finite`` lists those outputs, e.g. ``['compact output[1]']``.

    Raises:
        ConfigError: If the two models return different output structures.
    """
    forward_fn = forward_fn or _default_forward
    with _in_eval_mode(expanded, compact):
        ys = _named_tensors(forward_fn(expanded, inputs))
        yc = _named_tensors(forward_fn(compact, inputs))
    if len(ys) != len(yc) or any(a.shape != b.shape for (_, a), (_, b) in zip(ys, yc)):
        raise ConfigError('verify_contraction: the expanded and compact models return '
                          f'different outputs ({[tuple(t.shape) for _, t in ys]} vs '
                          f'{[tuple(t.shape) for _, t in yc]})')
    non_finite = [f'{which} {name}' for which, outputs in (('expanded', ys), ('compact', yc))
                  for name, tensor in outputs if not _all_finite(tensor)]
    max_ref = _largest(float(b.double().abs().max()) for _, b in yc if b.numel())
    if non_finite:
        return dict(max_abs=math.inf, max_rel=math.inf, max_ref=max_ref, non_finite=non_finite)
    max_abs = _largest(float((a.double() - b.double()).abs().max())
                       for (_, a), (_, b) in zip(ys, yc) if a.numel())
    return dict(max_abs=max_abs, max_rel=max_abs / max(max_ref, 1e-12), max_ref=max_ref)


verify_contraction = contraction_errors


def listed(names: list[str], limit: int = 8) -> str:
    """``names`` joined by commas, the first ``limit`` of them and how many more."""
    return ', '.join(names[:limit]) + (f' (and {len(names) - limit} more)'
                                       if len(names) > limit else '')


def _refuse_non_finite_tensors(expanded: nn.Module, compact: nn.Module) -> None:
    """Raise :class:`ContractionCheckError` naming every tensor that holds a NaN or an Inf."""
    found = [f"the {which} model's {listed(keys)}"
             for which, keys in (('expanded', non_finite_tensors(expanded)),
                                 ('compact', non_finite_tensors(compact))) if keys]
    if found:
        raise ContractionCheckError(
            'contraction check failed: NaN or Inf in ' + '; in '.join(found)
            + ': a model with non-finite weights or statistics computes nothing usable '
            '(resume from an earlier checkpoint, or lower the learning rate)')


def check_contraction(expanded: nn.Module, compact: nn.Module, inputs: Any,
                      forward_fn: ForwardFn | None = None,
                      rtol: float = 1e-4) -> dict[str, Any]:
    """Refuse a contraction that does not compute what the expanded model does.

    First every weight and buffer of both models must be finite (no NaN, no
    Inf). Then the two models are compared as they are (float32, the
    expanded one composing its kernels online) with
    :func:`contraction_errors`; their outputs must be finite. A network can
    amplify float32 rounding far beyond ``rtol`` (eval-mode BatchNorm whose
    running statistics lag the weights, early in training, can take 1e-7 to
    1e-2), so a float32 error above ``rtol`` is checked again in float64 on CPU,
    layer by layer (:func:`layer_contraction_errors`): each expanded layer
    runs as it was trained and with its chain explicit -- the paper's form,
    independent of the composition code -- against its float64 contraction,
    and ``compact``'s tensors are compared with that contraction's (and with
    the expanded model's outside the expanded layers), each relative to its
    largest entry (within ``rtol``, or 8 eps of their dtype if that is
    larger). Only an error there raises; otherwise the float32 figure is put
    down to rounding, which every float32 copy of that network shares. The
    compact network differs from the expanded one only at those layers, so
    this is as exact as a float64 run of both whole models, at the memory of
    one layer's float64 copy instead of the whole model's.

    A probe can also be too weak to tell: through an untrained network whose
    batch norms still hold their initial statistics the signal can fade until
    the outputs are the heads' constant biases, whatever the kernels. When the
    compact outputs change by less than :data:`WEAK_PROBE_SENSITIVITY` (of
    their size) between ``inputs`` and another random input, every expanded
    layer is checked on its own instead (:func:`check_layer_contractions`).

    Args:
        expanded: The model with expanded layers.
        compact: Its contraction.
        inputs: The probe: a tensor, a tuple of positional args or a dict of
            keyword args.
        forward_fn: ``forward_fn(model, inputs)`` when a plain call does not fit.
        rtol: Largest accepted error, relative to the largest compact output.

    Returns:
        When the contraction passes: :func:`contraction_errors`'s dict, with
        ``input_sensitivity`` (how much the outputs depend on the input) and,
        for a weak probe, ``layers_max_rel``; after a float64 re-check also
        :func:`layer_contraction_errors`'s figures (``float64_max_rel`` and
        ``float64_worst_layer``, ``float64_weights_max_rel`` and
        ``float64_worst_tensor``, ``layers_max_rel``).

    Raises:
        ContractionCheckError: Naming the tensors or outputs that hold a NaN or
            an Inf, or if the float64 check finds a relative error above
            ``rtol``.
        RuntimeError: If the float32 error is above ``rtol`` and the float64
            re-check cannot run.
        ConfigError: If the two models return different output structures.
    """
    _refuse_non_finite_tensors(expanded, compact)
    errors = contraction_errors(expanded, compact, inputs, forward_fn)
    if 'non_finite' in errors:
        raise ContractionCheckError(
            f"contraction check failed: NaN or Inf in {listed(errors['non_finite'])} on the "
            'probe, although every weight and buffer is finite (an overflow inside the '
            'network?)')
    if errors['max_rel'] <= rtol:
        _check_with_a_weak_probe_in_mind(expanded, compact, inputs, forward_fn, rtol, errors)
        return errors
    errors.update(_recheck_in_float64(expanded, compact, rtol, errors))
    return errors


def _check_with_a_weak_probe_in_mind(expanded: nn.Module, compact: nn.Module, inputs: Any,
                                     forward_fn: ForwardFn | None, rtol: float,
                                     errors: dict[str, Any]) -> None:
    """Record how much the probe tells; when too little, check each layer on its own."""
    sensitivity = _input_sensitivity(compact, inputs, forward_fn)
    if sensitivity is None:
        return
    errors['input_sensitivity'] = sensitivity
    if sensitivity < WEAK_PROBE_SENSITIVITY:
        errors['layers_max_rel'] = check_layer_contractions(expanded, compact, rtol)


def _recheck_in_float64(expanded: nn.Module, compact: nn.Module, rtol: float,
                        errors: dict[str, Any]) -> dict[str, Any]:
    """The float64 figures of a float32 error above ``rtol``; raises if they confirm it."""
    failed = (f'contraction check failed: max relative error {errors["max_rel"]:.3g} > '
              f'{rtol:g} (max abs {errors["max_abs"]:.3g})')
    try:
        exact = layer_contraction_errors(expanded, compact)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        if isinstance(err, ContractionCheckError):
            raise
        raise VerificationUnavailableError(
            f'{failed}, and the float64 re-check that tells float32 rounding from a wrong '
            f'contraction could not run ({type(err).__name__}: {err}); the compact model may '
            'not compute what the expanded one does') from err
    # The written tensors carry their dtype's rounding whatever rtol says.
    weights_rtol = max(rtol, 8 * _eps_of(compact))
    if not (exact['float64_max_rel'] <= rtol and exact['float64_weights_max_rel'] <= weights_rtol):
        raise ContractionCheckError(
            f'{failed}; in float64, layer by layer, the expanded layers (as trained, and with '
            f'explicit chains) and their contractions differ by '
            f'{exact["float64_max_rel"]:.3g} ({exact["float64_worst_layer"]}) and the compact '
            f'tensors differ from those contractions by up to '
            f'{exact["float64_weights_max_rel"]:.3g} ({exact["float64_worst_tensor"]}): the '
            'compact model would not compute what the expanded one does')
    return exact


def _input_sensitivity(model: nn.Module, inputs: Any,
                       forward_fn: ForwardFn | None) -> float | None:
    """max |y(x') - y(x)| / max |y(x)| for another random ``x'`` of ``inputs``' shapes
    (None when ``inputs`` has no floating-point tensor to vary)."""
    gen = torch.Generator().manual_seed(1)
    varied = False

    def other(tensor: Tensor) -> Tensor:
        nonlocal varied
        if not tensor.is_floating_point():
            return tensor
        varied = True
        return torch.randn(tensor.shape, generator=gen).to(tensor) * tensor.std().clamp_min(1)

    second = _map_tensors(inputs, other)
    if not varied:
        return None
    forward_fn = forward_fn or _default_forward
    with torch.no_grad(), _in_eval_mode(model):
        first = flatten_tensors(forward_fn(model, inputs))
        again = flatten_tensors(forward_fn(model, second))
    scale = _largest(float(t.abs().max()) for t in first if t.numel())
    change = _largest(float((a - b).abs().max()) for a, b in zip(first, again) if a.numel())
    return change / scale if scale > 0 else 0.0


def _layer_probe(layer: nn.Module, gen: torch.Generator) -> Tensor:
    """A random float64 input that reaches every weight of the expanded ``layer``."""
    if isinstance(layer, ExpandConv2d):
        reach = max(d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size))
        side = reach + max(layer.stride) + 2
        return torch.randn(1, layer.in_channels, side, side, generator=gen, dtype=torch.float64)
    return torch.randn(2, layer.in_features, generator=gen, dtype=torch.float64)


def check_layer_contractions(expanded: nn.Module, compact: nn.Module,
                             rtol: float = 1e-4) -> float:
    """Refuse an expanded layer whose contracted counterpart computes something else.

    Each chain runs explicitly (the paper's form) in float64 on CPU on a
    random input, against the layer at the same path in ``compact`` (in
    float64 too); the relative error must be within ``rtol``. Independent of
    the network around the layers, so it holds where a whole-model probe
    cannot tell (see :func:`check_contraction`). One layer's float64 copy
    exists at a time.

    Args:
        expanded: The model with expanded layers.
        compact: Its contraction (same module paths).
        rtol: Largest accepted error, relative to the chain's largest output.

    Returns:
        When every layer passes: the largest relative error over the layers
        (0 without expanded layers).

    Raises:
        ContractionCheckError: Naming the first layer whose error exceeds
            ``rtol`` or whose chain or contraction gives a NaN or an Inf.
    """
    worst = 0.0
    for path, figures in _layers_in_float64(expanded, compact):
        error = figures['compact_rel']
        if not error <= rtol:
            raise ContractionCheckError(
                f'contraction check failed at {path}: the contracted layer and its chain '
                f'(float64, explicit) differ by {error:.3g} (relative) > {rtol:g}')
        worst = max(worst, error)
    return worst


def layer_contraction_errors(expanded: nn.Module, compact: nn.Module) -> dict[str, Any]:
    """Measure, layer by layer in float64 on CPU, how exact ``compact`` is.

    The compact network differs from the expanded one only where an expanded
    layer was replaced by its contraction, so the two compute the same
    function exactly when (a) every expanded layer, run as trained (its own
    mode) and with its chain explicit (the paper's form, independent of the
    composition code), computes what its float64 contraction computes, (b)
    ``compact``'s tensors at each path of that layer equal the contraction's
    (up to their dtype's rounding) and (c) every other tensor of ``compact``
    equals the expanded model's. This measures the three without a float64
    copy of either model: one layer is copied to float64 at a time and
    freed, so the memory is one layer's float64 work, whatever the model.

    Args:
        expanded: The model with expanded layers.
        compact: Its contraction (same module paths).

    Returns:
        ``float64_max_rel`` (largest output error of (a), relative to the
        chain's largest output) and the layer it was found at,
        ``float64_worst_layer``; ``float64_weights_max_rel`` (largest
        difference of (b) and (c), each tensor relative to its largest exact
        entry) and the tensor, ``float64_worst_tensor``; ``layers_max_rel``,
        the largest error of ``compact``'s layers run against the explicit
        chains (what :func:`check_layer_contractions` bounds).

    Raises:
        ContractionCheckError: Naming a layer whose chain or contraction gives
            a NaN or an Inf on a random input.
        RuntimeError: If ``compact`` has other state-dict keys than the
            contraction of ``expanded``.
    """
    found = dict(float64_max_rel=0.0, float64_worst_layer=None, float64_weights_max_rel=0.0,
                 float64_worst_tensor=None, layers_max_rel=0.0)
    for path, figures in _layers_in_float64(expanded, compact):
        found['layers_max_rel'] = _largest([found['layers_max_rel'], figures['compact_rel']])
        if figures['contraction_rel'] > found['float64_max_rel'] or not found[
                'float64_worst_layer']:
            found.update(float64_max_rel=figures['contraction_rel'], float64_worst_layer=path)
        if figures['weights_rel'] > found['float64_weights_max_rel'] or not found[
                'float64_worst_tensor']:
            found.update(float64_weights_max_rel=figures['weights_rel'],
                         float64_worst_tensor=figures['worst_tensor'])
    rel, key = _largest_tensor_difference(_outside_expanded_layers(compact.state_dict(), expanded),
                                          _outside_expanded_layers(expanded.state_dict(),
                                                                   expanded))
    if key is not None and (rel > found['float64_weights_max_rel']
                            or found['float64_worst_tensor'] is None):
        found.update(float64_weights_max_rel=rel, float64_worst_tensor=key)
    return found


def _outside_expanded_layers(state_dict: Mapping[str, Any], expanded: nn.Module) -> dict:
    """The entries of ``state_dict`` that are not under a path of an expanded layer."""
    prefixes = tuple(f'{path}.' for path, _ in expanded_layer_paths(expanded))
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _layers_in_float64(expanded: nn.Module, compact: nn.Module
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, figures)`` of every path to an expanded layer, checked in float64 on CPU.

    A layer shared by several paths is copied and contracted once, and
    ``compact``'s module at each of its paths is compared with it.
    """
    gen = torch.Generator().manual_seed(0)
    paths: dict[int, list[str]] = {}
    layers: dict[int, ExpandedLayer] = {}
    for path, layer in expanded_layer_paths(expanded):
        paths.setdefault(id(layer), []).append(path)
        layers[id(layer)] = layer
    for key, layer in layers.items():
        yield from _one_layer_in_float64(paths[key], layer, compact, gen)


def _one_layer_in_float64(paths: list[str], layer: ExpandedLayer, compact: nn.Module,
                          gen: torch.Generator) -> Iterator[tuple[str, dict[str, Any]]]:
    """The float64 figures of one expanded layer, at each of its ``paths`` in ``compact``."""
    chain = _cpu_float64_copy(layer).eval()
    exact = chain.contract().eval()
    x = _layer_probe(layer, gen)
    with torch.no_grad():
        outputs = {'its chain as trained': chain(x)}
        chain.set_mode('explicit')
        outputs['its chain'] = chain(x)
        outputs['the contracted layer'] = exact(x)
    del chain
    reference = outputs['its chain']
    scale = reference.abs().max().clamp_min(1e-30)

    def relative(other: Tensor) -> float:
        return float((other - reference).abs().max() / scale)

    contraction_rel = _largest([relative(outputs['its chain as trained']),
                                relative(outputs['the contracted layer'])])
    exact_state = exact.state_dict()
    for path in paths:
        target = _cpu_float64_copy(compact.get_submodule(path)).eval()
        with torch.no_grad():
            outputs['the compact layer'] = target(x)
        _refuse_non_finite_layer_outputs(path, outputs)
        weights_rel, worst = _largest_tensor_difference(compact.get_submodule(path).state_dict(),
                                                        exact_state)
        yield path, dict(contraction_rel=contraction_rel,
                         compact_rel=relative(outputs['the compact layer']),
                         weights_rel=weights_rel, worst_tensor=f'{path}.{worst}')


def _refuse_non_finite_layer_outputs(path: str, outputs: dict[str, Tensor]) -> None:
    """Raise :class:`ContractionCheckError` if one of a layer's float64 outputs is not finite."""
    bad = next((name for name, y in outputs.items() if not _all_finite(y)), None)
    if bad is not None:
        raise ContractionCheckError(
            f'contraction check failed at {path}: NaN or Inf in the output of {bad} '
            '(float64) on a random input')


def _eps_of(model: nn.Module) -> float:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float32).eps)


def _largest_tensor_difference(given: dict[str, Any],
                               exact: dict[str, Any]) -> tuple[float, str | None]:
    """The largest relative difference between two state dicts' floating tensors,
    each relative to its largest exact entry, and the key it was found at."""
    if given.keys() != exact.keys():
        raise RuntimeError(f'the compact model has other state-dict keys than the contraction '
                           f'({sorted(given.keys() ^ exact.keys())[:5]})')
    worst, worst_key = 0.0, None
    for key, value in exact.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
            diff = float((given[key].detach().cpu().double() - value).abs().max())
            rel = _largest([diff / max(float(value.abs().max()), 1e-12)])
            if rel > worst or worst_key is None:
                worst, worst_key = rel, key
    return worst, worst_key


def _cpu_float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its floating tensors in float64 on CPU.

    Each parameter and buffer is converted on its own, straight into the copy
    (``deepcopy``'s memo), so no float32 copy of the whole model is made on
    the model's device first: during training that memory is the activations'.
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        value = tensor.detach().to(
            device='cpu', copy=True,
            dtype=torch.float64 if tensor.is_floating_point() else tensor.dtype)
        memo[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else value)
    return copy.deepcopy(model, memo)


def _cpu_float64(tensor: Tensor) -> Tensor:
    tensor = tensor.detach().cpu()
    return tensor.double() if tensor.is_floating_point() else tensor
