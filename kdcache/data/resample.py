"""Antialiased resize of many crop boxes at once, the same numbers on every CPU and every device.

Why not `F.interpolate(..., antialias=True)` per crop: a view recipe like `rrc` gives every sample
its own crop size, so a batch costs one interpolate call per sample (a Python loop, one kernel
launch each on a GPU), and the numbers depend on where they are computed: PyTorch's AVX2/AVX512
CPU kernels contract `out += src * w` into fused multiply-adds, its portable build does not, and the
CUDA kernel computes its weights in another order. Measured on torch 2.14.1: 288 of 300 random
crops resized on an AVX512 CPU differ from the portable build in the last bits (up to 3e-5 of the
0..255 range). A store made on one machine and a student trained on another then see slightly
different pixels.

So the resize is written out here, once, as gathers and separate multiplies and adds (never fused):
PyTorch's separable antialiased filter (bilinear: triangle; bicubic: Keys a = -0.5), its tap
ranges and weights computed exactly as its portable build computes them (float32 and float64 steps
in the same order, in numpy), applied horizontally then vertically with the taps summed in order
from the first. The result equals `F.interpolate(crop.float(), (size, size), mode, antialias=True,
align_corners=False)` of the portable build (ATEN_CPU_CAPABILITY=default) bit for bit, on any CPU
and on CUDA (tests/test_views.py checks it), and a whole batch of crop boxes of any sizes is one
set of tensor ops: two passes of `taps` gathers, multiplies and adds.

A crop may reach outside the image (zero padding): those taps get weight 0, which adds exactly what
a zero pixel adds. A flip is the horizontal taps in reverse order (the same sums, mirrored).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_F32, _F64 = np.float32, np.float64


def _filter(x: np.ndarray, cubic: np.ndarray) -> np.ndarray:
    """PyTorch's aa_filter on float32 x: triangle (1 - |x| computed in double, as C++ does for
    `return 1.0 - x`) or Keys' cubic with a = -0.5 (float32 throughout)."""
    x = np.abs(x.astype(_F32))
    tri = np.where(x < 1.0, (1.0 - x.astype(_F64)).astype(_F32), _F32(0))
    if not cubic.any():
        return tri
    a = _F32(-0.5)
    near = ((a + _F32(2)) * x - (a + _F32(3))) * x * x + _F32(1)
    far = ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a
    cub = np.where(x < 1.0, near, np.where(x < 2.0, far, _F32(0))).astype(_F32)
    return np.where(cubic, cub, tri)


def aa_taps(n_in: np.ndarray, n_out: int, cubic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first tap int64 [B, n_out], weights float32 [B, n_out, K]) of resizing row b's `n_in[b]`
    pixels to `n_out`: output pixel i is sum_k src[first + k] * w[k], summed in order of k. Rows
    never use more than K taps (the largest support in the batch); unused taps have weight 0.

    PyTorch's `_compute_indices_min_size_weights_aa` step by step (scale and support in float32,
    the centre and the bounds through double as C++ promotes them)."""
    n_in = np.asarray(n_in, dtype=np.int64).reshape(-1)
    cubic = np.broadcast_to(np.asarray(cubic, dtype=bool).reshape(-1), n_in.shape)
    scale = n_in.astype(_F32) / _F32(n_out)
    down = scale >= 1.0
    half = np.where(cubic, 2.0, 1.0)  # interp_size * 0.5
    support = np.where(down, half * scale.astype(_F64), half).astype(_F32)
    width = np.ceil(support).astype(np.int64) * 2 + 1  # max_interp_size
    invscale = np.where(down, 1.0 / scale.astype(_F64), 1.0).astype(_F32)
    centre = (scale.astype(_F64)[:, None] * (np.arange(n_out) + 0.5)[None]).astype(_F32)
    lo = (centre - support[:, None]).astype(_F64) + 0.5
    hi = (centre + support[:, None]).astype(_F64) + 0.5
    first = np.maximum(np.trunc(lo).astype(np.int64), 0)
    count = np.clip(np.minimum(np.trunc(hi).astype(np.int64), n_in[:, None]) - first, 0, width[:, None])
    k = np.arange(int(width.max()))
    offset = ((k[None, None] + first[:, :, None]).astype(_F32) - centre[:, :, None]).astype(_F64) + 0.5
    w = _filter((offset * invscale.astype(_F64)[:, None, None]).astype(_F32), cubic[:, None, None])
    w = np.where(k[None, None] < count[:, :, None], w, _F32(0)).astype(_F32)
    total = np.zeros(first.shape, dtype=_F32)
    for j in k:  # float32, in order, as the C++ loop
        total = total + w[..., j]
    safe = np.where(total != 0, total, _F32(1))
    used = max(int(count.max()), 1)  # taps past every row's count hold weight 0 only
    return first, (w[..., :used] / safe[..., None]).astype(_F32)


@functools.lru_cache(maxsize=4096)
def _row_taps(n_in: int, n_out: int, cubic: bool) -> tuple[np.ndarray, np.ndarray]:
    """`aa_taps` of one length, remembered: a pure function of its three integers, and a batch has
    few distinct crop lengths (each at most the source size), so a per-sample render pays ~30 numpy
    calls once per length instead of every time."""
    first, w = aa_taps(np.array([n_in]), n_out, np.array([cubic]))
    first.flags.writeable = w.flags.writeable = False
    return first[0], w[0]


def _tap_index(starts: np.ndarray, lengths: np.ndarray, n_src: int, size: int, cubic: np.ndarray,
               flip: np.ndarray | None, stride: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat source index [B * size, K], weights [B * size, K]) of one pass: crop b covers source
    pixels starts[b] .. starts[b] + lengths[b] - 1 of a line of n_src pixels (outside it: zero
    padding, weight 0), whose pixel p is row stride[b] + p of the flattened source."""
    rows = [_row_taps(int(n), size, bool(c)) for n, c in zip(lengths, cubic)]
    K = max(w.shape[1] for _, w in rows)
    first = np.stack([f for f, _ in rows])
    w = np.zeros((len(rows), size, K), dtype=_F32)
    for b, (_, wb) in enumerate(rows):
        w[b, :, :wb.shape[1]] = wb
    pos = starts[:, None, None] + first[:, :, None] + np.arange(K)[None, None]
    w = np.where((pos >= 0) & (pos < n_src), w, _F32(0))
    pos = np.clip(pos, 0, n_src - 1) + stride[:, None, None]
    if flip is not None and flip.any():
        pos[flip], w[flip] = pos[flip, ::-1], w[flip, ::-1]
    return pos.reshape(-1, K), np.ascontiguousarray(w.reshape(-1, K))


def _apply(rows: torch.Tensor, index: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """sum_k rows[index[:, k]] * weights[:, k], summed in order of k, multiply and add separate."""
    dev = rows.device
    idx = torch.from_numpy(index).to(dev)
    w = torch.from_numpy(weights).to(dev)
    acc = rows.index_select(0, idx[:, 0]).mul_(w[:, :1])
    for k in range(1, idx.shape[1]):
        acc.add_(rows.index_select(0, idx[:, k]).mul_(w[:, k:k + 1]))
    return acc


def resample(images: torch.Tensor, top, left, h, w, size: int, cubic, flip) -> torch.Tensor:
    """uint8 [B, C, H, W] (one source size) and per-row integer crop boxes (top, left, h, w: int64
    arrays; a box may reach outside the image) -> float32 [B, C, size, size]: each crop resized with
    PyTorch's antialiased bilinear (cubic[b] False) or bicubic (True, clamped to 0..255) filter, then
    flipped horizontally where flip[b]. Equal, bit for bit, to cropping with zero padding and calling
    the portable `F.interpolate(..., antialias=True)` on each crop (identity for a crop of size x size)."""
    B, C, H, W = images.shape
    top, left, h, w = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (top, left, h, w))
    cubic = np.broadcast_to(np.asarray(cubic, dtype=bool).reshape(-1), (B,)).copy()
    flip = np.broadcast_to(np.asarray(flip, dtype=bool).reshape(-1), (B,)).copy()
    # only the band of rows and columns some crop covers is read (one crop: just its own pixels)
    r0, c0 = int(np.clip(top.min(), 0, H - 1)), int(np.clip(left.min(), 0, W - 1))
    r1, c1 = int(np.clip((top + h).max(), r0 + 1, H)), int(np.clip((left + w).max(), c0 + 1, W))
    bh, bw = r1 - r0, c1 - c0
    b = np.arange(B)
    # horizontal: one row per (b, source column) holding its C x bh pixels -> rows (b, output column)
    cols = images[:, :, r0:r1, c0:c1].permute(0, 3, 1, 2).reshape(B * bw, C * bh).to(torch.float32)
    xi, xw = _tap_index(left - c0, w, bw, size, cubic, flip, b * bw)
    across = _apply(cols, xi, xw).view(B, size, C, bh).permute(0, 2, 3, 1).reshape(B * C * bh, size)
    # vertical: one row per (b, channel, source row) holding `size` values -> rows (b, channel, output row)
    yi, yw = _tap_index(top - r0, h, bh, size, cubic, None, b * (C * bh))
    yi = (yi.reshape(B, 1, size, -1) + (np.arange(C) * bh)[None, :, None, None]).reshape(B * C * size, -1)
    yw = np.ascontiguousarray(np.broadcast_to(yw.reshape(B, 1, size, -1), (B, C, size, yw.shape[1])).reshape(
        B * C * size, -1))
    out = _apply(across, yi, yw).view(B, C, size, size)
    if cubic.any():
        at = torch.from_numpy(np.flatnonzero(cubic)).to(out.device)
        out[at] = out[at].clamp_(0.0, 255.0)
    return out
