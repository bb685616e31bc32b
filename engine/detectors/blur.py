"""Blurred picture: fine detail gone for a sustained time (defocus, upscaled low resolution, bad scaler)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detectors.base import DetectorConfig, SpatialThresholdDetector, positive, register, unit_interval
from engine.events import Severity


@dataclass(frozen=True)
class BlurConfig(DetectorConfig):
    """threshold: blur score 0 (sharp) .. 1 (smooth) above which a picture counts as blurred; pictures too
    flat to judge (black, slates) never count. rows: how many evenly spaced rows are
    analysed (a grid or a blur shows on every row; 54 rows of a 1080p picture measure it as well as all
    1080 at a twentieth of the cost). Ordinary programme
    scores 0.2-0.65; soft close-ups up to ~0.8; a Gaussian defocus of sigma 2 px on SD 0.8-0.85, sigma 3
    px 0.85-0.9, so the default catches strong defocus without flagging soft content."""

    onset: float = 3.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    threshold: float = 0.8
    rows: int = 54

    def __post_init__(self) -> None:
        super().__post_init__()
        unit_interval("threshold", self.threshold)
        positive("rows", self.rows)


@register
class BlurDetector(SpatialThresholdDetector):
    NAME = "blur"
    VERSION = "1.0"
    MEDIA = "video"
    NEEDS_EVERY_FRAME = False
    Config = BlurConfig
    METRIC = "blur"
    LABEL = "blurred"
