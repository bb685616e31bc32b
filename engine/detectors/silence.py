"""Silence: every channel below the noise level (FFmpeg silencedetect's rule, channels combined)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, below_full_scale, register
from engine.events import Severity


@dataclass(frozen=True)
class SilenceConfig(DetectorConfig):
    """noise_db: a sample is silent when |sample| < 10^(noise_db/20) of full scale; audio is silent when
    every channel is. Defaults are silencedetect's: -60 dB, 2 s."""

    onset: float = 2.0
    recovery: float = 0.0
    severity: Severity = Severity.MAJOR
    noise_db: float = -60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        below_full_scale("noise_db", self.noise_db)


@register
class SilenceDetector(Detector):
    NAME = "silence"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = SilenceConfig

    def __init__(self, config: SilenceConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.noise_db / 20.0)
        self.hyst.higher_is_worse = False

    def threshold(self) -> float:
        return self.config.noise_db

    def message(self, value: float | None) -> str:
        return "silence" if value is None else f"silence (peak {value:.1f} dBFS)"

    def on_audio(self, m: AudioMetrics) -> None:
        peak = m.peak.max(axis=0)  # loudest channel
        silent = peak < self.level
        t = m.times
        peak_db = 20 * np.log10(np.maximum(peak, 1e-10))
        self.hyst.update(t, t + m.window, silent, peak_db)
