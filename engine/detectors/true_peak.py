"""True peak over the ceiling: the reconstructed (4x oversampled) signal goes above the standard's maximum
true peak, which distorts in converters and lossy encoders even when no sample clips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.detectors.loudness import standard
from engine.events import Severity


@dataclass(frozen=True)
class TruePeakConfig(DetectorConfig):
    """The ceiling is the standard's maximum true peak ('ebu_r128': -1 dBTP, 'atsc_a85': -2 dBTP) unless
    max_dbtp is set. Any over raises the event (onset 0); overs closer together than recovery are one."""

    onset: float = 0.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    standard: str = "ebu_r128"
    max_dbtp: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        standard(self.standard)

    @property
    def ceiling(self) -> float:
        return self.max_dbtp if self.max_dbtp is not None else standard(self.standard).true_peak_max


@register
class TruePeakDetector(Detector):
    NAME = "true_peak"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = TruePeakConfig

    def __init__(self, config: TruePeakConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.ceiling / 20.0)

    def threshold(self) -> float:
        return self.config.ceiling

    def message(self, value: float | None) -> str:
        return "true peak over the ceiling" if value is None else f"true peak {value:.1f} dBTP"

    def on_audio(self, m: AudioMetrics) -> None:
        if m.true_peak is None:
            return
        tp = m.true_peak.max(axis=0)
        t = m.times
        self.hyst.update(t, t + m.window, tp > self.level, 20 * np.log10(np.maximum(tp, 1e-10)))
