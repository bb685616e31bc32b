"""Pure helpers around the corruption CNN: its input plane and what its block map says."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def analysis_plane(luma: torch.Tensor) -> torch.Tensor:
    """(..., H, W) uint8 native luma -> (..., H/2, W/2) uint8, each pixel the rounded mean of a 2x2 square.

    Averaging by exactly two keeps the codec's block grid in place (a 16x16 macroblock becomes an 8x8 cell
    starting at a multiple of 8), which the CNN relies on; an odd last row or column is dropped."""
    t = torch.as_tensor(luma)
    h, w = (int(t.shape[-2]) // 2) * 2, (int(t.shape[-1]) // 2) * 2
    lead = t.shape[:-2]
    x = t[..., :h, :w].reshape(-1, 1, h, w).to(torch.float32)
    return F.avg_pool2d(x, 2).round_().to(torch.uint8).reshape(*lead, h // 2, w // 2)


def block_mask(rows: int, cols: int, ignore: tuple, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(rows, cols) bool: macroblocks left in the analysis (False inside any ignored region, given as objects
    with x, y, w, h fractions). None when nothing is ignored."""
    if not ignore:
        return None
    keep = torch.ones(rows, cols, dtype=torch.bool, device=device)
    for r in ignore:
        y0, y1 = math.floor(r.y * rows), math.ceil((r.y + r.h) * rows)
        x0, x1 = math.floor(r.x * cols), math.ceil((r.x + r.w) * cols)
        keep[y0:y1, x0:x1] = False
    return keep


def top_logits(block_logits: torch.Tensor, share: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, R, C) block logits -> (N,) frame logits: the mean of the k largest block logits, k = max(3, ceil(share *
    blocks)) (the label rule's minimum of damaged blocks, so frame and block outputs agree), ignored blocks left
    out. Differentiable: training uses it too."""
    flat = block_logits.flatten(1)
    n = flat.shape[1]
    if keep is not None:
        flat = flat.masked_fill(~keep.flatten().unsqueeze(0), -1e4)
        n = int(keep.sum())
    k = max(3, math.ceil(share * n))
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


def frame_scores(block_logits: torch.Tensor, share: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, R, C) block logits -> (N,) frame probabilities (see top_logits)."""
    return torch.sigmoid(top_logits(block_logits.float(), share, keep))


def damage_box(block_probs: torch.Tensor, level: float = 0.5) -> tuple[float, float, float, float] | None:
    """The bounding box (x, y, w, h as fractions of the picture) of the macroblocks at or above `level`, or of
    the single most likely block when none is; None for an empty map."""
    if block_probs.numel() == 0:
        return None
    rows, cols = block_probs.shape[-2:]
    hot = torch.nonzero(block_probs >= level)
    if len(hot) == 0:
        flat = int(torch.argmax(block_probs))
        hot = torch.tensor([[flat // cols, flat % cols]])
    y0, x0 = hot.min(0).values.tolist()
    y1, x1 = (hot.max(0).values + 1).tolist()
    return (x0 / cols, y0 / rows, (x1 - x0) / cols, (y1 - y0) / rows)
