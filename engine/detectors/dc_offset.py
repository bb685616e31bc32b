"""DC offset: a channel whose average sample value sits away from zero (a faulty converter or mixer input)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, below_full_scale, positive, register
from engine.detectors.windows import SpanSums
from engine.events import Severity


@dataclass(frozen=True)
class DcOffsetConfig(DetectorConfig):
    """A channel has a DC offset when the mean of its samples over `span` seconds is beyond threshold_db
    (dBFS, as an amplitude: -40 dBFS is 1 % of full scale). Programme audio averages to well under -60 dBFS
    over a second; a converter fault or a stuck mixer input shows as a constant offset."""

    onset: float = 2.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    threshold_db: float = -40.0
    span: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("span", self.span)
        below_full_scale("threshold_db", self.threshold_db)


@register
class DcOffsetDetector(Detector):
    NAME = "dc_offset"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = DcOffsetConfig

    def __init__(self, config: DcOffsetConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.threshold_db / 20.0)
        self.sums: SpanSums | None = None
        self.was_faulty = False
        self.channel = 0

    def threshold(self) -> float:
        return self.config.threshold_db

    def message(self, value: float | None) -> str:
        return "DC offset" if value is None else f"DC offset ({value:.1f} dBFS)"

    def on_audio(self, m: AudioMetrics) -> None:
        c, w = m.mean.shape
        span = max(1, round(self.config.span / m.window))
        if self.sums is None or self.sums.cols != c or m.restart:
            self.sums = SpanSums(span, 3 * span, c)
            self.was_faulty = False
        sums, count = self.sums.push(m.times, m.mean.T)
        dc = np.abs(sums / count[:, None])  # (w, c) mean over the span
        worst = dc.max(axis=1)
        faulty = worst > self.level
        starts = m.times.copy()
        for i in np.flatnonzero(faulty != np.concatenate(([self.was_faulty], faulty[:-1]))):
            ch = int(dc[i].argmax()) if faulty[i] else self.channel
            self.channel = ch
            starts[i] = self.sums.change_point(float(m.times[i]), 2 * self.config.span, _mean_abs(ch), bool(faulty[i]), m.window)
        self.was_faulty = bool(faulty[-1]) if w else self.was_faulty
        values = 20 * np.log10(np.maximum(worst, 1e-10))
        self.hyst.update(starts, m.times + m.window, faulty, values)


def _mean_abs(ch: int):
    """Faultiness of a split side: |mean| of channel ch, from its sums and the side's window count."""

    def stat(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return np.abs(sums[:, ch]) / np.maximum(counts, 1)

    return stat
