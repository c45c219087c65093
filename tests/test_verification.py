"""Verification of a contraction: float32 probe, float64 re-check, per-layer check,
and the refusal of NaN / Inf weights, statistics and outputs."""
import math

import pytest
import torch
from torch import nn

import expand_mm
from expand_mm import contract_model, expand_model
from expand_mm.verification import (ContractionCheckError, _cpu_float64_copy, _largest,
                                    check_contraction, check_layer_contractions,
                                    contraction_errors, non_finite_tensors)


def _small_net():
    """conv-BN-ReLU, a 5x5 conv left for CK, a 1x1 left compact, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2), nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _amplifying_net_and_input():
    """An expanded conv whose outputs sit 1e4 times above what eval-mode BN
    leaves of them: float32 rounding of the kernel comes out ~1e3 times larger
    (relative), as early in training when BN's running statistics lag the weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8))
    expand_model(net, ratio=4)
    x = 100 + 0.01 * torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        net[1].running_mean.copy_(net[0](x).mean((0, 2, 3)))
        net[1].running_var.fill_(1e-4)
    return net.eval(), x


def test_check_contraction_tells_float32_rounding_from_a_wrong_contraction():
    net, x = _amplifying_net_and_input()
    compact = contract_model(net)
    rounding = expand_mm.check_contraction(net, compact, x, rtol=1e-4)
    assert rounding['max_rel'] > 1e-4  # the float32 check alone would refuse it
    assert rounding['float64_max_rel'] < 1e-10
    assert rounding['float64_weights_max_rel'] < 1e-6
    # contract_model's own check agrees (it raised before the float64 re-check)
    contract_model(net, verify_inputs=x)
    with torch.no_grad():
        compact[0].weight[0, 0, 0, 0] += 1e-3 * float(compact[0].weight.abs().max())
    with pytest.raises(RuntimeError, match=r"compact tensors differ from those contractions by "
                                           r"up to 0\.001.*\(0\.weight\)"):
        expand_mm.check_contraction(net, compact, x, rtol=1e-4)
    # A wrong online forward (what was trained) or a wrong contract() is not rounding,
    # even where the float32 error alone cannot tell.
    from expand_mm.layers import ExpandConv2d
    for method in ('composed', 'contract'):
        original = getattr(ExpandConv2d, method)
        if method == 'composed':
            def broken(self, original=original):
                weight, bias = original(self)
                return weight * 1.01, bias
        else:
            def broken(self, original=original):
                conv = original(self)
                with torch.no_grad():
                    conv.weight.mul_(1.01)
                return conv
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ExpandConv2d, method, broken)
            net.eval()
            with pytest.raises(RuntimeError, match=r'in float64, layer by layer, the expanded '
                                                   r'layers \(as trained, and with explicit '
                                                   r'chains\) and their contractions differ by '
                                                   r'(0\.00[1-9]|0\.0[1-9]|0\.[1-9]|[1-9])[^ ]* '
                                                   r'\(0\)'):
                expand_mm.check_contraction(net, contract_model(net), x, rtol=1e-4)
    # on a well-conditioned net the float32 check decides alone
    small = _small_net()
    expand_model(small, ratio=2)
    errors = expand_mm.check_contraction(small, contract_model(small), torch.randn(2, 3, 16, 16))
    assert errors['max_rel'] < 1e-5 and 'float64_max_rel' not in errors


def test_float64_recheck_copy_shares_nothing_and_keeps_the_structure():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    expand_mm.expand_model(net, strategy='cl', ratio=2, include=['0', '2'], expand_1x1=True)
    net[1].weight.requires_grad_(False)
    copy64 = _cpu_float64_copy(net)
    originals = dict(net.state_dict(keep_vars=True))
    for key, value in copy64.state_dict(keep_vars=True).items():
        original = originals[key]
        assert value.dtype == (torch.float64 if original.is_floating_point() else original.dtype)
        assert value.data_ptr() != original.data_ptr(), key
        assert torch.equal(value, original.to(value.dtype))
    assert isinstance(copy64[1].weight, nn.Parameter) and not copy64[1].weight.requires_grad
    copy64[1].num_batches_tracked += 1
    assert int(net[1].num_batches_tracked) == 0
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(copy64.eval()(x.double()).float(), net.eval()(x))


def _expanded_small_net_and_input():
    torch.manual_seed(0)
    net = _small_net()
    expand_model(net, strategy='auto', ratio=2, expand_linear=True)
    return net.eval(), torch.randn(2, 3, 12, 12)


@pytest.mark.parametrize('key, value, named', [
    ('0.convs.1.weight', math.nan, r"expanded model's 0\.convs\.1\.weight.*compact model's "
                                   r'0\.weight'),
    ('4.weight', math.inf, r"expanded model's 4\.weight; in the compact model's 4\.weight"),
    ('1.running_mean', math.nan, r"expanded model's 1\.running_mean; in the compact model's "
                                 r'1\.running_mean'),
], ids=['nan-in-a-factor', 'inf-in-a-compact-conv', 'nan-in-batch-norm-statistics'])
def test_a_non_finite_weight_or_statistic_is_refused_by_name(key, value, named):
    net, x = _expanded_small_net_and_input()
    with torch.no_grad():
        net.state_dict(keep_vars=True)[key].view(-1)[0] = value
    compact = contract_model(net)
    assert key in non_finite_tensors(net)
    errors = contraction_errors(net, compact, x)
    assert errors['max_rel'] == math.inf and not errors['max_rel'] <= 1e-4
    assert 'compact output' in ' '.join(errors['non_finite'])
    with pytest.raises(ContractionCheckError, match=r'NaN or Inf in the ' + named):
        check_contraction(net, compact, x)
    with pytest.raises(ContractionCheckError, match=named):
        contract_model(net, verify_inputs=x)


def test_a_finite_model_whose_outputs_overflow_is_refused_naming_the_outputs():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    expand_model(net, keep_weights=True)
    compact = contract_model(net)
    assert not non_finite_tensors(net) and not non_finite_tensors(compact)
    x = torch.full((1, 1, 7, 7), 1e38)
    assert contraction_errors(net, compact, x)['non_finite'] == ['expanded output',
                                                                 'compact output']
    with pytest.raises(ContractionCheckError, match=r'NaN or Inf in expanded output, compact '
                                                    r'output on the probe, although every '
                                                    r'weight and buffer is finite'):
        check_contraction(net, compact, x)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 3, padding=1)
        self.reg = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        features = self.stem(x)
        return {'cls': self.cls(features), 'reg': [features, self.reg(features)]}


def test_contraction_errors_name_the_non_finite_output_where_it_sits():
    """A NaN in the last output is not skipped, whatever Python's max makes of its position."""
    torch.manual_seed(0)
    net = _TwoHeads()
    expand_model(net)
    compact = contract_model(net)
    x = torch.randn(1, 3, 6, 6)
    assert contraction_errors(net, compact, x)['max_rel'] < 1e-5
    with torch.no_grad():
        compact.reg.weight[0, 0, 0, 0] = math.nan
    errors = contraction_errors(net, compact, x)
    assert errors['non_finite'] == ["compact output['reg'][1]"]
    assert errors['max_abs'] == errors['max_rel'] == math.inf
    with pytest.raises(ContractionCheckError, match=r"NaN or Inf in the compact model's "
                                                    r'reg\.weight: '):
        check_contraction(net, compact, x)


def test_the_layer_by_layer_check_refuses_a_non_finite_layer_by_path():
    torch.manual_seed(0)
    net = _TwoHeads()
    expand_model(net)
    compact = contract_model(net)
    assert check_layer_contractions(net, compact) < 1e-6  # the compact copy is float32
    with torch.no_grad():
        net.reg.convs[0].weight[0, 0, 0, 0] = math.inf
    with pytest.raises(ContractionCheckError, match=r'contraction check failed at reg: NaN or '
                                                    r'Inf in the output of its chain'):
        check_layer_contractions(net, compact)


def test_largest_counts_nan_as_infinite_wherever_it_sits():
    assert max([1.0, math.nan]) == 1.0  # what Python's max does with it
    assert _largest([1.0, math.nan]) == _largest([math.nan, 1.0]) == math.inf
    assert _largest([]) == 0.0 and _largest([2.0, 3.0]) == 3.0


def test_the_check_names_are_importable_from_surgery_and_the_package():
    """surgery keeps the names that moved here; verify_contraction is contraction_errors."""
    import expand_mm.surgery as surgery
    import expand_mm.verification as verification
    for name in ('ContractionCheckError', 'check_contraction', 'check_layer_contractions',
                 'verify_contraction', 'WEAK_PROBE_SENSITIVITY', 'flatten_tensors'):
        assert getattr(surgery, name) is getattr(verification, name), name
    assert expand_mm.verify_contraction is contraction_errors
    assert issubclass(ContractionCheckError, (expand_mm.ExpandMMError, RuntimeError))
    with pytest.raises(AttributeError, match='no_such_name'):
        surgery.no_such_name


def test_the_float64_recheck_copies_one_layer_at_a_time_never_the_model(monkeypatch):
    import expand_mm.verification as verification
    net, x = _amplifying_net_and_input()
    net = nn.Sequential(net, nn.Conv2d(8, 8, 3))
    expand_model(net, ratio=2, include=['1'])
    compact = contract_model(net)
    copied = []
    original = verification._cpu_float64_copy

    def recording(module):
        copied.append(module)
        return original(module)

    monkeypatch.setattr(verification, '_cpu_float64_copy', recording)
    errors = check_contraction(net, compact, x, rtol=1e-4)
    assert errors['max_rel'] > 1e-4 and errors['float64_max_rel'] < 1e-10
    expanded = [m for m in copied if isinstance(m, expand_mm.layers.ExpandedLayer)]
    assert len(expanded) == 2 and all(isinstance(m, (nn.Conv2d, expand_mm.layers.ExpandedLayer))
                                      for m in copied)
    assert {errors['float64_worst_layer']} <= {'0.0', '1'}
    # a tensor outside the expanded layers that differs is found too
    with torch.no_grad():
        compact[0][1].running_var.mul_(1.01)
    assert verification.layer_contraction_errors(net, compact)['float64_worst_tensor'] == \
        '0.1.running_var'


def test_what_a_save_needs_is_said_when_it_is_large(monkeypatch):
    from expand_mm import checks
    net = _small_net()
    expand_model(net, ratio=2, expand_linear=True)
    need = checks.contraction_memory(net)
    compact = contract_model(net)
    assert need['compact_bytes'] == sum(t.numel() * t.element_size() for t in
                                        list(compact.parameters()) + list(compact.buffers()))
    largest = max(expand_mm.expanded_layers(net), key=lambda item: item[1].num_params_expanded())
    assert need['layer'] == largest[0]
    assert need['layer_bytes'] == largest[1].num_params_expanded() * 24
    assert checks.save_memory_note(net, 1 << 40) is None  # small: nothing to say
    monkeypatch.setattr(checks, 'LARGE_SAVE_BYTES', 0)
    level, message = checks.save_memory_note(net, 1 << 40)
    assert level == 'info' and f'the largest {largest[0]!r}' in message
    level, message = checks.save_memory_note(net, need['total_bytes'])
    assert level == 'warning' and 'verify=False' in message
    assert checks.save_memory_note(nn.Conv2d(1, 1, 1), 1 << 40) is None
    assert checks.available_memory_bytes() is None or checks.available_memory_bytes() > 0
