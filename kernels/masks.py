"""Region masks: which pixels of a plane an analysis looks at."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch


class Rect(Protocol):
    x: float
    y: float
    w: float
    h: float


def region_mask(height: int, width: int, ignore: Iterable[Rect], device: torch.device | str = "cpu") -> torch.Tensor:
    """(height, width) bool mask, True where pixels are analysed; `ignore` rectangles are in fractions of
    the picture so the same config fits every resolution and the small plane alike."""
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    for r in ignore:
        y0, y1 = int(r.y * height), min(height, int(round((r.y + r.h) * height + 0.4999)))
        x0, x1 = int(r.x * width), min(width, int(round((r.x + r.w) * width + 0.4999)))
        mask[y0:y1, x0:x1] = False
    return mask
