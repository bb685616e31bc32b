"""Clipping: runs of samples stuck at full scale."""

from __future__ import annotations

from dataclasses import dataclass

from engine.detectors.base import AudioMetrics, DetectorConfig, Detector, register
from engine.events import Severity


@dataclass(frozen=True)
class ClippingConfig(DetectorConfig):
    """A sample is clipped when |sample| >= level (linear, 0.999 = -0.009 dBFS) and belongs to a run of at
    least min_run such samples in a channel; a 5 ms window with any clipped sample is faulty. Clipping that
    lasts onset seconds raises the event; gaps shorter than recovery keep it open."""

    onset: float = 0.1
    recovery: float = 0.5
    severity: Severity = Severity.WARNING
    level: float = 0.999
    min_run: int = 3


@register
class ClippingDetector(Detector):
    NAME = "clipping"
    VERSION = "1.0"
    MEDIA = "audio"
    Config = ClippingConfig

    def threshold(self) -> float:
        return self.config.level

    def message(self, value: float | None) -> str:
        return "clipping" if value is None else f"clipping ({int(value)} clipped samples per 5 ms at worst)"

    def on_audio(self, m: AudioMetrics) -> None:
        counts = m.clipped.max(axis=0)
        t = m.times
        self.hyst.update(t, t + m.window, counts > 0, counts.astype(float))
