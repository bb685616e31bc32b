"""Blocky picture: a visible 8x8 block grid (heavy compression, concealed packet loss, pixelation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import Detector, DetectorConfig, MetricRequest, VideoMetrics, positive, register
from engine.events import Severity


@dataclass(frozen=True)
class BlockinessConfig(DetectorConfig):
    """threshold: block-boundary step over in-block step (about 1 for clean pictures, 1.2-1.6 for coded
    video at ordinary bit rates, well above 2 for blocky pictures); rows: how many evenly spaced rows are analysed (a grid or a blur shows on every row; 54 rows of a
    1080p picture measure it as well as all 1080 at a twentieth of the cost)."""

    onset: float = 1.0
    recovery: float = 0.5
    severity: Severity = Severity.MAJOR
    threshold: float = 2.2
    rows: int = 54

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("threshold", self.threshold)
        positive("rows", self.rows)


@register
class BlockinessDetector(Detector):
    NAME = "blockiness"
    VERSION = "1.0"
    MEDIA = "video"
    Config = BlockinessConfig

    def __init__(self, config: BlockinessConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest("spatial", (("rows", config.rows),), config.ignore)

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float:
        return self.config.threshold

    def message(self, value: float | None) -> str:
        return "blocky picture" if value is None else f"blocky picture (blockiness {value:.2f})"

    def on_video(self, m: VideoMetrics) -> None:
        b = m.get(self.request, "blockiness")
        self.hyst.update(m.pts, m.pts + m.duration, np.nan_to_num(b) >= self.config.threshold, b)
