"""Phase: the front left and right channels sustainedly anti-correlated (one channel's polarity inverted, a
miswired pair): the sound collapses in mono downmixes and goes hollow in stereo."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, positive, register
from engine.detectors.windows import SpanSums
from engine.events import Severity


@dataclass(frozen=True)
class PhaseConfig(DetectorConfig):
    """The L/R correlation over `span` seconds (-1: one channel is the other inverted, 0: unrelated, +1:
    mono) below `threshold` is a phase fault, judged only while both channels are above level_db (dBFS RMS
    over the span). Stereo programme sits between about 0 and +1; below -0.3 for seconds means trouble."""

    onset: float = 2.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    threshold: float = -0.3
    span: float = 1.0
    level_db: float = -50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("span", self.span)
        if not -1.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be within -1..1, not {self.threshold}")


def _correlation(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Columns (L*R, L*L, R*R) -> correlation; NaN where a channel is silent."""
    den = np.sqrt(sums[:, 1] * sums[:, 2])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, sums[:, 0] / den, np.nan)


def _anti(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Faultiness of a side of a split: minus the mean of its windows' own correlations (columns 3, 4).
    Each audible window counts once, however loud, so a quiet stretch next to the change cannot hide on
    either side of it."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[:, 4] > 0, -sums[:, 3] / sums[:, 4], np.nan)


@register
class PhaseDetector(Detector):
    NAME = "phase"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = PhaseConfig

    def __init__(self, config: PhaseConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.power = 10 ** (config.level_db / 10.0)
        self.sums: SpanSums | None = None
        self.was_faulty = False
        self.hyst.higher_is_worse = False

    def threshold(self) -> float:
        return self.config.threshold

    def message(self, value: float | None) -> str:
        return "L/R out of phase" if value is None else f"L/R out of phase (correlation {value:.2f})"

    def _window_flipped(self, cols: np.ndarray) -> np.ndarray:
        return cols[:, 3] < self.config.threshold  # a window's own correlation (0 when inaudible)

    def on_audio(self, m: AudioMetrics) -> None:
        if m.pair is None or m.cross is None:
            return  # mono: no pair to judge
        span = max(1, round(self.config.span / m.window))
        if self.sums is None or m.restart:
            self.sums = SpanSums(span, 3 * span, 5)
            self.was_faulty = False
        left, right = m.pair
        ll, rr = m.mean_square[left], m.mean_square[right]
        audible = (ll > self.power) & (rr > self.power)
        with np.errstate(invalid="ignore", divide="ignore"):
            own = np.where(audible, m.cross / np.sqrt(ll * rr), 0.0)
        cols = np.stack([m.cross, ll, rr, own, audible.astype(np.float64)], axis=1)
        sums, count = self.sums.push(m.times, cols)
        corr = _correlation(sums, count)
        loud = (sums[:, 1] / count > self.power) & (sums[:, 2] / count > self.power)
        with np.errstate(invalid="ignore"):
            faulty = loud & (corr < self.config.threshold)
        starts = m.times.copy()
        for i in np.flatnonzero(faulty != np.concatenate(([self.was_faulty], faulty[:-1]))):
            starts[i] = self.sums.change_point(float(m.times[i]), 2 * self.config.span, _anti, bool(faulty[i]), m.window,
                                               valid_col=4, faulty_like=self._window_flipped)
        if len(faulty):
            self.was_faulty = bool(faulty[-1])
        self.hyst.update(starts, m.times + m.window, faulty, corr)
