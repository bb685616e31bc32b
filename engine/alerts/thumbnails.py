"""JPEG thumbnails for alerts, from the picture that was on screen when the alert fired."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from engine.media import VideoFrame

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def tile_jpeg(frame: VideoFrame, width: int) -> bytes:
    """The picture as a small JPEG at most `width` wide (the mosaic's tiles)."""
    import io

    img = Image.fromarray(frame_rgb(frame))
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def frame_rgb(frame: VideoFrame) -> np.ndarray:
    """(h, w, 3) uint8: the decoder's colour rendering when it offers one, else the small luma as grey."""
    if frame.rgb is not None:
        return frame.rgb()
    y = frame.small.detach().to("cpu").numpy().astype(np.float32)
    g = np.clip((y - 16.0) * (255.0 / 219.0), 0, 255).astype(np.uint8)
    return np.stack([g, g, g], axis=-1)


class ThumbnailWriter:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def write(self, stream: str, event_id: str, frame: VideoFrame) -> str | None:
        """Write the thumbnail and return its path; a failure is logged and the alert goes out without one."""
        try:
            folder = self.directory / _SAFE.sub("_", stream)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{event_id}.jpg"
            Image.fromarray(frame_rgb(frame)).save(path, quality=85)
            return str(path)
        except Exception as exc:
            log.error("thumbnail for %s/%s failed: %s", stream, event_id, exc)
            return None


def mark_box(path: str, box: tuple[float, float, float, float]) -> None:
    """Outline a region (x, y, w, h fractions) on a written thumbnail: where the corruption model saw damage."""
    from engine.review import draw_box

    try:
        img = Image.open(path).convert("RGB")
        draw_box(img, box)
        img.save(path, quality=85)
    except Exception as exc:
        log.error("marking thumbnail %s failed: %s", path, exc)
