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
    activity: torch.Tensor  # (N,) mean absolute one-pixel step in code values


def spatial_stats(
    luma: torch.Tensor, stride: int = 8, cap: float = 24.0, floor: float = 0.5, min_activity: float = 0.5
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
    """
    n = luma.shape[0]
    rows = luma[:, ::stride, :].to(torch.float32)
    step1 = rows[..., 1:] - rows[..., :-1]
    step2 = step1[..., 1:] + step1[..., :-1]
    d1 = step1.abs()
    usable = d1.shape[-1] // BLOCK * BLOCK
    capped = d1[..., :usable].clamp(max=cap)
    per_phase = capped.reshape(n, -1, BLOCK).mean(1)
    boundary = per_phase[:, BLOCK - 1]
    interior = per_phase[:, : BLOCK - 1].mean(-1)
    blockiness = (boundary + floor) / (interior + floor)

    activity = d1.reshape(n, -1).mean(-1)
    s1 = step1.square().reshape(n, -1).sum(-1)
    s2 = step2.square().reshape(n, -1).sum(-1)
    score = ((s2 / s1.clamp(min=1e-6) - 2.0) / 2.0).clamp(0.0, 1.0)
    blur = torch.where(activity >= min_activity, score, torch.full_like(score, float("nan")))
    return SpatialStats(blockiness=blockiness, blur=blur, activity=activity)
