"""Factorise a compact kernel into an exact chain (the inverse of composing).

Used to expand a layer while keeping its function (``keep_weights=True``, or a
compact checkpoint loaded into an expanded model). All maths runs in float64;
results are cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .plan import ck_anchors


def random_orthonormal(batch: int, rows: int, cols: int, *,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> Tensor:
    """Random matrices with orthonormal columns (``Q^T Q = I``).

    Args:
        batch: Number of matrices (one per group).
        rows: Rows, ``>= cols``.
        cols: Columns.
        generator: Optional RNG, drawn on the CPU.

    Returns:
        ``(batch, rows, cols)``, Haar-distributed.
    """
    if rows < cols:
        raise ValueError(f'orthonormal columns need rows >= cols, got {rows} < {cols}')
    g = torch.randn(batch, rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Sign fix makes the distribution Haar instead of biased by QR's convention.
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d[d == 0] = 1
    return (q * d.unsqueeze(-2)).to(dtype=dtype, device=device)


def orthogonal_like(kernel: Tensor, groups: int = 1, *,
                    generator: torch.Generator | None = None) -> Tensor:
    """A kernel of ``kernel``'s shape and Frobenius norm whose every singular value is equal.

    Per group, the ``(out/g, in/g * kh * kw)`` matrix gets orthonormal rows or
    columns (whichever are fewer), scaled so that the whole kernel keeps
    ``kernel``'s norm: a chain of such factors composes to a kernel whose
    spectrum is that of one random orthogonal projection, whatever the ratio,
    where products of near-square Gaussian factors (small ratios) have many
    near-zero singular values.

    Args:
        kernel: ``(out, in / g, ...)`` (conv) or ``(out, in)`` (linear).
        groups: ``g``.
        generator: Optional RNG, drawn on the CPU.

    Returns:
        The new kernel, in ``kernel``'s dtype and device.
    """
    out = kernel.shape[0]
    if out % groups:
        raise ValueError(f'cannot split {tuple(kernel.shape)} into groups={groups}')
    rows, cols = out // groups, kernel[0].numel()
    tall = random_orthonormal(groups, max(rows, cols), min(rows, cols), generator=generator)
    mats = tall if rows >= cols else tall.transpose(1, 2)
    norm = kernel.detach().to(torch.float64).norm()
    if norm == 0:  # a zero kernel has no norm to keep: it stays zero
        return kernel.detach().clone()
    scaled = mats * (norm / mats.norm())
    return scaled.reshape(kernel.shape).to(dtype=kernel.dtype, device=kernel.device)


def factorize_cl(weight: Tensor, groups: int, ratio: int, *,
                 generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact CL factors ``1x1 (A) -> kxk (B) -> 1x1 (C)`` of a conv kernel.

    Per group: ``A`` has orthonormal columns, ``C`` orthonormal rows and
    ``B[..., u] = C^T W[..., u] A^T``, so ``C B A = W`` at every tap.

    Args:
        weight: ``W``, ``(n, m / g, kh, kw)``.
        groups: ``g``.
        ratio: ``r >= 1``.
        generator: Optional RNG for the orthonormal factors.

    Returns:
        ``A (r*m, m/g, 1, 1)``, ``B (r*n, r*m/g, kh, kw)``, ``C (n, r*n/g, 1, 1)``,
        in ``weight``'s dtype and device.
    """
    n, m_g, kh, kw = weight.shape
    g = groups
    if n % g or ratio < 1:
        raise ValueError(f'cannot factorise {tuple(weight.shape)} with groups={g}, '
                         f'ratio={ratio}')
    n_g = n // g
    w = weight.detach().to(torch.float64).reshape(g, n_g, m_g, kh, kw).cpu()
    a = random_orthonormal(g, ratio * m_g, m_g, generator=generator)  # (g, rm, m)
    c_t = random_orthonormal(g, ratio * n_g, n_g, generator=generator)  # (g, rn, n)
    b = torch.einsum('gpn,gnmhw,gqm->gpqhw', c_t, w, a)
    out = dict(dtype=weight.dtype, device=weight.device)
    return (a.reshape(g * ratio * m_g, m_g, 1, 1).to(**out),
            b.reshape(g * ratio * n_g, ratio * m_g, kh, kw).to(**out),
            c_t.transpose(1, 2).reshape(n, ratio * n_g, 1, 1).to(**out))


def factorize_linear(weight: Tensor, ratio: int, *,
                     generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact factors ``A (r*m, m)``, ``B (r*n, r*m)``, ``C (n, r*n)`` with ``C B A = W``.

    Args:
        weight: ``W``, ``(n, m)``.
        ratio: ``r >= 1``.
        generator: Optional RNG for the orthonormal factors.

    Returns:
        The three matrices, first applied first, in ``weight``'s dtype and device.
    """
    a, b, c = factorize_cl(weight[:, :, None, None], 1, ratio, generator=generator)
    return a[..., 0, 0], b[..., 0, 0], c[..., 0, 0]


def ck_exact_min_ratio(in_per_group: int, out_per_group: int,
                       kernel_sizes: Sequence[tuple[int, int]]) -> int:
    """Smallest ratio for which :func:`factorize_ck` has its exact construction.

    The construction routes each (anchor, input channel) pair through its own
    intermediate channel, so every intermediate width per group (``r*m`` first,
    ``r*n`` later) must hold ``anchors * m`` channels.

    Args:
        in_per_group: ``m / g``.
        out_per_group: ``n / g``.
        kernel_sizes: The CK chain's sub-kernel sizes.

    Returns:
        ``r_min``; e.g. 4 for a 5x5 (anchors ``{0, 2}^2``), 9 for a 7x7.
    """
    n_anchor = (len(ck_anchors([s[0] for s in kernel_sizes])[0]) *
                len(ck_anchors([s[1] for s in kernel_sizes])[0]))
    need = n_anchor
    if len(kernel_sizes) > 2:
        need = max(need, -(-n_anchor * in_per_group // out_per_group))
    return need


def factorize_ck(weight: Tensor, groups: int, channels: Sequence[int],
                 kernel_sizes: Sequence[tuple[int, int]], *,
                 init: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Exact CK factors of a conv kernel.

    Construction: along each axis, anchors ``0, t, 2t, ...`` (``t`` the last
    sub-kernel's size) cover the kernel with windows that do not overlap. The
    first ``L - 1`` sub-kernels copy input channel ``c`` into intermediate
    channel ``(anchor, c)`` shifted by the anchor (one-hot taps, the shift split
    over the sub-kernels). The last sub-kernel reads channel ``(anchor, c)``
    with the window of ``W`` starting at the anchor. Intermediate channels
    beyond ``anchors * m/g`` are free: they keep ``init`` (or zero), and the
    entries that would let them reach the output are zero.

    Args:
        weight: ``W``, ``(n, m / g, kh, kw)``.
        groups: ``g``.
        channels: ``L + 1`` widths ``[m, r*m, r*n, ..., n]``.
        kernel_sizes: ``L`` sub-kernel sizes composing to ``(kh, kw)``.
        init: Optional ``L`` kernels supplying the free entries.

    Returns:
        ``L`` kernels, kernel ``i`` of shape ``(c[i+1], c[i]/g, kh_i, kw_i)``,
        in ``weight``'s dtype and device.

    Raises:
        ValueError: If an intermediate width is too small for the construction
            (see :func:`ck_exact_min_ratio`).
    """
    n, m_g, kh, kw = weight.shape
    g, n_layers = groups, len(kernel_sizes)
    anchors_h, kh2 = ck_anchors([s[0] for s in kernel_sizes])
    anchors_w, kw2 = ck_anchors([s[1] for s in kernel_sizes])
    if (kh2, kw2) != (kh, kw) or len(channels) != n_layers + 1 or n_layers < 2:
        raise ValueError(f'sub-kernels {list(kernel_sizes)} and widths '
                         f'{list(channels)} do not compose to {tuple(weight.shape)}')
    dims = [c // g for c in channels]
    anchor_index = [(jh, jw) for jh in range(len(anchors_h)) for jw in range(len(anchors_w))]
    anchors = [(anchors_h[jh], anchors_w[jw]) for jh, jw in anchor_index]
    used = len(anchors) * m_g
    if any(d < used for d in dims[1:-1]):
        raise ValueError(
            f'exact CK factorisation of a {kh}x{kw} kernel needs every intermediate '
            f'width per group >= {len(anchors)} anchors x {m_g} input channels = '
            f'{used}, got {dims[1:-1]}')

    def shifts(anchor: int, sizes: list[int]) -> list[int]:
        out, left = [], anchor
        for s in sizes:
            out.append(min(s - 1, left))
            left -= out[-1]
        return out

    sh = [(shifts(ah, [s[0] for s in kernel_sizes[:-1]]),
           shifts(aw, [s[1] for s in kernel_sizes[:-1]])) for ah, aw in anchors]
    w = weight.detach().to(torch.float64).reshape(g, dims[-1], m_g, kh, kw).cpu()
    eye = torch.arange(m_g)
    kernels = []
    for i, (sh_i, sw_i) in enumerate(kernel_sizes):
        shape = (g, dims[i + 1], dims[i], sh_i, sw_i)
        if init is not None:
            k = init[i].detach().to(torch.float64).cpu().reshape(shape).clone()
        else:
            k = torch.zeros(shape, dtype=torch.float64)
        if i < n_layers - 1:
            k[:, :used] = 0
            for j, (hs, ws) in enumerate(sh):
                rows = j * m_g + eye
                cols = eye if i == 0 else rows
                k[:, rows, cols, hs[i], ws[i]] = 1.0
        else:
            k.zero_()
            t_h, t_w = sh_i, sw_i
            for j, (jh, jw) in enumerate(anchor_index):
                # Tap h belongs to window h // t only: the windows tile the kernel
                # (only the last anchor may be clamped, and it still covers its tile).
                ah, aw = anchors_h[jh], anchors_w[jw]
                h0, w0 = jh * t_h, jw * t_w
                h1, w1 = min(h0 + t_h, kh), min(w0 + t_w, kw)
                k[:, :, j * m_g:(j + 1) * m_g, h0 - ah:h1 - ah, w0 - aw:w1 - aw] = \
                    w[..., h0:h1, w0:w1]
        kernels.append(k.reshape(channels[i + 1], dims[i], sh_i, sw_i).to(
            dtype=weight.dtype, device=weight.device))
    return kernels
