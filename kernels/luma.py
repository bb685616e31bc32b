"""Per-frame luma statistics over (N, H, W) uint8 batches: black fraction and mean level."""

from __future__ import annotations

import numpy as np
import torch

from kernels.reduce import u8_sums


def black_pixel_threshold(pix_th: float, full_range: bool) -> int:
    """FFmpeg blackdetect's integer pixel threshold: a pixel is black when luma <= this value."""
    if full_range:
        return int(pix_th * 255)
    return int(16 + pix_th * (235 - 16))


def black_fraction(luma: torch.Tensor, threshold: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of pixels with luma <= threshold, per frame: (N, H, W) uint8 -> (N,) float32.

    `mask` (H, W) or (N, H, W) bool selects the pixels that count (True = analysed); the fraction is taken
    over those pixels only, so an ignored logo or clock neither helps nor hurts.
    """
    n = luma.shape[0]
    pixels = luma[0].numel()
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(n, -1, -1)
    if luma.device.type == "cpu":
        # CPU torch reduces bool tensors an order of magnitude slower than NumPy's count_nonzero, and this
        # runs on every dark 1080p frame while the same cores decode; same result, exact.
        a = luma.numpy()
        m = None if mask is None else mask.numpy()
        black = torch.tensor(
            [np.count_nonzero(a[i] <= threshold if m is None else (a[i] <= threshold) & m[i]) for i in range(n)],
            dtype=torch.float32,
        )
    else:
        hit = luma <= threshold
        if mask is not None:
            hit = hit & mask
        black = hit.reshape(n, -1).sum(-1).to(torch.float32)
    if mask is None:
        total = torch.full((n,), float(pixels), device=luma.device)
    else:
        total = mask.reshape(n, -1).sum(-1).to(torch.float32)
    return black.to(luma.device) / total.clamp(min=1)


def luma_mean(luma: torch.Tensor) -> torch.Tensor:
    """Mean luma per frame, (N, H, W) uint8 -> (N,) float32 (0..255)."""
    return u8_sums(luma) / max(1, luma.shape[1:].numel())
