"""Turning decoded NV12 surfaces (on any device) into the engine's VideoFrame pieces, batched.

Pure torch, so the conversion is the same on the CPU (tests, the reference) and on CUDA. The small plane is
an area average like swscale's AREA scaler on the CPU path; values may differ by one code value where
swscale rounds differently, which is inside every detector's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.media import SMALL_H, SMALL_W

SMALL_CHROMA = (SMALL_H // 2, SMALL_W // 2)


def split_nv12(surface: torch.Tensor, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of an NV12 surface (Hs*3/2, W): luma (height, W) and interleaved chroma (height/2, W/2, 2).

    `height` is the picture's display height. A decoder may hand out surfaces of the coded height (1088 for
    1080p): the chroma plane starts after the whole luma plane of the surface, not after the picture."""
    width = surface.shape[-1]
    coded = surface.shape[0] * 2 // 3
    height = min(height, coded)
    luma = surface[:height]
    uv = surface[coded : coded + height // 2].reshape(height // 2, width // 2, 2)
    return luma, uv


def small_chroma(uv: torch.Tensor) -> torch.Tensor:
    """(N, H/2, W/2, 2) uint8 -> (N, 2, SMALL_H/2, SMALL_W/2) uint8: enough colour for a thumbnail.

    Chroma is first thinned to about twice the target size by taking every k-th sample (no float copy of
    the full plane), then area averaged: a thumbnail needs colour, not precision."""
    h, w = uv.shape[1], uv.shape[2]
    sy, sx = max(1, h // (2 * SMALL_CHROMA[0])), max(1, w // (2 * SMALL_CHROMA[1]))
    x = uv[:, ::sy, ::sx].permute(0, 3, 1, 2).to(torch.float32)
    return F.adaptive_avg_pool2d(x, SMALL_CHROMA).round_().to(torch.uint8)


def thumbnail_rgb(small_y: np.ndarray, chroma: np.ndarray, full_range: bool = False) -> np.ndarray:
    """BT.709 RGB (SMALL_H, SMALL_W, 3) from the small luma (limited range) and small chroma planes."""
    y = small_y.astype(np.float32)
    u = chroma[0].astype(np.float32).repeat(2, 0).repeat(2, 1) - 128.0
    v = chroma[1].astype(np.float32).repeat(2, 0).repeat(2, 1) - 128.0
    y = (y - 16.0) * (255.0 / 219.0)
    cs = 1.0 if full_range else 255.0 / 224.0
    r = y + 1.5748 * cs * v
    g = y - 0.1873 * cs * u - 0.4681 * cs * v
    b = y + 1.8556 * cs * u
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


@dataclass
class Converted:
    """A batch of decoded pictures in the engine's terms; `luma` only when the native plane is kept."""

    small: torch.Tensor  # (N, SMALL_H, SMALL_W) uint8, limited range
    chroma: torch.Tensor  # (N, 2, SMALL_H/2, SMALL_W/2) uint8
    luma: torch.Tensor | None = None  # (N, H, W) uint8
    hist: torch.Tensor | None = None  # (N, 256) int32
    rows: torch.Tensor | None = None  # (N, R, W) uint8
    row_stride: int = 1


def convert_surfaces(surfaces: list[torch.Tensor], height: int, full_range: bool, keep_luma: bool = False) -> Converted:
    """A batch of NV12 surfaces -> small planes and either the native luma (copied) or its summary.

    Decoder surfaces are reused by the decoder as soon as it needs them, so whatever is kept is copied out
    now. By default only the summary is kept (histogram and sampled rows: about 5 % of the plane), which is
    what keeps GPU memory per stream small whatever the queue length; streams whose detectors need the
    whole plane (ignore regions, a non-default row count) keep it. One stack per plane keeps the work to a
    handful of kernel launches per batch instead of several per frame.
    """
    from kernels.luma_summary import row_stride, summarize

    lumas, uvs = zip(*(split_nv12(s, height) for s in surfaces), strict=True)
    luma = torch.stack(lumas)
    chroma = small_chroma(torch.stack(uvs))
    stride = row_stride(height)
    small, hist, rows = summarize(luma, stride)
    if full_range:
        small = (small.to(torch.float32) * (219.0 / 255.0) + 16.0).round_().to(torch.uint8)
    if keep_luma:
        return Converted(small, chroma, luma=luma, hist=hist, rows=rows, row_stride=stride)
    return Converted(small, chroma, hist=hist, rows=rows, row_stride=stride)
