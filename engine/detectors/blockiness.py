"""Blocky picture: a visible 8x8 block grid (heavy compression, concealed packet loss, pixelation)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detectors.base import DetectorConfig, SpatialThresholdDetector, positive, register
from engine.events import Severity


@dataclass(frozen=True)
class BlockinessConfig(DetectorConfig):
    """threshold: block-boundary step over in-block step (about 1 for clean pictures, 1.2-1.6 for coded
    video at ordinary bit rates, well above 2 for blocky pictures); rows: how many evenly spaced rows are
    analysed (a grid or a blur shows on every row; 54 rows of a 1080p picture measure it as well as all
    1080 at a twentieth of the cost)."""

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
class BlockinessDetector(SpatialThresholdDetector):
    NAME = "blockiness"
    VERSION = "1.0"
    MEDIA = "video"
    NEEDS_EVERY_FRAME = False
    Config = BlockinessConfig
    METRIC = "blockiness"
    LABEL = "blocky"
