"""The compiled CPU kernels against the plain PyTorch path they replace."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.config import force_backend
from lightning_gf.ops.conv import (
    _patch_means_and_total,
    _spread_to_input,
    _tap_sums,
    _weight_grad,
    pool_patches,
)
from lightning_gf.ops.patch_grid import AxisGrid

# (N, C, H_in, W_in, r, stride): grids that pad, that crop (negative offsets), odd maps, strides
# (most of them narrow: a patch row fits in 1 to 4 AVX2 registers, 8 to 32 cells, and
# is pooled in registers; 20x22 and 28x28 take 3 and 4); then wide maps, whose patch
# columns are summed eight at a time (AVX2), one whole map width at once when the grid
# tiles it or row by row around clipped patches, and enough maps to split across threads;
# the next three: widths the grid tiles with patches 2 or 4 wide (summed by horizontal
# adds), with patches past the last group of eight and rows clipped by the grid; the last:
# maps 8-16 wide (spread a patch row at a time) in enough planes for two threads
GRIDS = [(2, 3, 8, 8, 2, 1), (2, 5, 7, 9, 2, 1), (1, 4, 10, 11, 4, 1), (3, 2, 9, 11, 4, 2), (2, 3, 7, 5, 2, 3),
         (1, 2, 3, 3, 4, 1), (2, 6, 14, 14, 2, 2), (1, 3, 13, 12, 3, 1), (1, 3, 20, 22, 2, 1), (2, 4, 28, 28, 2, 1),
         (2, 160, 6, 40, 2, 1), (1, 2, 9, 70, 4, 1), (1, 3, 12, 64, 4, 2), (1, 2, 5, 37, 2, 1),
         (1, 3, 9, 48, 4, 1), (2, 3, 11, 34, 2, 1), (1, 2, 10, 48, 2, 2), (4, 600, 14, 13, 4, 1)]


def _plain(fn, *args, **kwargs):
    with force_backend("reference"):
        return fn(*args, **kwargs)


@pytest.fixture(autouse=True)
def _kernels():
    if not cpu_kernels.available():
        pytest.fail("the compiled CPU kernels did not build here; see the warning above (a C++ compiler is needed)")
    with force_backend("cpu"):  # even on the small maps below
        yield


def _grids(h, w, r, stride):
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    return AxisGrid.build(h, oh, r, stride), AxisGrid.build(w, ow, r, stride), (oh, ow)


def test_kernels_build_and_load_here():
    assert cpu_kernels.available()
    assert (cpu_kernels.build_directory() / "lightning_gf_cpu.so").exists()
    assert hasattr(torch.ops.lightning_gf_cpu, "patch_pool")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c,h,w,r,stride", GRIDS)
def test_patch_pool_matches_plain_path(n, c, h, w, r, stride, dtype):
    grid_h, grid_w, out_size = _grids(h, w, r, stride)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    gy = torch.randn(n, c, *out_size, generator=g).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_patches(x, grid_h, grid_w, on_input=True),
                               _plain(pool_patches, x, grid_h, grid_w, on_input=True), **tol)
    means, total = _patch_means_and_total(gy, grid_h, grid_w)
    plain_means, plain_total = _plain(_patch_means_and_total, gy, grid_h, grid_w)
    torch.testing.assert_close(means, plain_means, **tol)
    torch.testing.assert_close(total, plain_total, **tol)
    assert means.dtype == plain_means.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,h,w,r,stride", GRIDS)
def test_spread_matches_plain_path(n, c, h, w, r, stride, dtype, scale):
    grid_h, grid_w, _ = _grids(h, w, r, stride)
    low_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    low = torch.randn(n, c, grid_h.patches, grid_w.patches, dtype=low_dtype)
    out = _spread_to_input(low, grid_h, grid_w, scale, dtype, False)
    expected = _plain(_spread_to_input, low, grid_h, grid_w, scale, dtype, False)
    assert out.shape == (n, c, h, w) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_spread_reads_channel_major_patches():
    """The products leave ``low`` stored (C, N, h, w); the kernel reads it in place."""
    grid_h, grid_w, _ = _grids(9, 11, 2, 1)
    low = torch.randn(5, 3, grid_h.patches, grid_w.patches).transpose(0, 1)  # (3, 5, ...) stored (5, 3, ...)
    assert not low.is_contiguous()
    out = _spread_to_input(low, grid_h, grid_w, 1.0, torch.float32, False)
    torch.testing.assert_close(out, _plain(_spread_to_input, low.contiguous(), grid_h, grid_w, 1.0, torch.float32,
                                           False), rtol=0, atol=0)


def test_pooled_maps_are_channel_major():
    grid_h, grid_w, _ = _grids(8, 8, 2, 1)
    pooled = pool_patches(torch.randn(2, 3, 8, 8), grid_h, grid_w, on_input=True)
    assert pooled.shape == (2, 3, 4, 4) and pooled.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("n,c,h,w,r,stride", GRIDS)
def test_small_map_products_match_plain_path(n, c, h, w, r, stride):
    """The 0/1-matrix product the filter uses on small maps, against the loops."""
    grid_h, grid_w, out_size = _grids(h, w, r, stride)
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(n, c, h, w, generator=g), torch.randn(n, c, *out_size, generator=g)
    low = torch.randn(n, c, grid_h.patches, grid_w.patches, generator=g)
    with force_backend("small_maps"):
        got = (pool_patches(x, grid_h, grid_w, on_input=True), *_patch_means_and_total(gy, grid_h, grid_w),
               _spread_to_input(low, grid_h, grid_w, 0.25, torch.float32, False))
    want = (_plain(pool_patches, x, grid_h, grid_w, on_input=True), *_plain(_patch_means_and_total, gy, grid_h, grid_w),
            _plain(_spread_to_input, low, grid_h, grid_w, 0.25, torch.float32, False))
    for a, b in zip(got, want):  # float32 sums in two orders (the channel totals sum up to 728 cells here)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert got[-1].is_contiguous()  # g_x comes back in the layout autograd and torch.compile expect


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 1, 3, 3), (2, 6, 1, 1), (3, 2, 5, 3)])
def test_tap_sums_and_weight_grad_broadcast_match_plain_path(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_tap_sums(w), _plain(_tap_sums, w), rtol=1e-12, atol=1e-12)
    groups = shape[0] if shape[1] == 1 else 1
    c_in = shape[1] * groups
    gbar, xs = torch.randn(2, shape[0], 3, 3, generator=g), torch.randn(2, c_in, 3, 3, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        got = _weight_grad(gbar, xs, torch.Size(shape), groups, 0.25, dtype)
        want = _plain(_weight_grad, gbar, xs, torch.Size(shape), groups, 0.25, dtype)
        assert got.shape == shape and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_large_map_spread_is_exact():
    """Maps of several MB take the huge-page path: the values must not change."""
    grid_h, grid_w, _ = _grids(256, 250, 2, 1)  # 2x20 maps of 256x250 floats: 10 MB
    low = torch.randn(2, 20, grid_h.patches, grid_w.patches)
    out = _spread_to_input(low, grid_h, grid_w, 1.0, torch.float32, False)
    assert out.nbytes > 8 * 2**20
    torch.testing.assert_close(out, _plain(_spread_to_input, low, grid_h, grid_w, 1.0, torch.float32, False),
                               rtol=0, atol=0)


def test_non_contiguous_and_channels_last_maps_take_the_plain_path():
    grid_h, grid_w, _ = _grids(8, 8, 2, 1)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(pool_patches(x, grid_h, grid_w, on_input=True),
                               _plain(pool_patches, x.contiguous(), grid_h, grid_w, on_input=True))
    low = torch.randn(2, 3, 4, 4)
    out = _spread_to_input(low, grid_h, grid_w, 1.0, torch.float32, True)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_switch_off_by_environment_and_cached_reuse(tmp_path):
    """``LIGHTNING_GF_CPU_KERNELS=0`` turns them off; a fresh process loads the cached build without compiling."""
    code = "import lightning_gf.backends.cpu as k; print(k.available())"
    env = dict(os.environ, LIGHTNING_GF_CPU_KERNELS="0")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "False"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True"
    assert "compiling" not in on.stderr  # already built by this session: loaded from the cache


def test_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch):
    """No compiler: a warning that says why, and the plain path (same gradients)."""
    code = (
        "import warnings, torch\n"
        "import lightning_gf.backends.cpu as k\n"
        "from lightning_gf import functional\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(1, 2, 6, 6, requires_grad=True)\n"
        "    functional.filtered_conv2d(x, torch.randn(3, 2, 3, 3), padding=1, r=2).sum().backward()\n"
        "print(k.available(), any('could not build the CPU kernels' in str(w.message) for w in caught),\n"
        "      bool(x.grad.abs().sum() > 0))\n"
    )
    env = dict(os.environ, LIGHTNING_GF_CACHE=str(tmp_path), CXX="/nonexistent/c++", PATH="/nonexistent")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_kernels_run_their_loops_on_torchs_threads():
    """Built with OpenMP where torch's own parallel backend is OpenMP: without it the
    kernels' ``at::parallel_for`` loops run on one thread (2x slower on 2 cores)."""
    if not torch.backends.openmp.is_available() or sys.platform != "linux":
        pytest.skip("torch's parallel backend here is not OpenMP")
    library = (cpu_kernels.build_directory() / "lightning_gf_cpu.so").read_bytes()
    assert b"GOMP_parallel" in library  # the parallel regions call into the OpenMP runtime


@pytest.mark.parametrize("shape, grid", [((8, 160, 7, 7), (2, 2, 1, 1, 4, 4)), ((3, 40, 30, 30), (2, 2, 1, 1, 15, 15)),
                                         ((2, 9, 64, 70), (4, 4, 0, 1, 16, 18))])
def test_pooling_split_over_threads_matches_one_thread(shape, grid):
    """Maps of 16K cells and more are pooled by several threads, each from any plane on:
    the same sums, means and totals as on one thread."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([torch.ops.lightning_gf_cpu.patch_pool(x, *grid, mean, totals)
                            for mean, totals in ((False, False), (True, True))])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_small_maps_come_back_patch_major_and_the_products_read_them_in_place():
    """Below ``FEW_PATCHES`` patches the pooled sums and the ``g_y`` means are stored
    (P_h, P_w, N, C): both channel products then take them as one matrix, and give what
    they give on the same values stored contiguous."""
    from lightning_gf.backends import small_maps
    from lightning_gf.ops.conv import _grouped_channel_mix, _weight_grad_per_pair

    grid_h, grid_w, out_size = _grids(8, 8, 4, 1)  # 2x2 patches
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(3, 5, 8, 8, generator=g), torch.randn(3, 6, *out_size, generator=g)
    with force_backend("small_maps"):
        pooled = pool_patches(x, grid_h, grid_w, on_input=True)
        means, _ = _patch_means_and_total(gy, grid_h, grid_w)
    assert small_maps.is_patch_major(pooled) and small_maps.is_patch_major(means)
    assert not pooled.is_contiguous() and not means.is_contiguous()
    taps = torch.randn(6, 5, generator=g)
    low = _grouped_channel_mix(means, taps, 1, transpose=True)
    assert small_maps.is_patch_major(low)
    torch.testing.assert_close(low, _grouped_channel_mix(means.contiguous(), taps, 1, transpose=True))
    torch.testing.assert_close(_grouped_channel_mix(pooled, taps, 1, transpose=False),
                               _grouped_channel_mix(pooled.contiguous(), taps, 1, transpose=False))
    torch.testing.assert_close(_weight_grad_per_pair(means, pooled, 1),
                               _weight_grad_per_pair(means.contiguous(), pooled.contiguous(), 1))


# (N, C_in, C_out, H, W, k, stride, padding, groups, r): dense, depthwise, 1x1, strided, overhanging grids
FUSED_CASES = [(2, 3, 5, 8, 8, 3, 1, 1, 1, 2), (2, 4, 4, 9, 7, 3, 1, 1, 4, 2), (1, 6, 4, 10, 11, 1, 1, 0, 1, 4),
               (2, 3, 4, 9, 8, 3, 2, 1, 1, 2), (1, 2, 3, 3, 3, 3, 1, 1, 1, 4), (2, 5, 5, 14, 14, 3, 2, 1, 5, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_backward_matches_the_steps(case, needs, dtype, monkeypatch):
    """The whole backward in one compiled call (dense and depthwise convs) against the same
    steps called one by one from Python; only the gradients asked for come back."""
    from lightning_gf.ops import conv as functional

    n, c_in, c_out, h, w, k, stride, padding, groups, r = case
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g).to(dtype)
    out_h, out_w = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    gy = torch.randn(n, c_out, out_h, out_w, generator=g).to(dtype)
    grid_h, grid_w = AxisGrid.build(h, out_h, r, stride), AxisGrid.build(w, out_w, r, stride)
    pooled = pool_patches(x, grid_h, grid_w, on_input=True)
    args = (gy, pooled, weight, list(x.shape), dtype, False, [stride, stride], [1, 1], groups, r, stride * stride, *needs)
    assert functional._fused_backward_takes(gy, weight, False, [1, 1], groups, r)
    fused = functional._filtered_backward(*args)
    monkeypatch.setattr(functional, "_fused_backward_takes", lambda *a: False)
    steps = functional._filtered_backward(*args)
    for got, want, needed in zip(fused, steps, needs):
        if not needed:
            assert got.numel() == 0
            continue
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_fused_backward_leaves_other_convs_to_the_steps():
    """Grouped (not depthwise) convs, atrous taps, channels-last and strided views of ``g_y``
    take the step-by-step path."""
    from lightning_gf.ops.conv import _fused_backward_takes

    gy, dense, grouped = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3), torch.randn(4, 2, 3, 3)
    assert _fused_backward_takes(gy, dense, False, [1, 1], 1, 2)
    assert not _fused_backward_takes(gy, grouped, False, [1, 1], 2, 2)  # 2 groups of 2 channels
    assert not _fused_backward_takes(gy, dense, False, [2, 1], 1, 2)  # dilation >= r: taps kept on that axis
    assert not _fused_backward_takes(gy, dense, True, [1, 1], 1, 2)  # channels-last input
    assert not _fused_backward_takes(gy[:, :, ::2], dense, False, [1, 1], 1, 2)
    with force_backend("reference"):
        assert not _fused_backward_takes(gy, dense, False, [1, 1], 1, 2)
