"""Expand -> contract the stock compact models: same function, stock state dict."""
import copy

import pytest
import torch

import expand_mm
from expand_mm.probe import probe_forward
from stock_models import STOCK_CONFIGS, build_stock_model

pytestmark = pytest.mark.slow


def has_large_kernels(model) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) >= 5
               for m in model.modules())


def calibrate_batch_norm(model, x) -> None:
    """Set every batch norm's running statistics to those of ``x`` (model left in eval).

    With its initial statistics (mean 0, variance 1) eval-mode batch norm does not
    rescale, and through a deep untrained net (SSDLite, YOLOX) the signal fades until
    the outputs are the heads' constant prior biases, against which any contraction
    error would look small.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        probe_forward(model, x)
    model.eval()


def float32_rounding_error(model, x) -> float:
    """Largest output difference between ``model`` in float32 and a float64 copy of it."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        outputs = expand_mm.surgery.flatten_tensors(probe_forward(model, x))
        outputs64 = expand_mm.surgery.flatten_tensors(probe_forward(model64, x.double()))
    return max(float((a.double() - b).abs().max()) for a, b in zip(outputs, outputs64))


@pytest.mark.parametrize('strategy', ['cl', 'auto'])
@pytest.mark.parametrize('name', sorted(STOCK_CONFIGS))
def test_expand_contract_stock_model(name, strategy, stock_model):
    model = stock_model(name).eval()
    if strategy == 'auto' and not has_large_kernels(model):
        pytest.skip(f'{name} has no kernel >= 5: CK does not apply, auto == cl')
    stock_keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 96)
    report = expand_mm.expand_model(model, strategy=strategy, ratio=4)
    assert len(report.layers) > 0
    assert report.model_params_after > report.model_params_before
    calibrate_batch_norm(model, x)
    # Every output must depend on the input, or the comparison below could not fail.
    with torch.no_grad():
        outputs = expand_mm.surgery.flatten_tensors(probe_forward(model, x))
    assert outputs and all(float(t.std()) > 1e-3 * float(t.abs().max()) > 0 for t in outputs)
    # Fresh factors change the function; keep the comparison to expanded vs contracted.
    compact = expand_mm.contract_model(model)
    assert not expand_mm.expanded_layers(compact)
    assert expand_mm.expanded_layers(model), 'contract_model must not modify its input'
    assert {k: v.shape for k, v in compact.state_dict().items()} == stock_keys
    errors = expand_mm.verify_contraction(model, compact, x, forward_fn=probe_forward)
    # Calibrated batch norm divides by small batch variances, which amplifies float32
    # rounding: on SSDLite the compact network alone differs from its float64 self by
    # 1.3e-3 of max|y| (the CPU's kernels decide how much). The online composition
    # rounds every kernel once more, so it is held to a few times the network's own
    # float32 noise (measured here: 0.9-4.7x); the algebra is checked in float64 below.
    float32_noise = float32_rounding_error(compact, x)
    assert errors['max_abs'] <= 16 * float32_noise, (errors, float32_noise)
    # The chains run explicitly (the paper's training form), against the contraction.
    model.double()
    compact = expand_mm.contract_model(model)
    expand_mm.set_expand_mode(model, 'explicit')
    errors = expand_mm.verify_contraction(model, compact, x.double(), forward_fn=probe_forward)
    assert errors['max_abs'] <= 1e-9 * errors['max_ref'], errors


@pytest.mark.parametrize('name', sorted(STOCK_CONFIGS))
def test_keep_weights_preserves_stock_model(name, stock_model):
    model = stock_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = probe_forward(model, x)
    expand_mm.expand_model(model, strategy='cl', ratio=4, keep_weights=True)
    with torch.no_grad():
        after = probe_forward(model.eval(), x)
    flat = expand_mm.surgery.flatten_tensors
    assert len(flat(before)) == len(flat(after)) > 0
    for a, b in zip(flat(before), flat(after)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_a_weak_probe_falls_back_to_checking_each_layer():
    """Untrained YOLOX (initial batch norm statistics): its outputs are the heads' prior
    biases whatever the input, so a corrupted kernel passes the whole-model probe; each
    layer is then checked on its own, and the corruption is named."""
    from expand_mm.verification import check_contraction
    torch.manual_seed(0)
    model = build_stock_model('yolox_tiny').eval()
    expand_mm.expand_model(model, strategy='cl', ratio=2)
    compact = expand_mm.contract_model(model)
    x = torch.randn(1, 3, 64, 64)
    errors = check_contraction(model, compact, x, forward_fn=probe_forward)
    assert errors['input_sensitivity'] < 1e-3
    assert errors['layers_max_rel'] < 1e-6  # the compact weights' float32 rounding
    with torch.no_grad():
        compact.backbone.stem.conv.conv.weight.mul_(1.5)
    assert expand_mm.verify_contraction(model, compact, x, forward_fn=probe_forward)[
        'max_rel'] < 1e-4  # what the probe alone would have let through
    with pytest.raises(RuntimeError, match=r'contraction check failed at '
                                           r'backbone.stem.conv.conv: .* differ by 0.5'):
        check_contraction(model, compact, x, forward_fn=probe_forward)
    # A probe the outputs depend on keeps the whole-model check alone.
    calibrate_batch_norm(model, x)
    errors = check_contraction(model, expand_mm.contract_model(model), x,
                               forward_fn=probe_forward)
    assert errors['input_sensitivity'] > 1e-3 and 'layers_max_rel' not in errors
