"""Expand -> contract the stock compact models: same function, stock state dict."""
import pytest
import torch

import expand_mm
from expand_mm.deploy import probe_forward
from stock_models import STOCK_CONFIGS, build_stock_model


def has_large_kernels(model) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) >= 5
               for m in model.modules())


@pytest.mark.parametrize('strategy', ['cl', 'auto'])
@pytest.mark.parametrize('name', sorted(STOCK_CONFIGS))
def test_expand_contract_stock_model(name, strategy):
    torch.manual_seed(0)
    model = build_stock_model(name).eval()
    if strategy == 'auto' and not has_large_kernels(model):
        pytest.skip(f'{name} has no kernel >= 5: CK does not apply, auto == cl')
    stock_keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 96)
    report = expand_mm.expand_model(model, strategy=strategy, ratio=4)
    assert len(report.layers) > 0
    assert report.model_params_after > report.model_params_before
    # Fresh factors change the function; keep the comparison to expanded vs contracted.
    compact = expand_mm.contract_model(model)
    assert not expand_mm.expanded_layers(compact)
    assert expand_mm.expanded_layers(model), 'contract_model must not modify its input'
    assert {k: v.shape for k, v in compact.state_dict().items()} == stock_keys
    errors = expand_mm.verify_contraction(model, compact, x, forward_fn=probe_forward)
    assert errors['max_abs'] <= 1e-5 * errors['max_ref'], errors


@pytest.mark.parametrize('name', sorted(STOCK_CONFIGS))
def test_keep_weights_preserves_stock_model(name):
    torch.manual_seed(0)
    model = build_stock_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = probe_forward(model, x)
    expand_mm.expand_model(model, strategy='cl', ratio=4, keep_weights=True)
    with torch.no_grad():
        after = probe_forward(model.eval(), x)
    flat = expand_mm.surgery._flatten_tensors
    assert len(flat(before)) == len(flat(after)) > 0
    for a, b in zip(flat(before), flat(after)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
