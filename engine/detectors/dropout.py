"""Dropout: programme audio that suddenly falls to (near) digital zero for a moment and comes back, the mark
of lost audio packets, a bad embedder or a failing link. Longer gaps are the silence detector's."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.events import Severity


@dataclass(frozen=True)
class DropoutConfig(DetectorConfig):
    """A dropout is a gap of at least min_gap seconds in which every channel stays below level_db (dBFS
    peak: near digital zero) that cuts programme audio off: the audio before it (`before` seconds) was
    above programme_db (dBFS RMS) and its last 5 ms above sudden_db, so a fade-out or a pause between
    sounds is not one. It is reported once the audio is back, with the gap's start and end; a gap of
    max_gap or longer (keep it at the silence onset) is a silence, not a dropout. (onset and recovery are
    not used: the gap's own length decides.)"""

    severity: Severity = Severity.MAJOR
    level_db: float = -80.0
    min_gap: float = 0.02
    max_gap: float = 2.0
    programme_db: float = -45.0
    sudden_db: float = -55.0
    before: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.min_gap < self.max_gap:
            raise ValueError("need 0 < min_gap < max_gap")
        if not self.level_db < self.sudden_db:
            raise ValueError("level_db must be below sudden_db")


@register
class DropoutDetector(Detector):
    NAME = "dropout"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    THUMBNAIL = False
    Config = DropoutConfig

    def __init__(self, config: DropoutConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.level_db / 20.0)
        self.programme = 10 ** (config.programme_db / 10.0)
        self.sudden = 10 ** (config.sudden_db / 10.0)
        self.recent: deque[float] = deque()  # mean square (loudest channel) of the windows before a gap
        self.gap_start: float | None = None
        self.gap_qualifies = False
        self.last_t = 0.0

    def threshold(self) -> float:
        return self.config.level_db

    def message(self, value: float | None) -> str:
        return "audio dropout" if value is None else f"audio dropout ({value * 1000:.0f} ms)"

    def on_audio(self, m: AudioMetrics) -> None:
        if m.restart:
            self.gap_start = None  # a gap in the container is not a dropout inside the programme
            self.recent.clear()
        keep = max(1, round(self.config.before / m.window))
        zero = m.peak.max(axis=0) < self.level
        power = m.mean_square.max(axis=0)
        t = m.times
        for i in range(len(t)):
            if zero[i]:
                if self.gap_start is None:
                    self.gap_start = float(t[i])
                    before = np.fromiter(self.recent, float)
                    self.gap_qualifies = (
                        len(before) == keep and before.mean() > self.programme and before[-1] > self.sudden)
                continue
            if self.gap_start is not None:
                length = float(t[i]) - self.gap_start
                if self.gap_qualifies and self.config.min_gap - 1e-9 <= length < self.config.max_gap - 1e-9:
                    event = self._make_event(self.gap_start, length)
                    self._emit(event)
                    self._emit(event.resolved(float(t[i]), length))
                self.gap_start = None
                self.recent.clear()
            self.recent.append(float(power[i]))
            if len(self.recent) > keep:
                self.recent.popleft()
        if len(t):
            self.last_t = float(t[-1]) + m.window

    def finish(self, end_time: float | None) -> None:
        # A gap still open at the end of input did not come back: not a dropout (the silence detector and
        # the end of input say what happened).
        self.gap_start = None
