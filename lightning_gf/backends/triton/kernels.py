"""The Triton source of :mod:`lightning_gf.backends.triton` (imported on first use only)."""

import triton
import triton.language as tl


@triton.jit
def pool_kernel(
    src, out, partial,
    C, H, W, PH, PW,
    s_n, s_c, s_h, s_w,
    before_h, before_w,
    KH: tl.constexpr, KW: tl.constexpr, KW_POW2: tl.constexpr,
    MEAN: tl.constexpr, TOTAL: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # one program: sample n, patch row pr, BLOCK_C channels, BLOCK_P patches of that row
    row_id = tl.program_id(0)
    n = row_id // PH
    pr = row_id % PH
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pc = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    j = tl.arange(0, KW_POW2)
    col = pc[:, None] * KW + j[None, :] - before_w  # (BLOCK_P, KW_POW2)
    col_ok = (j[None, :] < KW) & (col >= 0) & (col < W) & (pc[:, None] < PW)
    c_ok = c < C
    mask = c_ok[:, None, None] & col_ok[None, :, :]
    offsets = n * s_n + c[:, None, None] * s_c + col[None, :, :] * s_w
    if ACC_F64:
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    top = pr * KH - before_h
    for i in tl.static_range(KH):
        row = top + i
        row_ok = (row >= 0) & (row < H)
        values = tl.load(src + offsets + row * s_h, mask=mask & row_ok, other=0.0)
        acc += tl.sum(values.to(acc.dtype), axis=2)
    if TOTAL:
        tile = tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)
        tl.store(partial + tile * C + c, tl.sum(acc, axis=1), mask=c_ok)
    if MEAN:  # divide by the cells of each patch that lie inside the map
        rows = tl.minimum(top + KH, H) - tl.maximum(top, 0)
        left = pc * KW - before_w
        cols = tl.minimum(left + KW, W) - tl.maximum(left, 0)
        acc = acc / tl.maximum(rows * cols, 1).to(acc.dtype)[None, :]
    # channel-major output: (C, N, PH, PW)
    out_offsets = c[:, None] * (tl.num_programs(0) * PW) + row_id * PW + pc[None, :]
    tl.store(out + out_offsets, acc.to(out.dtype.element_ty), mask=c_ok[:, None] & (pc[None, :] < PW))


@triton.jit
def spread_kernel(
    low, out,
    C, H, W, PH, PW,
    l_n, l_c, l_h, l_w,
    o_n, o_c, o_h, o_w,
    before_h, before_w, scale,
    KH: tl.constexpr, KW: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # one program: one row h of sample n, BLOCK_C channels, BLOCK_W columns
    row_id = tl.program_id(0)
    n = row_id // H
    h = row_id % H
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    hb = h + before_h
    wb = w + before_w
    pr = hb // KH
    pc = wb // KW
    c_ok = c < C
    w_ok = w < W
    inside = (hb >= 0) & (pr < PH) & (wb >= 0) & (pc < PW)  # cells outside the grid get zero
    values = tl.load(low + n * l_n + c[:, None] * l_c + pr * l_h + pc[None, :] * l_w,
                     mask=c_ok[:, None] & (w_ok & inside)[None, :], other=0.0)
    if ACC_F64:
        values = values.to(tl.float64) * scale
    else:
        values = values.to(tl.float32) * scale
    tl.store(out + n * o_n + c[:, None] * o_c + h * o_h + w[None, :] * o_w, values.to(out.dtype.element_ty),
             mask=c_ok[:, None] & w_ok[None, :])
