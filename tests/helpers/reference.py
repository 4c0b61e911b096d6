"""A slow, independent reference of the filtered backward, written from shared/method.md.

Loops over patches with explicit, clipped index ranges; no padding tricks, no
reshapes shared with the library. Meant for float64 and small shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _patch_ranges(n_patches: int, size: int, cells: int, pad: int) -> list[tuple[int, int]]:
    """Patch i covers [i*cells - pad, (i+1)*cells - pad) clipped to [0, size)."""
    return [(max(i * cells - pad, 0), min((i + 1) * cells - pad, size)) for i in range(n_patches)]


def _grid(in_size: int, out_size: int, r: int, s: int):
    patches = math.ceil(out_size / r)
    pad_y = math.ceil((patches * r - out_size) / 2)
    pad_x = math.ceil((patches * r * s - in_size) / 2)
    return _patch_ranges(patches, out_size, r, pad_y), _patch_ranges(patches, in_size, r * s, pad_x)


def reference_grads(x, w, b, gy, *, stride, padding, dilation, groups, r, stride_correction):
    """Gradients (g_x, g_w, g_b) of the filtered conv for output gradient ``gy``."""
    sh, sw = stride
    dh, dw = dilation
    n, c_in, hx, wx = x.shape
    c_out, c_in_g, kh, kw = w.shape
    hy, wy = gy.shape[2:]
    out_rows, in_rows = _grid(hx, hy, r, sh)
    out_cols, in_cols = _grid(wx, wy, r, sw)
    ph, pw = len(out_rows), len(out_cols)
    scale = sh * sw if stride_correction else 1

    gbar = torch.zeros(n, c_out, ph, pw, dtype=gy.dtype)
    xs = torch.zeros(n, c_in, ph, pw, dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            (a, b_), (c, d) = out_rows[i], out_cols[j]
            gbar[:, :, i, j] = gy[:, :, a:b_, c:d].mean(dim=(2, 3))
            (a, b_), (c, d) = in_rows[i], in_cols[j]
            if b_ > a and d > c:
                xs[:, :, i, j] = x[:, :, a:b_, c:d].sum(dim=(2, 3))
    xs = xs / scale

    c_out_g = c_out // groups
    g_w = torch.zeros_like(w)
    for o in range(c_out):
        grp = o // c_out_g
        for ci in range(c_in_g):
            value = (gbar[:, o] * xs[:, grp * c_in_g + ci]).sum()
            g_w[o, ci, :, :] = value

    # low-resolution input gradient
    glow = torch.zeros(n, c_in, ph, pw, dtype=gy.dtype)
    rows_atrous, cols_atrous = dh >= r, dw >= r
    for ci_full in range(c_in):
        grp = ci_full // c_in_g
        ci = ci_full % c_in_g
        for o in range(grp * c_out_g, (grp + 1) * c_out_g):
            for i in range(ph):
                for j in range(pw):
                    total = 0.0
                    for u in range(kh):
                        for v in range(kw):
                            if rows_atrous:
                                di = (dh // r) * (kh // 2) - u * (dh // r)
                            else:
                                di = 0
                            if cols_atrous:
                                dj = (dw // r) * (kw // 2) - v * (dw // r)
                            else:
                                dj = 0
                            ii, jj = i + di, j + dj
                            if 0 <= ii < ph and 0 <= jj < pw:
                                total = total + w[o, ci, u, v] * gbar[:, o, ii, jj]
                    if torch.is_tensor(total):
                        glow[:, ci_full, i, j] += total
    glow = glow / scale

    g_x = torch.zeros_like(x)
    for i in range(ph):
        for j in range(pw):
            (a, b_), (c, d) = in_rows[i], in_cols[j]
            if b_ > a and d > c:
                g_x[:, :, a:b_, c:d] = glow[:, :, i, j][:, :, None, None]

    g_b = gy.sum(dim=(0, 2, 3)) if b is not None else None
    return g_x, g_w, g_b


def output_of(x, w, b, *, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)
