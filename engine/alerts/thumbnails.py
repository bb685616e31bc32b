"""JPEG thumbnails for alerts, made from the small plane the scoring step already has."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def small_to_rgb(y: torch.Tensor, uv: torch.Tensor | None) -> np.ndarray:
    """(h, w) luma and optional (2, h/2, w/2) chroma, limited range BT.601 -> (h, w, 3) uint8 RGB."""
    yf = y.detach().to("cpu", torch.float32).numpy()
    if uv is None:
        g = np.clip((yf - 16.0) * (255.0 / 219.0), 0, 255).astype(np.uint8)
        return np.stack([g, g, g], axis=-1)
    c = uv.detach().to("cpu", torch.float32).numpy() - 128.0
    u = np.repeat(np.repeat(c[0], 2, axis=0), 2, axis=1)[: yf.shape[0], : yf.shape[1]]
    v = np.repeat(np.repeat(c[1], 2, axis=0), 2, axis=1)[: yf.shape[0], : yf.shape[1]]
    yy = (yf - 16.0) * 1.164
    rgb = np.stack([yy + 1.596 * v, yy - 0.392 * u - 0.813 * v, yy + 2.017 * u], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


class ThumbnailWriter:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def write(self, stream: str, event_id: str, y: torch.Tensor, uv: torch.Tensor | None) -> str | None:
        """Write the thumbnail and return its path; a failure is logged and the alert goes out without one."""
        try:
            folder = self.directory / _SAFE.sub("_", stream)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{event_id}.jpg"
            Image.fromarray(small_to_rgb(y, uv)).save(path, quality=85)
            return str(path)
        except Exception as exc:
            log.error("thumbnail for %s/%s failed: %s", stream, event_id, exc)
            return None
