"""Tests of ExpandConv2d / ExpandLinear: exactness, modes, gradients, caching, errors."""

import copy
import pickle
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from expand_mm.errors import ConfigError
from expand_mm.layers import ExpandConv2d, ExpandedLayer, ExpandLinear
from expand_mm.ops import ck_exact_min_ratio, ck_kernel_sizes

F64 = torch.float64
# Derandomised: CI runs the same examples every time (a failure is reproducible).
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@dataclass
class ConvCase:
    conv_kwargs: dict
    strategy: str
    ratio: int
    input_shape: tuple
    seed: int

    def conv(self, dtype=torch.float32) -> nn.Conv2d:
        torch.manual_seed(self.seed)
        conv = nn.Conv2d(**self.conv_kwargs).to(dtype)
        with torch.no_grad():  # make the bias matter as much as the weight
            if conv.bias is not None:
                conv.bias.normal_()
        return conv

    def expanded(self, dtype=torch.float32, **kw) -> ExpandConv2d:
        torch.manual_seed(self.seed + 1)
        layer = ExpandConv2d.from_conv(self.conv(dtype), strategy=self.strategy,
                                       ratio=self.ratio, name='neck.conv', **kw)
        with torch.no_grad():  # non-zero biases on every sub-layer
            for c in layer.convs:
                if c.bias is not None:
                    c.bias.normal_()
        return layer

    def input(self, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(self.seed),
                           dtype=dtype)


@st.composite
def conv_cases(draw, strategy=None, ratio_min=1):
    strategy = strategy or draw(st.sampled_from(['cl', 'ck']))
    kind = draw(st.sampled_from(['plain', 'grouped', 'depthwise', 'depthwise_mult']))
    if kind == 'plain':
        g, m_g, n_g = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == 'grouped':
        g, m_g, n_g = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    elif kind == 'depthwise':
        g, m_g, n_g = draw(st.integers(1, 6)), 1, 1
    else:
        g, m_g, n_g = draw(st.integers(1, 4)), 1, draw(st.integers(2, 3))
    if strategy == 'cl':
        side = st.integers(1, 7)
        square = draw(st.booleans())
        kh = draw(side)
        kw = kh if square else draw(side)
    else:
        odd = st.sampled_from([1, 3, 5, 7])
        kh, kw = draw(odd), draw(odd)
        if max(kh, kw) < 5:
            kh = 5 if draw(st.booleans()) else 7
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding_mode = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
    padding_kind = draw(st.sampled_from(['int', 'tuple', 'string']))
    if padding_kind == 'string':
        padding = draw(st.sampled_from(['same', 'valid']))
        if padding == 'same':
            stride = 1  # torch allows 'same' with stride 1 only
        pad_h = pad_w = (dilation * (max(kh, kw) - 1) + 1) // 2 + 1 if padding == 'same' else 0
    elif padding_kind == 'tuple':
        pad_h, pad_w = draw(st.integers(0, kh)), draw(st.integers(0, kw))
        padding = (pad_h, pad_w)
    else:
        pad_h = pad_w = padding = draw(st.integers(0, max(kh, kw)))
    # Input big enough for the kernel after padding, and for reflect/circular
    # padding (pad < size); odd sizes included.
    min_h = max(1, dilation * (kh - 1) + 1 - 2 * (pad_h if padding != 'same' else 0),
                pad_h + 1)
    min_w = max(1, dilation * (kw - 1) + 1 - 2 * (pad_w if padding != 'same' else 0),
                pad_w + 1)
    h = draw(st.integers(min_h, min_h + 6))
    w = draw(st.integers(min_w, min_w + 6))
    ratio = draw(st.integers(ratio_min, 4))
    return ConvCase(
        conv_kwargs=dict(in_channels=g * m_g, out_channels=g * n_g, kernel_size=(kh, kw),
                         stride=stride, padding=padding, dilation=dilation, groups=g,
                         bias=draw(st.booleans()), padding_mode=padding_mode),
        strategy=strategy, ratio=ratio, input_shape=(2, g * m_g, h, w),
        seed=draw(st.integers(0, 2**16)))


def assert_same_hyper_parameters(contracted: nn.Conv2d, conv: nn.Conv2d) -> None:
    assert type(contracted) is nn.Conv2d
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                 'dilation', 'groups', 'padding_mode'):
        assert getattr(contracted, attr) == getattr(conv, attr), attr
    assert (contracted.bias is None) == (conv.bias is None)
    assert contracted.weight.dtype == conv.weight.dtype
    assert contracted.weight.device == conv.weight.device
    assert contracted.state_dict().keys() == conv.state_dict().keys()


# ------------------------------------------------------------------ exactness


@PROPERTY
@given(conv_cases())
def test_conv_explicit_online_contracted_agree_float32(case):
    conv = case.conv()
    layer = case.expanded(mode='explicit')
    x = case.input()
    y_explicit = layer(x)
    contracted = layer.contract()
    assert_same_hyper_parameters(contracted, conv)
    y_contracted = contracted(x)
    assert y_contracted.shape == conv(x).shape
    assert rel_err(y_contracted, y_explicit) <= 1e-5
    y_online = layer.set_mode('online')(x)
    assert rel_err(y_online, y_contracted) <= 1e-5


@PROPERTY
@given(conv_cases())
def test_conv_explicit_online_contracted_agree_float64(case):
    layer = case.expanded(F64, mode='explicit')
    x = case.input(F64)
    y_explicit = layer(x)
    contracted = layer.contract()
    assert contracted.weight.dtype == F64
    assert rel_err(contracted(x), y_explicit) <= 1e-10
    assert rel_err(layer.set_mode('online')(x), y_explicit) <= 1e-10


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_cases())
def test_conv_online_and_explicit_give_the_same_loss_and_gradients(case):
    layer = case.expanded()
    x = case.input()
    results = {}
    for mode in ('explicit', 'online'):
        layer.set_mode(mode)
        layer.zero_grad()
        y = layer(x)
        target = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        loss = ((y - target) ** 2).mean()
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    (l_e, g_e), (l_o, g_o) = results['explicit'], results['online']
    assert rel_err(l_o, l_e) <= 1e-4
    assert g_e.keys() == g_o.keys() and g_e
    for name in g_e:
        assert rel_err(g_o[name], g_e[name]) <= 1e-4, name


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_cases(ratio_min=1), st.booleans())
def test_keep_weights_reproduces_the_compact_conv(case, double):
    dtype = F64 if double else torch.float32
    tol = 1e-10 if double else 1e-5
    conv = case.conv(dtype)
    if case.strategy == 'ck':
        g = conv.groups
        case.ratio = max(case.ratio, ck_exact_min_ratio(
            conv.in_channels // g, conv.out_channels // g, ck_kernel_sizes(conv.kernel_size)))
    x = case.input(dtype)
    y = conv(x)
    layer = ExpandConv2d.from_conv(conv, strategy=case.strategy, ratio=case.ratio,
                                   keep_weights=True, name='backbone.stem')
    assert rel_err(layer.set_mode('online')(x), y) <= tol
    assert rel_err(layer.set_mode('explicit')(x), y) <= tol
    contracted = layer.contract()
    assert rel_err(contracted.weight, conv.weight) <= tol
    if conv.bias is not None:
        assert rel_err(contracted.bias, conv.bias) <= tol
        for c in layer.convs[:-1]:
            assert torch.count_nonzero(c.bias) == 0
    assert_same_hyper_parameters(contracted, conv)


def test_keep_weights_ck_too_small_ratio_names_the_layer():
    conv = nn.Conv2d(4, 4, 7, padding=3)
    with pytest.raises(ValueError, match=r"head\.conv7.*ratio >= 9.*strategy='cl'"):
        ExpandConv2d.from_conv(conv, strategy='ck', ratio=4, keep_weights=True,
                               name='head.conv7')
    with pytest.raises(ValueError, match=r'ratio >= 4'):
        ExpandConv2d.from_conv(nn.Conv2d(2, 2, 5), strategy='ck', ratio=3, keep_weights=True)


def test_keep_weights_cl_uses_orthonormal_outer_factors():
    conv = nn.Conv2d(6, 4, 3, groups=2)
    layer = ExpandConv2d.from_conv(conv, ratio=3, keep_weights=True,
                                   generator=torch.Generator().manual_seed(0))
    a = layer.convs[0].weight.detach().double().reshape(2, 9, 3)
    c = layer.convs[2].weight.detach().double().reshape(2, 2, 6)
    assert (a.transpose(1, 2) @ a - torch.eye(3, dtype=F64)).abs().max() <= 1e-6
    assert (c @ c.transpose(1, 2) - torch.eye(2, dtype=F64)).abs().max() <= 1e-6


# ------------------------------------------------------------------ structure


def test_cl_chain_structure_follows_the_exactness_rules():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=2, groups=4, bias=False,
                     padding_mode='reflect')
    layer = ExpandConv2d.from_conv(conv, strategy='cl', ratio=3)
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.dilation)
              for c in layer.convs]
    assert shapes == [(8, 24, (1, 1), (1, 1), (1, 1)),
                      (24, 36, (3, 3), (2, 2), (2, 2)),
                      (36, 12, (1, 1), (1, 1), (1, 1))]
    assert all(c.padding == (0, 0) and c.groups == 4 and c.bias is None for c in layer.convs)
    assert list(layer.state_dict()) == ['convs.0.weight', 'convs.1.weight', 'convs.2.weight']
    for attr in ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding',
                 'dilation', 'groups', 'padding_mode'):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.bias is None
    assert layer.weight.shape == conv.weight.shape
    assert isinstance(layer, ExpandedLayer)
    assert layer.num_params_compact() == conv.weight.numel()
    assert layer.num_params_expanded() == 24 * 2 + 36 * 6 * 9 + 12 * 9


@pytest.mark.parametrize('kernel,sizes,widths', [
    (5, [(3, 3), (3, 3)], [4, 8, 6]),
    (7, [(3, 3)] * 3, [4, 8, 12, 6]),
    ((3, 7), [(1, 3), (1, 3), (3, 3)], [4, 8, 12, 6]),
])
def test_ck_chain_structure(kernel, sizes, widths):
    conv = nn.Conv2d(4, 6, kernel, stride=2, dilation=2, groups=2)
    layer = ExpandConv2d.from_conv(conv, strategy='ck', ratio=2)
    assert [c.kernel_size for c in layer.convs] == sizes
    assert [layer.convs[0].in_channels] + [c.out_channels for c in layer.convs] == widths
    assert [c.stride for c in layer.convs] == [(1, 1)] * (len(sizes) - 1) + [(2, 2)]
    assert all(c.dilation == (2, 2) and c.padding == (0, 0) and c.groups == 2
               and c.bias is not None for c in layer.convs)


def test_fresh_init_is_standalone_conv_init():
    torch.manual_seed(3)
    layer = ExpandConv2d(4, 6, 3, groups=2, strategy='cl', ratio=2)
    torch.manual_seed(3)
    ref = [nn.Conv2d(4, 8, 1, groups=2), nn.Conv2d(8, 12, 3, groups=2),
           nn.Conv2d(12, 6, 1, groups=2)]
    for c, r in zip(layer.convs, ref):
        assert torch.equal(c.weight, r.weight) and torch.equal(c.bias, r.bias)


def _condition_number(weight):
    singular = torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1))
    return float(singular.max() / singular.min())


@pytest.mark.parametrize('in_channels, out_channels', [(3, 16), (16, 16), (16, 32), (64, 64)])
def test_orthogonalised_r2_chain_composes_a_well_conditioned_kernel(in_channels, out_channels):
    # Near-square random factors (r = 2) compose to kernels with near-zero singular
    # values (condition numbers 5-20 here, 3-6 at r = 4); orthogonalised ones do not.
    torch.manual_seed(0)
    layer = ExpandConv2d(in_channels, out_channels, 3, ratio=2)
    fresh_condition, fresh_norm = _condition_number(layer.weight), float(layer.weight.norm())
    layer.orthogonalise_factors(generator=torch.Generator().manual_seed(0))
    assert _condition_number(layer.weight) < min(4.0, fresh_condition / 1.4)
    assert 0.8 < float(layer.weight.norm()) / fresh_norm < 1.25
    x = torch.randn(2, in_channels, 8, 8)
    torch.testing.assert_close(layer(x), layer.contract()(x), rtol=1e-4, atol=1e-5)


def test_from_conv_keeps_dtype_device_and_training_state():
    conv = nn.Conv2d(3, 4, 3).double().eval()
    layer = ExpandConv2d.from_conv(conv)
    assert all(p.dtype == F64 for p in layer.parameters())
    assert not layer.training and not layer.contract().training
    assert 'strategy=cl, ratio=4, mode=online, compact=(4, 3, 3, 3)' in repr(layer)


def test_weight_property_is_differentiable_and_matches_contract():
    layer = ExpandConv2d(3, 5, 5, strategy='ck', ratio=2)
    w, b = layer.weight, layer.bias
    assert w.requires_grad and w.grad_fn is not None
    contracted = layer.contract()
    assert rel_err(w.detach(), contracted.weight) <= 1e-5
    assert rel_err(b.detach(), contracted.bias) <= 1e-5
    (w ** 2).sum().backward()  # e.g. weight decay on the product
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in
               (c.weight for c in layer.convs))


def test_deepcopy_and_pickle_give_the_same_function():
    layer = ExpandConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        y = layer(x)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._cache is None
        with torch.no_grad():
            assert rel_err(other(x), y) <= 1e-6


# ------------------------------------------------------------------ cache


def test_eval_cache_is_reused_and_invalidated_by_in_place_updates():
    torch.manual_seed(0)
    layer = ExpandConv2d(4, 4, 3, padding=1, strategy='cl', ratio=2)
    x = torch.randn(2, 4, 8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).square().mean().backward()
    assert layer._cache is None  # never cached in training
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        assert layer.weight is layer.weight  # cached
        opt.step()  # in-place update while in eval mode
        y1 = layer(x)
        y_ref = layer.contract()(x)
        assert rel_err(y1, y_ref) <= 1e-5
        assert (y1 - y0).abs().max() > 1e-3
        layer.convs[1].weight.mul_(2.0)
        assert rel_err(layer(x), layer.contract()(x)) <= 1e-5
        layer.convs[2].bias.data = layer.convs[2].bias.data + 1.0  # new storage
        assert rel_err(layer(x), layer.contract()(x)) <= 1e-5
        layer.load_state_dict({k: v * 0.5 for k, v in layer.state_dict().items()})
        assert rel_err(layer(x), layer.contract()(x)) <= 1e-5
        layer.double()
        assert layer(x.double()).dtype == F64


def test_eval_with_grad_enabled_does_not_cache_a_graph():
    layer = ExpandConv2d(2, 2, 3, padding=1).eval()
    x = torch.randn(1, 2, 5, 5)
    for _ in range(2):  # a cached graph would fail on the second backward
        layer(x).sum().backward()
    assert layer._cache is None


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize('kernel', [3, 4, (5, 4), (3, 1), 1, 2])
def test_ck_on_a_small_or_even_kernel_raises_naming_the_layer(kernel):
    with pytest.raises(ValueError, match=r"backbone\.layer2\.conv.*strategy='cl'"):
        ExpandConv2d.from_conv(nn.Conv2d(2, 2, kernel), strategy='ck',
                               name='backbone.layer2.conv')


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match='strategy'):
        ExpandConv2d(2, 2, 3, strategy='xx')
    with pytest.raises(ConfigError, match='ratio'):
        ExpandConv2d(2, 2, 3, ratio=0)
    with pytest.raises(ConfigError, match=r"ExpandLinear 'head.fc': ratio=True must be an "
                                          r'integer >= 1'):
        ExpandLinear(2, 2, ratio=True, name='head.fc')
    with pytest.raises(ConfigError, match='groups'):
        ExpandConv2d(3, 2, 3, groups=2)
    with pytest.raises(ConfigError, match='mode'):
        ExpandConv2d(2, 2, 3).set_mode('fast')
    with pytest.raises(TypeError):
        ExpandConv2d.from_conv(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match='shape'):
        ExpandConv2d(2, 2, 3).set_compact(torch.randn(2, 2, 5, 5))
    with pytest.raises(ConfigError, match='bias'):
        ExpandConv2d(2, 2, 3, bias=False).set_compact(torch.randn(2, 2, 3, 3),
                                                        torch.randn(2))


def test_nonlinearity_runs_between_sub_layers_in_explicit_mode_only():
    torch.manual_seed(0)
    layer = ExpandConv2d(3, 4, 3, padding=1, mode='explicit', name='head.cls')
    x = torch.randn(2, 3, 6, 6)
    y_linear = layer(x)
    with pytest.raises(RuntimeError, match='explicit'):
        ExpandConv2d(3, 4, 3).set_nonlinearity(nn.ReLU())
    layer.set_nonlinearity(nn.ReLU())
    y = layer(x)
    manual = F.pad(x, (1, 1, 1, 1))
    manual = layer.convs[2](F.relu(layer.convs[1](F.relu(layer.convs[0](manual)))))
    assert rel_err(y, manual) <= 1e-6
    assert (y - y_linear).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match=r"head\.cls.*nonlinearity"):
        layer.contract()
    with pytest.raises(RuntimeError, match='nonlinearity'):
        layer.set_mode('online')
    with pytest.raises(RuntimeError, match='nonlinearity'):
        layer.weight
    layer.set_nonlinearity(None)
    assert rel_err(layer.contract()(x), y_linear) <= 1e-5


# ------------------------------------------------------------------ linear


@st.composite
def linear_cases(draw):
    return dict(m=draw(st.integers(1, 8)), n=draw(st.integers(1, 8)),
                bias=draw(st.booleans()), ratio=draw(st.integers(1, 4)),
                lead=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))),
                seed=draw(st.integers(0, 2**16)))


def _linear(case, dtype=torch.float32):
    torch.manual_seed(case['seed'])
    lin = nn.Linear(case['m'], case['n'], bias=case['bias']).to(dtype)
    layer = ExpandLinear.from_linear(lin, ratio=case['ratio'], mode='explicit', name='fc')
    with torch.no_grad():
        for sub in layer.linears:
            if sub.bias is not None:
                sub.bias.normal_()
    x = torch.randn(*case['lead'], case['m'], dtype=dtype)
    return lin, layer, x


@PROPERTY
@given(linear_cases(), st.booleans())
def test_linear_explicit_online_contracted_agree(case, double):
    dtype, tol = (F64, 1e-10) if double else (torch.float32, 1e-5)
    lin, layer, x = _linear(case, dtype)
    y = layer(x)
    contracted = layer.contract()
    assert type(contracted) is nn.Linear
    assert (contracted.in_features, contracted.out_features) == (case['m'], case['n'])
    assert (contracted.bias is None) == (not case['bias'])
    assert contracted.state_dict().keys() == lin.state_dict().keys()
    assert contracted.weight.dtype == dtype
    # Rounding is relative to the size of the summed terms, not of their sum: with one
    # output and cancelling terms, |y| alone can be far smaller than the rounding.
    # The chain's own rounding grows with |x| |W1| |W2| |W3|, which factors that
    # cancel in the product make far larger than |x| |W| (seen: 1e-5 relative).
    with torch.no_grad():
        terms = float((x.abs() @ contracted.weight.abs().t()).max())
        chain = x.abs()
        for sub in layer.linears:
            chain = chain @ sub.weight.abs().t() + (0 if sub.bias is None else sub.bias.abs())
        scale = max(float(y.abs().max()), terms, float(chain.max()))
        assert float((contracted(x) - y).abs().max()) <= tol * scale
        assert float((layer.set_mode('online')(x) - y).abs().max()) <= tol * scale


@PROPERTY
@given(linear_cases())
def test_linear_online_and_explicit_gradients_agree(case):
    _, layer, x = _linear(case)
    grads = {}
    for mode in ('explicit', 'online'):
        layer.set_mode(mode).zero_grad()
        (layer(x).sin().sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for name in grads['explicit']:
        assert rel_err(grads['online'][name], grads['explicit'][name]) <= 1e-4, name


@PROPERTY
@given(linear_cases())
def test_linear_keep_weights_is_exact(case):
    lin, _, x = _linear(case, F64)
    layer = ExpandLinear.from_linear(lin, ratio=case['ratio'], keep_weights=True)
    y = lin(x)
    assert rel_err(layer(x), y) <= 1e-10
    assert rel_err(layer.set_mode('explicit')(x), y) <= 1e-10
    contracted = layer.contract()
    assert rel_err(contracted.weight, lin.weight) <= 1e-10
    if case['bias']:
        assert rel_err(contracted.bias, lin.bias) <= 1e-10


def test_linear_structure_cache_and_errors():
    lin = nn.Linear(3, 5, bias=False)
    layer = ExpandLinear.from_linear(lin, ratio=2, name='head.fc')
    assert isinstance(layer, ExpandedLayer) and layer.strategy == 'fc'
    assert [(s.in_features, s.out_features) for s in layer.linears] == [(3, 6), (6, 10),
                                                                         (10, 5)]
    assert list(layer.state_dict()) == ['linears.0.weight', 'linears.1.weight',
                                        'linears.2.weight']
    assert layer.bias is None and layer.weight.shape == (5, 3)
    assert layer.num_params_compact() == 15 and layer.num_params_expanded() == 18 + 60 + 50
    layer.eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        y0 = layer(x)
        layer.linears[0].weight.add_(1.0)
        assert rel_err(layer(x), layer.contract()(x)) <= 1e-5
        assert (layer(x) - y0).abs().max() > 1e-3
    layer.set_mode('explicit').set_nonlinearity(nn.Tanh())
    with pytest.raises(RuntimeError, match=r"head\.fc"):
        layer.contract()
    with pytest.raises(TypeError):
        ExpandLinear.from_linear(nn.Conv2d(2, 2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_layers_stay_on_device_and_agree():
    conv = nn.Conv2d(4, 8, 5, padding=2, groups=2).cuda()
    x = torch.randn(2, 4, 9, 9, device='cuda')
    for strategy in ('cl', 'ck'):
        layer = ExpandConv2d.from_conv(conv, strategy=strategy, keep_weights=True)
        assert all(p.is_cuda for p in layer.parameters())
        contracted = layer.contract()
        assert contracted.weight.is_cuda
        assert rel_err(layer(x), conv(x)) <= 1e-4  # TF32 may be on
        assert rel_err(contracted.weight, conv.weight) <= 1e-5


def test_online_mode_under_autocast_tracks_float32():
    """AMP (autocast) composes and convolves in low precision; stay close to fp32."""
    torch.manual_seed(0)
    layer = ExpandConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), ratio=4)
    x = torch.randn(2, 8, 12, 12)
    reference = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05,
                               atol=0.02 * float(reference.abs().max()))
    out.float().square().mean().backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


@pytest.mark.parametrize('strategy,kernel,groups', [('cl', 3, 1), ('cl', 3, 4), ('ck', 5, 1),
                                                    ('ck', 7, 2)])
def test_composed_kernel_keeps_the_compact_memory_format(strategy, kernel, groups):
    """Online mode must not switch the net's activation layout behind the user's back."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, padding=kernel // 2, groups=groups)
    layer = ExpandConv2d.from_conv(conv, strategy=strategy, ratio=4)
    x = torch.randn(2, 8, 12, 12)
    assert layer.weight.is_contiguous() and layer(x).is_contiguous()
    layer = layer.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer(x_cl).is_contiguous(memory_format=torch.channels_last)
    contracted = layer.contract()
    assert contracted.weight.is_contiguous(memory_format=torch.channels_last)
    assert not contracted.weight.is_contiguous()
    assert layer.set_mode('online').contract().weight.is_contiguous(
        memory_format=torch.channels_last)
    assert ExpandConv2d.from_conv(conv, strategy=strategy, ratio=4).contract() \
        .weight.is_contiguous()


@pytest.mark.parametrize('conv_kwargs', [
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # [C, 1, k, k]
    dict(in_channels=1, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=1),  # [O, I, 1, 1]
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1)])
def test_kernels_whose_shape_fits_both_layouts_keep_the_compact_convs_layout(conv_kwargs):
    """A depthwise, 1-input-channel or 1x1 kernel passes both is_contiguous tests; the
    conv follows its actual strides, so online and contracted must have the compact ones."""
    torch.manual_seed(0)
    x = torch.randn(2, conv_kwargs['in_channels'], 6, 6)
    for layout in (torch.channels_last, torch.contiguous_format):
        conv = nn.Conv2d(**conv_kwargs).to(memory_format=layout)
        layer = ExpandConv2d.from_conv(conv, strategy='cl', ratio=2).to(memory_format=layout)
        compact_out = conv(x).is_contiguous(memory_format=torch.channels_last)
        assert compact_out == (layout == torch.channels_last)
        for module in (layer, layer.contract()):
            assert module.weight.stride() == conv.weight.stride()
            assert module(x).is_contiguous(memory_format=torch.channels_last) == compact_out


def test_a_non_strict_load_without_bias_keeps_the_composed_bias_as_a_conv_keeps_its_own():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = ExpandConv2d.from_conv(conv, strategy='cl', ratio=2)
    with torch.no_grad():
        for sub in layer.convs:
            sub.bias.normal_()
    bias_before = layer.bias.detach().clone()
    new_weight = torch.randn_like(conv.weight)
    result = layer.load_state_dict({'weight': new_weight}, strict=False)
    assert result.missing_keys == ['bias']
    torch.testing.assert_close(layer.weight, new_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias, bias_before, rtol=1e-5, atol=1e-6)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain_bias = plain.bias.detach().clone()
    plain.load_state_dict({'weight': new_weight}, strict=False)
    assert torch.equal(plain.bias, plain_bias)  # what the chain imitates


@pytest.mark.parametrize('strategy,kernel,groups', [('cl', 3, 1), ('cl', 3, 4), ('ck', 5, 1)])
def test_composition_macs_is_what_an_online_forward_adds(strategy, kernel, groups):
    """composition_macs() = MACs of a no-grad online forward minus the compact conv's."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(module, x):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        return counter.get_total_flops() // 2

    conv = nn.Conv2d(8, 16, kernel, padding=kernel // 2, groups=groups)
    layer = ExpandConv2d.from_conv(conv, strategy=strategy, ratio=4)
    x = torch.randn(2, 8, 10, 10)
    compose = layer.composition_macs()
    assert compose > 0
    assert compose == counted(layer, x) - counted(layer.contract(), x)
    assert layer.composition_macs() == compose  # remembered
    linear = ExpandLinear.from_linear(nn.Linear(8, 6), ratio=4)
    y = torch.randn(3, 8)
    assert linear.composition_macs() == counted(linear, y) - counted(linear.contract(), y)


# ------------------------------------------------- deferred factor gradients

class _TwoLayerNet(nn.Module):
    """conv1 -> relu -> conv2 (called twice, like a head shared across levels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = ExpandConv2d(4, 8, 3, padding=1, ratio=3)
        self.conv2 = ExpandConv2d(8, 6, 3, padding=1, groups=2, ratio=2)
        self.mid = None

    def forward(self, x):
        self.mid = torch.relu(self.conv1(x))
        return self.conv2(self.mid) + self.conv2(self.mid[:, :, ::2, ::2]).mean()


def _assert_close_at_scale(actual, expected, name=''):
    """Float32 rounding of a different summation order, relative to the gradient's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()), msg=name or None)


def _factor_grads(net, defer, x, passes=1):
    from expand_mm.layers import deferred_factor_grads
    net = copy.deepcopy(net)
    with deferred_factor_grads(net, defer):
        for _ in range(passes):
            net(x).square().mean().backward()
    return {n: p.grad for n, p in net.named_parameters()}, net


def test_deferred_factor_grads_equal_plain_autograd():
    torch.manual_seed(0)
    net, x = _TwoLayerNet(), torch.randn(2, 4, 10, 10)
    plain, _ = _factor_grads(net, False, x)
    deferred, after = _factor_grads(net, True, x)
    assert plain.keys() == deferred.keys() and all(g is not None for g in deferred.values())
    for name in plain:
        if name.startswith('conv1.'):  # used once: the very same operations
            assert torch.equal(plain[name], deferred[name]), name
        else:  # used twice: one composition backward of the summed compact gradient
            _assert_close_at_scale(deferred[name], plain[name], name)
    # Gradient accumulation: two backward passes before a step sum up alike.
    plain2, _ = _factor_grads(net, False, x, passes=2)
    deferred2, _ = _factor_grads(net, True, x, passes=2)
    for name in plain2:
        _assert_close_at_scale(deferred2[name], plain2[name], name)
    assert all(layer._deferred is None for layer in (after.conv1, after.conv2))


def test_deferred_factor_grads_wait_for_the_end_of_backward(monkeypatch):
    """The factors get no gradient while earlier activations still wait for theirs."""
    torch.manual_seed(0)
    from expand_mm.layers import deferred_factor_grads
    for defer in (False, True):
        net, x = _TwoLayerNet(), torch.randn(2, 4, 10, 10)
        seen = {}
        composed = []
        monkeypatch.setattr(net.conv2, '_compose',
                            lambda dtype, f=net.conv2._compose: composed.append(1) or f(dtype))
        with deferred_factor_grads(net, defer):
            out = net(x)
            net.mid.register_hook(lambda g: seen.update(
                conv2_grad_during_backward=net.conv2.convs[1].weight.grad is not None))
            out.sum().backward()
        assert seen['conv2_grad_during_backward'] is (not defer)
        assert net.conv2.convs[1].weight.grad is not None
        # the conv called twice in one forward composes once when deferring
        assert len(composed) == (1 if defer else 2)


def test_deferred_mode_survives_a_retained_graph_and_is_off_by_default():
    torch.manual_seed(0)
    from expand_mm.layers import deferred_factor_grads
    net, x = _TwoLayerNet(), torch.randn(2, 4, 10, 10)
    assert not net.conv1.defer_factor_grads
    plain, _ = _factor_grads(net, False, x, passes=2)
    with deferred_factor_grads(net):
        loss = net(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    for name, p in net.named_parameters():
        _assert_close_at_scale(p.grad, plain[name], name)
    assert not net.conv1.defer_factor_grads  # restored on exit
    # plain autograd.grad on the factors keeps working outside the block
    grads = torch.autograd.grad(net(x).sum(), list(net.conv1.parameters()))
    assert all(g is not None for g in grads)


def test_a_torch_without_the_deferral_hooks_falls_back_to_plain_autograd(monkeypatch):
    """Deferral rests on torch._C._current_graph_task_id (private API): where it is
    missing the block warns, naming it, and the layers train with plain autograd."""
    import expand_mm.layers.deferred_grads as deferred_grads
    from expand_mm.layers import deferred_factor_grads
    torch.manual_seed(0)
    net, x = _TwoLayerNet(), torch.randn(2, 4, 10, 10)
    plain, _ = _factor_grads(net, False, x)
    assert deferred_grads.deferral_unsupported_reason() is None  # this torch has both
    monkeypatch.delattr(torch._C, '_current_graph_task_id')
    assert '_current_graph_task_id' in deferred_grads.deferral_unsupported_reason()
    with pytest.warns(RuntimeWarning, match='_current_graph_task_id.*plain autograd'):
        with deferred_factor_grads(net) as switched:
            assert switched == 2 and not net.conv1.defer_factor_grads
            net(x).square().mean().backward()
    for name, p in net.named_parameters():
        assert torch.equal(p.grad, plain[name]), name


def test_the_deferral_engine_stays_importable_from_the_layer_base_and_surgery():
    """Modules and users import these names from expand_mm.layers.base and
    expand_mm.surgery; they are the engine's own objects."""
    import expand_mm.layers.base as base
    import expand_mm.layers.deferral as deferral
    import expand_mm.layers.deferred_grads as deferred_grads
    import expand_mm.surgery as surgery
    for name in ('deferral_unsupported_reason', 'discard_deferred_factor_grads',
                 'flush_deferred_factor_grads_first', '_DEFERRED_GRADS'):
        assert getattr(base, name) is getattr(deferred_grads, name), name
    for name in ('deferral_unsupported_reason', 'discard_deferred_factor_grads'):
        assert getattr(surgery, name) is getattr(deferred_grads, name), name
    assert surgery.deferred_factor_grads is deferral.deferred_factor_grads
    with pytest.raises(AttributeError, match='no_such_name'):
        base.no_such_name


def test_a_failed_backward_does_not_stop_later_deferred_factor_grads():
    """A backward pass that raises half-way (a hook, an out-of-memory error the
    caller survives) leaves its compositions unflushed; the next passes must
    still flush theirs, and leaving the block drops the stale ones."""
    torch.manual_seed(0)
    from expand_mm.layers.deferred_grads import _DEFERRED_GRADS
    from expand_mm.layers import deferred_factor_grads
    net, x = _TwoLayerNet(), torch.randn(2, 4, 10, 10)
    plain, _ = _factor_grads(net, False, x)

    def fail(grad):
        raise RuntimeError('backward failed')

    with deferred_factor_grads(net):
        out = net(x)
        net.mid.register_hook(fail)  # after conv2's leaf got its gradient
        with pytest.raises(RuntimeError, match='backward failed'):
            out.square().mean().backward()
        stale = len(_DEFERRED_GRADS._pending)
        assert stale > 0
        net.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            _assert_close_at_scale(p.grad, plain[name], name)
        assert len(_DEFERRED_GRADS._pending) == stale  # only the failed pass's
    assert not _DEFERRED_GRADS._pending
    # Leaving the block right after a failed pass frees its leaves and graphs.
    with deferred_factor_grads(net):
        out = net(x)
        net.mid.register_hook(fail)
        with pytest.raises(RuntimeError, match='backward failed'):
            out.square().mean().backward()
        assert net.conv2._deferred is not None
    assert not _DEFERRED_GRADS._pending and net.conv2._deferred is None


def test_online_composition_saves_no_copy_of_the_big_factor():
    """What autograd keeps from the composition is far below the k x k factor's size.

    A batched GEMM over the middle axis of the r-wide k x k factor needs a permuted
    copy of it; plain einsum saves that copy for backward (per layer, from the
    forward pass to the backward pass).
    """
    layer = ExpandConv2d(32, 64, 3, padding=1, ratio=4)
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.composed()
    big = layer.convs[1].weight.numel()
    assert sum(saved) < 0.5 * big, (sum(saved), big)


@pytest.mark.parametrize('kernel,bias', [(3, False), (3, True), (1, True)])
def test_second_order_gradients_of_online_equal_explicit(kernel, bias):
    """A gradient penalty differentiates the factor gradients: online == explicit."""
    torch.manual_seed(0)
    layer = ExpandConv2d(4, 4, kernel, padding=kernel // 2, bias=bias, ratio=2,
                         dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    params = list(layer.parameters())

    def second_order(mode):
        layer.set_mode(mode)
        grads = torch.autograd.grad(layer(x).square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    for online, explicit in zip(second_order('online'), second_order('explicit')):
        torch.testing.assert_close(online, explicit, rtol=1e-10, atol=1e-12)


def test_deferral_under_non_reentrant_activation_checkpointing():
    """The recomputation finds the composed leaves cached: it must save what the first
    forward saved (torch checks the counts), and the gradients stay plain autograd's."""
    import torch.utils.checkpoint as checkpoint
    from expand_mm.layers import deferred_factor_grads
    from expand_mm.surgery import expand_model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, groups=2))
    expand_model(net)
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 7, 7)
    with deferred_factor_grads(net):
        checkpoint.checkpoint(net, x, use_reentrant=False).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('strategy', ['cl', 'ck'])
def test_set_composed_bias_changes_the_bias_only(strategy):
    """The contracted bias becomes the one given, the contracted kernel stays; a layer
    without a bias refuses one, naming itself."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 5, padding=2)
    layer = ExpandConv2d.from_conv(conv, strategy=strategy, ratio=4)
    for sub in layer.sublayers:  # non-zero inner biases, which the new bias must account for
        if sub.bias is not None:
            nn.init.uniform_(sub.bias)
    before = layer.contract()
    bias = torch.arange(6.0)
    layer.set_composed_bias(bias)
    after = layer.contract()
    torch.testing.assert_close(after.bias, bias)
    torch.testing.assert_close(after.weight, before.weight)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(layer(x), after(x), rtol=1e-4, atol=1e-4)
    no_bias = ExpandConv2d.from_conv(nn.Conv2d(4, 6, 5, bias=False), strategy=strategy, ratio=4)
    with pytest.raises(ValueError, match=r'got a bias but the layer has none \(bias=False\)'):
        no_bias.set_composed_bias(bias)
