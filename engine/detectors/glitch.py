"""Glitch frames: single pictures that belong to neither neighbour (garbage, a frame from elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import Detector, DetectorConfig, MetricRequest, VideoMetrics, positive, register
from engine.events import Severity


@dataclass(frozen=True)
class GlitchConfig(DetectorConfig):
    """A frame is a glitch when its mean difference (code values, small plane) to both neighbours is at
    least min_jump and exceeds the neighbours' difference to each other by at least min_score. Glitches
    count from the first one (onset 0); glitches closer together than `recovery` are one event."""

    onset: float = 0.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    min_jump: float = 20.0
    min_score: float = 15.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("min_jump", self.min_jump)
        positive("min_score", self.min_score)


@register
class GlitchDetector(Detector):
    NAME = "glitch"
    VERSION = "1.0"
    MEDIA = "video"
    Config = GlitchConfig

    def __init__(self, config: GlitchConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest("glitch", (("min_jump", config.min_jump),), config.ignore)
        self.count = 0

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float:
        return self.config.min_score

    def message(self, value: float | None) -> str:
        return "glitch frames"

    def on_video(self, m: VideoMetrics) -> None:
        score = m.get(self.request, "score")
        jump = m.get(self.request, "jump")
        # NaN (no neighbours to compare, or a jump too small to score) is never a glitch: NaN >= x is False.
        with np.errstate(invalid="ignore"):
            faulty = (np.greater_equal(score, self.config.min_score)) & (np.greater_equal(jump, self.config.min_jump))
        self.count += int(faulty.sum())
        self.hyst.update(m.pts, m.pts + m.duration, faulty, score)
