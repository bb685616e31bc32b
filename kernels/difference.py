"""Frame-difference kernels on the small fixed-size luma plane: MAFD and glitch scores."""

from __future__ import annotations

import torch

from kernels.reduce import u8_sums


def mafd(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute frame difference per frame pair, in 8-bit code values.

    `a`, `b`: (N, h, w) uint8 (b may broadcast, e.g. (1, h, w)); `mask` (h, w) or (N, h, w) bool selects
    the pixels that count. This is freezedetect's MAFD (times 256 on its 0..1 scale) on one plane.
    """
    # |a - b| on uint8 without widening: max - min never wraps.
    diff = torch.maximum(a, b) - torch.minimum(a, b)
    if mask is not None:
        diff = diff * mask
    total = u8_sums(diff)
    count = diff[0].numel() if mask is None else mask.expand_as(diff[:1]).sum().clamp(min=1)
    return total / count


def difference_stats(
    a: torch.Tensor, b: torch.Tensor, level: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """mafd(a, b) and changed_fraction(a, b, level) from one pass over the absolute differences."""
    diff = torch.maximum(a, b) - torch.minimum(a, b)
    if mask is not None:
        diff = diff * mask
    count = diff[0].numel() if mask is None else mask.expand_as(diff[:1]).sum().clamp(min=1)
    mean = u8_sums(diff) / count
    hit = diff.clamp_(min=level, max=level + 1).sub_(level)
    if mask is not None:
        hit = hit * mask  # ignored pixels were 0 and became 0 again only if level == 0
    changed = u8_sums(hit) / count
    return mean, changed


def changed_fraction(a: torch.Tensor, b: torch.Tensor, level: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of pixels whose absolute difference exceeds `level` code values, per frame pair.

    Coding noise on a frozen picture spreads thin over the whole frame; real motion, even slow, moves whole
    objects. The fraction of clearly changed pixels separates the two where the mean does not.
    """
    diff = torch.maximum(a, b) - torch.minimum(a, b)
    # clamp(level, level + 1) - level is 1 where diff > level and 0 elsewhere: a 0/1 count in uint8
    # arithmetic, which CPU torch runs several times faster than a comparison into bool.
    hit = diff.clamp_(min=level, max=level + 1).sub_(level)
    if mask is not None:
        hit = hit * mask
    count = hit[0].numel() if mask is None else mask.expand_as(hit[:1]).sum().clamp(min=1)
    return u8_sums(hit) / count


def glitch_scores(seq: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Glitch evidence for the interior frames of a sequence (T, h, w) uint8 -> two (T-2,) tensors.

    A glitch frame differs from both neighbours while the neighbours agree with each other, so a cut (one
    large difference) or steady motion (neighbours differ as much as the frame) scores low. Returns
    (score, jump): score = min(d(t-1,t), d(t,t+1)) - d(t-1,t+1) and jump = min(d(t-1,t), d(t,t+1)),
    in code values.
    """
    prev, cur, nxt = seq[:-2], seq[1:-1], seq[2:]
    d_pc = mafd(prev, cur, mask)
    d_cn = mafd(cur, nxt, mask)
    d_pn = mafd(prev, nxt, mask)
    jump = torch.minimum(d_pc, d_cn)
    return jump - d_pn, jump


def activity(small: torch.Tensor) -> torch.Tensor:
    """Mean absolute horizontal step of each (N, h, w) uint8 picture: how much there is to see in it."""
    d = torch.maximum(small[..., 1:], small[..., :-1]) - torch.minimum(small[..., 1:], small[..., :-1])
    return u8_sums(d) / d[0].numel()
