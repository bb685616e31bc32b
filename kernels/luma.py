"""Per-frame luma statistics over (N, H, W) uint8 batches: black fraction and mean level."""

from __future__ import annotations

import math

import torch

_HIGH = -0x7F7F7F7F7F7F7F80  # 0x8080808080808080 as a signed int64
_ONES = 0x0101010101010101
_LANE_SUM = 255  # words summed before a byte lane could overflow


def black_pixel_threshold(pix_th: float, full_range: bool) -> int:
    """FFmpeg blackdetect's integer pixel threshold: a pixel is black when luma <= this value."""
    if full_range:
        return int(pix_th * 255)
    return int(16 + pix_th * (235 - 16))


def _byte_lane_sum(words: torch.Tensor) -> torch.Tensor:
    """Sum the bytes of (N, M) int64 words whose bytes are each 0 or 1 -> (N,) int64."""
    n, m = words.shape
    full = m // _LANE_SUM * _LANE_SUM
    # Summing at most 255 words keeps every byte lane below 256, so lanes never carry into each other.
    parts = [words[:, :full].reshape(n, -1, _LANE_SUM).sum(-1)] if full else []
    if full < m:
        parts.append(words[:, full:].sum(-1, keepdim=True))
    part = torch.cat(parts, dim=1)
    total = torch.zeros(n, dtype=torch.int64, device=words.device)
    for lane in range(8):
        total += ((part >> (8 * lane)) & 0xFF).sum(-1)
    return total


def black_fraction(luma: torch.Tensor, threshold: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of pixels with luma <= threshold, per frame: (N, H, W) uint8 -> (N,) float32.

    `mask` (H, W) or (N, H, W) bool selects the pixels that count (True = analysed); the fraction is taken
    over those pixels only, so an ignored logo or clock neither helps nor hurts.
    """
    n = luma.shape[0]
    pixels = luma[0].numel()
    if 0 <= threshold < 127 and pixels % 8 == 0 and luma.is_contiguous():
        black = _black_count_packed(luma.reshape(n, -1), threshold, mask)
    else:
        hit = luma <= threshold
        if mask is not None:
            hit = hit & mask
        black = hit.reshape(n, -1).sum(-1)
    if mask is None:
        total = torch.full((n,), pixels, dtype=torch.float32, device=luma.device)
    else:
        total = mask.reshape(-1, pixels).sum(-1).to(torch.float32).expand(n)
    return black.to(torch.float32) / total.clamp(min=1)


def _black_count_packed(flat: torch.Tensor, threshold: int, mask: torch.Tensor | None) -> torch.Tensor:
    # CPU torch runs comparisons into bool tensors an order of magnitude slower than integer bit
    # operations, so the test "byte <= threshold" is done on eight pixels at a time in int64 words:
    # for a byte b < 128, (b | 0x80) - (threshold + 1) keeps its high bit iff b > threshold, and no
    # borrow crosses bytes because every byte is >= 0x80 > threshold + 1.
    words = flat.view(torch.int64)
    step = _ONES * (threshold + 1)
    t = (words | _HIGH) - step
    black = ~(words | t) & _HIGH  # high bit set iff b < 128 and b <= threshold
    if mask is not None:
        mwords = mask.reshape(-1, flat.shape[1]).to(torch.uint8).mul_(0x80).view(torch.int64)
        black = black & mwords
    ones = (black >> 7) & _ONES
    return _byte_lane_sum(ones)


def luma_mean(luma: torch.Tensor) -> torch.Tensor:
    """Mean luma per frame, (N, H, W) uint8 -> (N,) float32 (0..255)."""
    n = luma.shape[0]
    flat = luma.reshape(n, -1)
    return flat.sum(-1, dtype=torch.int64).to(torch.float32) / max(1, flat.shape[1])


def level_to_db(value: torch.Tensor | float, full_scale: float = 255.0) -> torch.Tensor | float:
    """A difference or level in 8-bit code values as dB relative to full scale (FFmpeg's -60 dB = 0.001)."""
    if isinstance(value, torch.Tensor):
        return 20.0 * torch.log10((value / full_scale).clamp(min=1e-9))
    return 20.0 * math.log10(max(value / full_scale, 1e-9))
