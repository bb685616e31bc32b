"""Black picture: most of the picture at or below black level (FFmpeg blackdetect's rule)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detectors.base import Detector, DetectorConfig, MetricRequest, VideoMetrics, register
from engine.detectors.base import unit_interval as _unit
from engine.events import Severity


@dataclass(frozen=True)
class BlackConfig(DetectorConfig):
    """pix_th: a pixel is black when luma <= 16 + pix_th * 219 (limited range) or pix_th * 255 (full range);
    pic_th: a picture is black when at least this fraction of its (not ignored) pixels is black.
    Defaults are blackdetect's: pix_th 0.10, pic_th 0.98, 2 s."""

    onset: float = 2.0
    recovery: float = 0.5
    severity: Severity = Severity.CRITICAL
    pix_th: float = 0.10
    pic_th: float = 0.98

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit("pix_th", self.pix_th)
        _unit("pic_th", self.pic_th)


@register
class BlackDetector(Detector):
    NAME = "black"
    VERSION = "1.0"
    MEDIA = "video"
    NEEDS_EVERY_FRAME = False
    Config = BlackConfig

    def __init__(self, config: BlackConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest("black", (("pix_th", config.pix_th), ("pic_th", config.pic_th)), config.ignore)

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float:
        return self.config.pic_th

    def message(self, value: float | None) -> str:
        return "black picture" if value is None else f"black picture ({value:.1%} of pixels black)"

    def on_video(self, m: VideoMetrics) -> None:
        fraction = m.get(self.request, "fraction")
        self.hyst.update(m.pts, m.pts + m.duration, fraction >= self.config.pic_th, fraction)
