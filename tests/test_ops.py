"""Tests of the pure tensor maths in expand_mm.ops (float64 unless stated)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from expand_mm.ops import (chain_order, ck_anchors, ck_channels, ck_depth, ck_exact_min_ratio,
                           ck_kernel_sizes, cl_channels, compose_conv_chain,
                           compose_conv_kernels, compose_linear_chain, factorize_ck,
                           factorize_cl, factorize_linear, orthogonal_like, padding_amounts,
                           propagate_conv_bias, propagate_linear_bias, random_orthonormal)

F64 = torch.float64
FAST = settings(max_examples=40, deadline=None, derandomize=True)  # same examples in CI


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def naive_compose(first: torch.Tensor, second: torch.Tensor, groups: int) -> torch.Tensor:
    """Loop-by-loop ``K[n, c, u + v] += second[n, m, v] * first[m, c, u]`` per group."""
    mid, in_g, ah, aw = first.shape
    out, mid_g, bh, bw = second.shape
    out_g = out // groups
    k = torch.zeros(out, in_g, ah + bh - 1, aw + bw - 1, dtype=first.dtype)
    for n in range(out):
        g = n // out_g
        for ml in range(mid_g):
            m = g * mid_g + ml
            for uh in range(ah):
                for uw in range(aw):
                    for vh in range(bh):
                        for vw in range(bw):
                            k[n, :, uh + vh, uw + vw] += (second[n, ml, vh, vw] *
                                                          first[m, :, uh, uw])
    return k


@st.composite
def grouped_pair(draw):
    g = draw(st.integers(1, 3))
    c, m, n = (g * draw(st.integers(1, 3)) for _ in range(3))
    a = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    b = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(m, c // g, *a, generator=gen, dtype=F64)
    second = torch.randn(n, m // g, *b, generator=gen, dtype=F64)
    return first, second, g


@FAST
@given(grouped_pair())
def test_compose_pair_matches_naive_loops(case):
    first, second, g = case
    got = compose_conv_kernels(first, second, g)
    want = naive_compose(first, second, g)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-12


@FAST
@given(grouped_pair(), st.integers(1, 2), st.integers(1, 3))
def test_compose_pair_matches_running_the_chain(case, dilation, stride):
    first, second, g = case
    x = torch.randn(2, first.shape[1] * g, 12, 11, dtype=F64)
    d1 = 1 if first.shape[-2:] == (1, 1) else dilation
    y = F.conv2d(F.conv2d(x, first, groups=g, dilation=d1), second, groups=g,
                 dilation=dilation, stride=stride)
    k = compose_conv_kernels(first, second, g)
    y2 = F.conv2d(x, k, groups=g, dilation=dilation, stride=stride)
    assert rel_err(y2, y) <= 1e-12


def test_compose_rejects_mismatched_groups():
    with pytest.raises(ValueError, match='groups'):
        compose_conv_kernels(torch.randn(4, 2, 3, 3), torch.randn(6, 3, 3, 3), groups=2)


@FAST
@given(st.integers(1, 3), st.integers(2, 4), st.integers(0, 2**16))
def test_chain_orders_agree_and_bias_propagates(g, n_layers, seed):
    gen = torch.Generator().manual_seed(seed)
    widths = [g * int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(n_layers + 1)]
    kernels, biases = [], []
    for i in range(n_layers):
        kh, kw = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
        kernels.append(torch.randn(widths[i + 1], widths[i] // g, kh, kw, generator=gen,
                                   dtype=F64))
        # Drop some biases, including the last one: earlier ones must still arrive.
        has = i < n_layers - 1 and bool(torch.rand(1, generator=gen) < 0.7)
        biases.append(torch.randn(widths[i + 1], generator=gen, dtype=F64) if has else None)
    k1 = compose_conv_chain(kernels, g, order='cheapest')
    k2 = compose_conv_chain(kernels, g, order='sequential')
    assert rel_err(k1, k2) <= 1e-12
    x = torch.randn(1, widths[0], 14, 13, dtype=F64)
    y = x
    for k, b in zip(kernels, biases):
        y = F.conv2d(y, k, b, groups=g)
    b = propagate_conv_bias(kernels, biases, g)
    if all(b_ is None for b_ in biases):
        assert b is None
    y2 = F.conv2d(x, k1, b, groups=g)
    assert rel_err(y2, y) <= 1e-12


def test_bias_of_an_earlier_layer_survives_a_bias_free_last_layer():
    k1 = torch.randn(4, 2, 3, 3, dtype=F64)
    k2 = torch.randn(3, 4, 1, 1, dtype=F64)
    b1 = torch.randn(4, dtype=F64)
    b = propagate_conv_bias([k1, k2], [b1, None])
    assert b is not None
    assert rel_err(b, k2[:, :, 0, 0] @ b1) <= 1e-14


def test_chain_order_picks_the_cheaper_cl_order():
    # CL chain m -> r*m -> r*n -> n: (C B) A costs r n m k^2 (r n + m),
    # C (B A) costs r n m k^2 (r m + n).
    sizes = [(1, 1), (3, 3), (1, 1)]
    tree, cost = chain_order([2, 8, 400, 100], sizes)
    assert tree == ((0, 1), 2)
    assert cost == 400 * 8 * 2 * 9 + 100 * 400 * 2 * 9  # B A, then C (B A)
    tree, _ = chain_order([100, 400, 8, 2], sizes)
    assert tree == (0, (1, 2))
    # Groups divide the cost: a depthwise chain is cheap either way.
    _, cost_dw = chain_order([64, 256, 256, 64], sizes, groups=64)
    _, cost_dense = chain_order([64, 256, 256, 64], sizes, groups=1)
    assert cost_dw * 64 * 64 == cost_dense


@FAST
@given(st.lists(st.integers(1, 6), min_size=2, max_size=5), st.integers(0, 2**16))
def test_linear_chain_and_bias(widths, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(widths[i + 1], widths[i], generator=gen, dtype=F64)
          for i in range(len(widths) - 1)]
    bs = [torch.randn(w.shape[0], generator=gen, dtype=F64) if i % 2 == 0 else None
          for i, w in enumerate(ws)]
    x = torch.randn(5, widths[0], generator=gen, dtype=F64)
    y = x
    for w, b in zip(ws, bs):
        y = F.linear(y, w, b)
    w_c = compose_linear_chain(ws)
    assert rel_err(w_c, compose_linear_chain(ws, order='sequential')) <= 1e-12
    assert rel_err(F.linear(x, w_c, propagate_linear_bias(ws, bs)), y) <= 1e-12


def test_random_orthonormal_columns():
    q = random_orthonormal(5, 7, 3, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=F64).expand(5, 3, 3)
    assert (q.transpose(1, 2) @ q - eye).abs().max() <= 1e-12
    with pytest.raises(ValueError):
        random_orthonormal(1, 2, 3)


@pytest.mark.parametrize('shape, groups', [((32, 16, 1, 1), 1), ((16, 32, 3, 3), 1),
                                           ((8, 2, 3, 3), 4), ((12, 5), 1)])
def test_orthogonal_like_keeps_shape_and_norm_and_equalises_singular_values(shape, groups):
    kernel = torch.randn(shape, dtype=F64)
    ortho = orthogonal_like(kernel, groups, generator=torch.Generator().manual_seed(0))
    assert ortho.shape == kernel.shape
    assert abs(float(ortho.norm() / kernel.norm()) - 1) <= 1e-12
    per_group = ortho.reshape(groups, shape[0] // groups, -1)
    singular = torch.linalg.svdvals(per_group)
    assert float(singular.max() / singular.min()) <= 1 + 1e-9, singular
    with pytest.raises(ValueError, match='groups=5'):
        orthogonal_like(kernel, 5)
    assert not orthogonal_like(torch.zeros(shape), groups).any()


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 4), st.integers(1, 4))
def test_factorize_cl_is_exact(g, m_g, n_g, ratio, kh, kw):
    w = torch.randn(g * n_g, m_g, kh, kw, dtype=F64)
    a, b, c = factorize_cl(w, g, ratio, generator=torch.Generator().manual_seed(1))
    assert a.shape == (g * ratio * m_g, m_g, 1, 1)
    assert b.shape == (g * ratio * n_g, ratio * m_g, kh, kw)
    assert c.shape == (g * n_g, ratio * n_g, 1, 1)
    assert rel_err(compose_conv_chain([a, b, c], g), w) <= 1e-12
    a_g = a.reshape(g, ratio * m_g, m_g)
    c_g = c.reshape(g, n_g, ratio * n_g)
    assert (a_g.transpose(1, 2) @ a_g - torch.eye(m_g, dtype=F64)).abs().max() <= 1e-12
    assert (c_g @ c_g.transpose(1, 2) - torch.eye(n_g, dtype=F64)).abs().max() <= 1e-12


def test_factorize_linear_is_exact_and_keeps_dtype():
    w = torch.randn(6, 4)
    factors = factorize_linear(w, 3)
    assert [f.shape for f in factors] == [(12, 4), (18, 12), (6, 18)]
    assert all(f.dtype == torch.float32 for f in factors)
    assert rel_err(compose_linear_chain(factors), w) <= 1e-6


@pytest.mark.parametrize('kernel', [5, 7, 9, (3, 5), (5, 3), (1, 5), (3, 7), (5, 9)])
@pytest.mark.parametrize('g,m_g,n_g', [(1, 2, 3), (2, 3, 1), (4, 1, 1), (3, 1, 2)])
def test_factorize_ck_is_exact(kernel, g, m_g, n_g):
    sizes = ck_kernel_sizes(kernel)
    ratio = ck_exact_min_ratio(m_g, n_g, sizes)
    channels = ck_channels(g * m_g, g * n_g, ratio, len(sizes))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(g * n_g, m_g, kh, kw, dtype=F64)
    init = [torch.randn(channels[i + 1], channels[i] // g, *sizes[i], dtype=F64)
            for i in range(len(sizes))]
    factors = factorize_ck(w, g, channels, sizes, init=init)
    assert rel_err(compose_conv_chain(factors, g), w) <= 1e-14
    # A larger ratio leaves free intermediate channels: they keep their init and
    # still contribute nothing to the composition.
    big = ck_channels(g * m_g, g * n_g, ratio + 1, len(sizes))
    init = [torch.randn(big[i + 1], big[i] // g, *sizes[i], dtype=F64)
            for i in range(len(sizes))]
    factors = factorize_ck(w, g, big, sizes, init=init)
    assert rel_err(compose_conv_chain(factors, g), w) <= 1e-14
    used = len(ck_anchors([s[0] for s in sizes])[0]) * len(ck_anchors([s[1] for s in sizes])[0])
    free_rows = factors[0].reshape(g, -1, m_g, *sizes[0])[:, used * m_g:]
    init_rows = init[0].reshape(g, -1, m_g, *sizes[0])[:, used * m_g:]
    assert free_rows.numel() > 0 and torch.equal(free_rows, init_rows)


def test_factorize_ck_needs_enough_channels():
    assert ck_exact_min_ratio(1, 1, ck_kernel_sizes(5)) == 4
    assert ck_exact_min_ratio(1, 1, ck_kernel_sizes(7)) == 9
    assert ck_exact_min_ratio(4, 1, ck_kernel_sizes(7)) == 36
    sizes = ck_kernel_sizes(5)
    with pytest.raises(ValueError, match='intermediate width'):
        factorize_ck(torch.randn(2, 2, 5, 5), 1, ck_channels(2, 2, 3, 2), sizes)


def test_chain_plans():
    assert cl_channels(3, 5, 4) == [3, 12, 20, 5]
    assert ck_channels(3, 5, 4, 2) == [3, 12, 5]
    assert ck_channels(3, 5, 2, 4) == [3, 6, 10, 10, 5]
    assert ck_kernel_sizes(5) == [(3, 3), (3, 3)]
    assert ck_kernel_sizes(7) == [(3, 3)] * 3
    assert ck_kernel_sizes((3, 7)) == [(1, 3), (1, 3), (3, 3)]
    assert ck_kernel_sizes((9, 1)) == [(3, 1)] * 4
    for bad in (3, 4, (5, 4), (1, 3), 1):
        with pytest.raises(ValueError):
            ck_depth(bad)
    assert ck_anchors([3, 3]) == ([0, 2], 5)
    assert ck_anchors([3, 3, 3]) == ([0, 3, 4], 7)


@pytest.mark.filterwarnings('ignore:Using padding=.same.:UserWarning')
@pytest.mark.parametrize('kernel,dilation', [(3, 1), (4, 1), (2, 3), ((4, 5), (2, 1))])
def test_padding_amounts_match_conv2d_same(kernel, dilation):
    conv = torch.nn.Conv2d(2, 3, kernel, padding='same', dilation=dilation).double()
    x = torch.randn(1, 2, 9, 8, dtype=F64)
    pad = padding_amounts('same', conv.kernel_size, conv.dilation)
    y = F.conv2d(F.pad(x, pad), conv.weight, conv.bias, dilation=conv.dilation)
    assert y.shape == conv(x).shape
    assert rel_err(y, conv(x)) <= 1e-14
    assert padding_amounts('valid', 3) == (0, 0, 0, 0)
    assert padding_amounts((1, 2), 3) == (2, 2, 1, 1)
