"""Clipping: runs of samples stuck at full scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.events import Severity


@dataclass(frozen=True)
class ClippingConfig(DetectorConfig):
    """A sample is clipped when |sample| >= level (linear) and belongs to a run of at least min_run such
    samples in a channel; a 5 ms window with any clipped sample is faulty. Clipping that lasts onset
    seconds raises the event; gaps shorter than recovery keep it open. The default level, 0.891 (-1 dBFS,
    EBU R128's peak ceiling), catches clipping that went through a lossy codec, whose flat tops come back
    at -0.3 to -0.6 dBFS with ripple; use 0.999 to count only digital overs in PCM."""

    onset: float = 0.1
    recovery: float = 0.5
    severity: Severity = Severity.WARNING
    level: float = 0.891
    min_run: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.level <= 1.0:
            raise ValueError(f"level must be within (0, 1], not {self.level}")
        if self.min_run < 1:
            raise ValueError(f"min_run must be >= 1, not {self.min_run}")


@register
class ClippingDetector(Detector):
    NAME = "clipping"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = ClippingConfig

    def __init__(self, config: ClippingConfig, ctx) -> None:
        super().__init__(config, ctx)
        # The true peak reached while the event is open tells how hard the signal hits the ceiling.
        self.event_true_peak = float("nan")
        self.hyst.details = self._details

    def _details(self) -> dict[str, object]:
        tp, self.event_true_peak = self.event_true_peak, float("nan")
        return {} if np.isnan(tp) else {"true_peak_dbtp": round(20 * float(np.log10(max(tp, 1e-10))), 2)}

    def threshold(self) -> float:
        return self.config.level

    def message(self, value: float | None) -> str:
        return "clipping" if value is None else f"clipping ({int(value)} clipped samples per 5 ms at worst)"

    def on_audio(self, m: AudioMetrics) -> None:
        counts = m.clipped.max(axis=0)
        t = m.times
        hot = counts > 0
        if m.true_peak is not None and hot.any():
            # Gathered before the update, which may open and resolve the event within this tick.
            self.event_true_peak = float(np.fmax(self.event_true_peak, m.true_peak[:, hot].max()))
        self.hyst.update(t, t + m.window, hot, counts.astype(float))
        if not self.hyst.active and self.hyst.pending_start is None:
            self.event_true_peak = float("nan")
