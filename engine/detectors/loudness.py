"""Loudness out of range: EBU R128 / ITU-R BS.1770 loudness too high or too low for a sustained time.

The decision uses the short-term (3 s) or momentary (400 ms) loudness, which react late by design. To report
when the fault really began and ended, the edges are placed on the 5 ms windows: the fault starts at the
first window, within the measure's span before the crossing, whose own loudness is beyond the limit, and
ends after the last such window before the measure came back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.events import Severity

SPANS = {"momentary": 0.4, "short_term": 3.0}


@dataclass(frozen=True, slots=True)
class Standard:
    """A loudness recommendation: programme target, the tolerance of the integrated loudness around it,
    and the maximum true peak."""

    target: float  # LUFS (LKFS)
    tolerance: float  # LU either side of the target, for the integrated (programme) loudness
    true_peak_max: float  # dBTP


# EBU R128 (2020): -23 LUFS, +-1 LU where exact normalisation is not possible (live), -1 dBTP.
# ATSC A/85 (2013): -24 LKFS, +-2 dB, -2 dBTP.
STANDARDS = {"ebu_r128": Standard(-23.0, 1.0, -1.0), "atsc_a85": Standard(-24.0, 2.0, -2.0)}


def standard(name: str) -> Standard:
    if name not in STANDARDS:
        raise ValueError(f"standard must be one of {sorted(STANDARDS)}, not {name!r}")
    return STANDARDS[name]


@dataclass(frozen=True)
class LoudnessConfig(DetectorConfig):
    """standard: 'ebu_r128' (target -23 LUFS, +-1 LU, -1 dBTP) or 'atsc_a85' (-24 LKFS, +-2 dB, -2 dBTP);
    target and tolerance override the standard's (LUFS, LU). Loudness is faulty when the chosen measure
    ('short_term' or 'momentary') is above target + upper LU, or below target - lower LU (lower: None = no
    low-loudness check; silence has its own detector). Audio below -70 LUFS (gated silence) never counts
    as too quiet. The integrated loudness is judged against target +- tolerance in reports."""

    onset: float = 2.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    standard: str = "ebu_r128"
    target: float | None = None
    tolerance: float | None = None
    upper: float = 6.0
    lower: float | None = None
    measure: str = "short_term"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.measure not in SPANS:
            raise ValueError(f"measure must be one of {sorted(SPANS)}, not {self.measure!r}")
        standard(self.standard)
        if self.tolerance is not None and self.tolerance <= 0:
            raise ValueError(f"tolerance must be > 0 LU, not {self.tolerance}")

    @property
    def target_lufs(self) -> float:
        return self.target if self.target is not None else standard(self.standard).target

    @property
    def tolerance_lu(self) -> float:
        return self.tolerance if self.tolerance is not None else standard(self.standard).tolerance


@register
class LoudnessDetector(Detector):
    NAME = "loudness"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = LoudnessConfig

    def __init__(self, config: LoudnessConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.high = config.target_lufs + config.upper
        self.low = None if config.lower is None else config.target_lufs - config.lower
        self.span = SPANS[config.measure]
        # Recent 5 ms windows (time, loudness of the window itself) to place the edges of a fault.
        self.recent: deque[tuple[float, float]] = deque()
        self.was_faulty = False

    def threshold(self) -> float:
        return self.high

    def message(self, value: float | None) -> str:
        if value is None:
            return "loudness out of range"
        side = "high" if value > self.config.target_lufs else "low"
        return f"loudness too {side} ({value:.1f} LUFS {self.config.measure.replace('_', '-')})"

    def _window_faulty(self, lufs: float) -> bool:
        if lufs > self.high:
            return True
        return self.low is not None and -70.0 < lufs < self.low

    def _edge(self, before: float, rising: bool, window: float) -> float:
        """Rising: the start of the first faulty window in the span before `before`; falling: the end of the
        last faulty window in that span. Falls back to the crossing itself when no window qualifies."""
        lo = before - self.span - window
        hits = [t for t, lufs in self.recent if lo <= t < before and self._window_faulty(lufs)]
        if rising:
            # the first faulty window after the last clean stretch leading up to the crossing
            clean = [t for t, lufs in self.recent if lo <= t < before and not self._window_faulty(lufs)]
            after = [t for t in hits if not clean or t > max(clean)]
            return min(after) if after else (min(hits) if hits else before)
        return max(hits) + window if hits else before

    def on_audio(self, m: AudioMetrics) -> None:
        measure = m.short_term if self.config.measure == "short_term" else m.momentary
        t = m.times
        own = -0.691 + 10 * np.log10(np.maximum(m.window_power, 1e-20))
        # The slow measure decides; the momentary loudness must agree, so a fault ends within 400 ms of the
        # audio coming back instead of when it has left the 3 s window, and a short burst cannot stretch
        # into an event longer than itself.
        faulty = (measure > self.high) & (m.momentary > self.high)
        if self.low is not None:
            faulty |= (measure < self.low) & (m.momentary < self.low) & (measure > -70.0)
        starts = t.astype(np.float64).copy()
        for w in range(len(t)):
            self.recent.append((float(t[w]), float(own[w])))
            if faulty[w] != self.was_faulty:
                starts[w] = self._edge(float(t[w]), bool(faulty[w]), m.window)
                self.was_faulty = bool(faulty[w])
        horizon = float(t[-1]) - self.span - 2 * m.window if len(t) else 0.0
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        values = np.where(np.isfinite(measure), measure, np.nan)
        self.hyst.update(starts, t + m.window, faulty, values)
