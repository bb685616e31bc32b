"""Spatial picture-quality kernels on native-size luma (N, H, W) uint8: blockiness and blur.

Both are read from horizontal neighbour steps along every `stride`-th row. A block grid or a blur shows on
every line, so a few hundred lines give the same averages as the whole plane at a fraction of the cost,
which matters on a CPU that is also decoding. Rows (not columns) are used because they are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 8


@dataclass(frozen=True, slots=True)
class SpatialStats:
    blockiness: torch.Tensor  # (N,) boundary step / interior step, ~1 natural, >= 2 blocky
    blur: torch.Tensor  # (N,) 0 sharp .. 1 smooth; NaN where the picture is too flat to judge
    activity: torch.Tensor  # (N,) mean absolute one-pixel step (capped) in code values


def spatial_stats(
    luma: torch.Tensor,
    stride: int = 8,
    cap: float = 24.0,
    floor: float = 0.5,
    min_activity: float = 0.5,
    mask: torch.Tensor | None = None,
) -> SpatialStats:
    """Blockiness, blur and texture activity of each frame of (N, H, W) uint8 luma.

    Blockiness: the mean step across 8x8 block boundaries (between pixels 8k+7 and 8k+8) over the mean
    step inside blocks. Each step is capped at `cap` code values so that real edges, which fall on a
    boundary no more often than anywhere else, cannot dominate either mean; `floor` keeps flat pictures
    (black, sky) near 1 instead of amplifying noise.

    Blur: squared two-pixel steps over squared one-pixel steps. Across a sharp edge both see the whole step
    (ratio 2 summed over positions); along a smooth ramp the two-pixel step is twice the one-pixel step
    (ratio 4); score = (ratio - 2) / 2 clamped to [0, 1]. Frames whose mean step is below `min_activity`
    score NaN: there is nothing to judge sharpness by.

    `mask` (H, W) bool, True where pixels are analysed (taken with the same row stride): steps touching an
    ignored pixel count nowhere.
    """
    n = luma.shape[0]
    rows = luma[:, ::stride, :].to(torch.float32)
    step1 = rows[..., 1:] - rows[..., :-1]  # (N, R, W-1)
    r, length = step1.shape[1], step1.shape[2]
    usable = length // BLOCK * BLOCK
    if mask is None:
        counts = torch.full((BLOCK,), float(r * (usable // BLOCK)), device=luma.device)
    else:
        m = mask[::stride]
        weight = (m[:, 1:] & m[:, :-1]).to(torch.float32)
        step1 = step1 * weight
        counts = weight[:, :usable].reshape(-1, BLOCK).sum(0)
    flat = step1.reshape(n, 1, -1)
    # Sums of products as batched dot products: BLAS reduces far faster than elementwise-then-sum on a CPU.
    # Two-pixel steps are sums of neighbouring one-pixel steps, so their energy follows from the one-pixel
    # energy and the lag-1 product (the pairs that straddle two rows are a negligible 1/W of the total).
    energy1 = torch.bmm(flat, flat.transpose(1, 2)).view(n)
    lag1 = torch.bmm(flat[..., :-1], flat[..., 1:].transpose(1, 2)).view(n)
    energy2 = 2.0 * energy1 + 2.0 * lag1

    capped = step1[..., :usable].abs().clamp_(max=cap).reshape(n, 1, -1)
    ones = torch.ones(n, r * (usable // BLOCK), 1, dtype=capped.dtype, device=capped.device)
    # Per-phase sums (phase 7 = across block boundaries) as one batched matrix product.
    sums = torch.bmm(capped.view(n, -1, BLOCK).transpose(1, 2), ones).view(n, BLOCK)
    per_phase = sums / counts.clamp(min=1.0)
    boundary = per_phase[:, BLOCK - 1]
    interior = sums[:, : BLOCK - 1].sum(-1) / counts[: BLOCK - 1].sum().clamp(min=1.0)
    blockiness = (boundary + floor) / (interior + floor)

    activity = sums.sum(-1) / counts.sum().clamp(min=1.0)
    score = ((energy2 / energy1.clamp(min=1e-6) - 2.0) / 2.0).clamp(0.0, 1.0)
    blur = torch.where(activity >= min_activity, score, torch.full_like(score, float("nan")))
    return SpatialStats(blockiness=blockiness, blur=blur, activity=activity)
