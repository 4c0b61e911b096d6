"""The Triton kernels (the CUDA path), run here under Triton's interpreter on CPU tensors.

Their gradients against the float64 reference run in tests/ops/test_functional.py and
tests/ops/test_lean.py (the ``triton`` entry of ``backend``); this file checks the kernels
against PyTorch's own ops directly, that the filter really takes them, when it does
not, and that they compile to Hopper machine code.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lightning_gf.backends import triton as triton_kernels
from lightning_gf.config import force_backend
from lightning_gf.ops import conv as functional
from lightning_gf.ops.conv import filtered_conv2d

pytestmark = pytest.mark.skipif(not triton_kernels.available(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_this_device():
    triton_kernels.enable_on(DEVICE)
    yield
    if DEVICE == "cpu":
        triton_kernels.disable_on("cpu")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channel_major":  # what the products make: (C, N, h, w) in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.contiguous()


def _sums_by_pooling(t: torch.Tensor, kh: int, kw: int, before_h: int, before_w: int, ph: int, pw: int):
    """Patch sums by zero padding (or cropping) and ``avg_pool2d``: PyTorch's ops only, float64."""
    t = t.double()
    after_h = ph * kh - t.shape[2] - before_h
    after_w = pw * kw - t.shape[3] - before_w
    t = F.pad(t, (before_w, after_w, before_h, after_h))
    return F.avg_pool2d(t, (kh, kw), (kh, kw), divisor_override=1)


# (H, W, kh, kw, before_h, before_w, patches_h, patches_w): covering, overhanging on both
# sides, and a grid smaller than the map (negative padding: the rim is left out).
GRIDS = [(8, 8, 2, 2, 0, 0, 4, 4), (7, 9, 2, 4, 1, 1, 4, 3), (9, 9, 4, 2, -1, 0, 2, 5), (5, 6, 7, 7, 1, 0, 1, 1)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_major"])
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{g[0]}x{g[1]}_k{g[2]}x{g[3]}_b{g[4]}{g[5]}" for g in GRIDS])
def test_pool_sums_means_and_total_match_pytorch(grid, layout):
    h, w, kh, kw, bh, bw, ph, pw = grid
    t = _layout(torch.randn(3, 5, h, w, dtype=torch.float64, device=DEVICE), layout)
    sums, total = triton_kernels.patch_pool(t, kh, kw, bh, bw, ph, pw, mean=False, total=True)
    want = _sums_by_pooling(t, kh, kw, bh, bw, ph, pw)
    assert sums.shape == (3, 5, ph, pw) and sums.dtype == torch.float64
    assert sums.transpose(0, 1).is_contiguous()  # channel-major, ready for one matrix product
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, want.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    means, _ = triton_kernels.patch_pool(t, kh, kw, bh, bw, ph, pw, mean=True, total=False)
    counts = _sums_by_pooling(torch.ones_like(t), kh, kw, bh, bw, ph, pw).clamp_min(1)
    torch.testing.assert_close(means, want / counts, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_of_half_types_sums_in_float32_and_rounds_once(dtype):
    # 64 cells of 1 + 2**-9 each: a half-precision running sum would lose the small part
    t = torch.full((1, 2, 8, 8), 1 + 2**-9, dtype=torch.float32, device=DEVICE).to(dtype)
    sums, total = triton_kernels.patch_pool(t, 8, 8, 0, 0, 1, 1, mean=False, total=True)
    exact = t.double().sum((2, 3))
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums[:, :, 0, 0].double(), exact, rtol=1e-7, atol=0)
    torch.testing.assert_close(total.double(), exact.sum(0), rtol=1e-7, atol=0)
    rounded, _ = triton_kernels.patch_pool(t, 8, 8, 0, 0, 1, 1, mean=False, total=False, out_dtype=dtype)
    assert rounded.dtype == dtype
    assert torch.equal(rounded, sums.to(dtype))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("low_layout", ["contiguous", "channel_major"])
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{g[0]}x{g[1]}_k{g[2]}x{g[3]}_b{g[4]}{g[5]}" for g in GRIDS])
def test_spread_repeats_each_patch_over_its_cells(grid, low_layout, channels_last):
    h, w, kh, kw, bh, bw, ph, pw = grid
    low = _layout(torch.randn(2, 3, ph, pw, dtype=torch.float64, device=DEVICE), low_layout)
    got = triton_kernels.patch_spread(low, h, w, kh, kw, bh, bw, 0.25, torch.float64, channels_last)
    full = low.repeat_interleave(kh, 2).repeat_interleave(kw, 3) * 0.25
    full = F.pad(full, (-bw, -(pw * kw - w - bw), -bh, -(ph * kh - h - bh)))  # crop, or zero-fill the rim
    assert got.shape == (2, 3, h, w)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(got, full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_spread_casts_once_after_scaling(dtype):
    low = torch.randn(1, 2, 2, 2, device=DEVICE)
    got = triton_kernels.patch_spread(low, 4, 4, 2, 2, 0, 0, 1 / 3, dtype, False)
    want = (low * (1 / 3)).repeat_interleave(2, 2).repeat_interleave(2, 3).to(dtype)
    assert got.dtype == dtype
    # Triton's interpreter rounds float32 -> bfloat16 towards zero (GPUs round to nearest): one unit off
    ulp = 2**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    torch.testing.assert_close(got, want, rtol=ulp, atol=0)


def test_filter_takes_the_kernels_for_every_map_step(monkeypatch):
    calls = []
    for name in ("patch_pool", "patch_spread"):
        original = getattr(triton_kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name if _name == "patch_spread" else f"{_name}(mean={kwargs['mean']})")
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, counted)
    x = torch.randn(2, 3, 9, 9, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    with force_backend("triton"):
        filtered_conv2d(x, w, padding=1, r=2).sum().backward()
    assert calls == ["patch_pool(mean=False)", "patch_pool(mean=True)", "patch_spread"]


def test_half_precision_patch_sums_are_kept_in_the_half_type_off_cpu():
    assert functional.pooled_dtype(torch.ones(1, dtype=torch.bfloat16)) == torch.float32
    assert functional.pooled_dtype(torch.ones(1, dtype=torch.float64)) == torch.float64
    meta = torch.ones(1, dtype=torch.float16, device="meta")  # any device but the CPU
    assert functional.pooled_dtype(meta) == torch.float16


def test_maps_too_large_for_32_bit_indexing_take_the_plain_path(caplog):
    huge = torch.zeros(1, device=DEVICE).expand(2**31)  # no memory behind it
    with caplog.at_level(logging.DEBUG, logger="lightning_gf.backends.triton"):
        assert not triton_kernels.takes(huge)
        assert not triton_kernels.takes(huge)
    assert sum("over 2**31" in message for message in caplog.messages) == 1  # said once
    assert not triton_kernels.takes(torch.zeros(0, device=DEVICE))
    assert triton_kernels.takes(torch.zeros(4, device=DEVICE))


def test_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(triton_kernels.ENV_SWITCH, "0")
    assert not triton_kernels.available()
    assert not triton_kernels.takes(torch.zeros(4, device=DEVICE))


def test_kernels_compile_to_hopper_machine_code():
    """The kernels go through Triton's whole compiler to sm_90 code, with no GPU needed
    (the interpreter alone would not catch what only the compiler rejects)."""
    pytest.importorskip("triton.backends.nvidia")
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lightning_gf.backends.triton import kernels as k

        target = GPUTarget("cuda", 90, 32)
        ints = lambda names: {n: "i32" for n in names.split()}
        for src, out, acc in [("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("fp64", "fp64", "fp64")]:
            sig = {"src": "*" + src, "out": "*" + out, "partial": "*" + acc,
                   **ints("C H W PH PW s_n s_c s_h s_w before_h before_w")}
            for kh, kw, kw2, mean, block_c, block_p in [(2, 2, 2, True, 8, 64), (7, 14, 16, False, 64, 1)]:
                consts = dict(KH=kh, KW=kw, KW_POW2=kw2, MEAN=mean, TOTAL=mean, ACC_F64=acc == "fp64",
                              BLOCK_C=block_c, BLOCK_P=block_p)
                sig.update({name: "constexpr" for name in consts})
                compiled = triton.compile(ASTSource(k.pool_kernel, sig, consts), target=target)
                assert compiled.asm["cubin"], "no machine code"
            sig = {"low": "*" + out, "out": "*" + src,
                   **ints("C H W PH PW l_n l_c l_h l_w o_n o_c o_h o_w before_h before_w"), "scale": "fp32"}
            consts = dict(KH=4, KW=4, ACC_F64=acc == "fp64", BLOCK_C=8, BLOCK_W=128)
            sig.update({name: "constexpr" for name in consts})
            assert triton.compile(ASTSource(k.spread_kernel, sig, consts), target=target).asm["cubin"]
        print("compiled")
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
