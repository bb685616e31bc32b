"""Clicks and pops: isolated impulses in the audio (bit errors, a bad edit, a failing buffer or converter),
placed on their exact sample. Clicks closer together than `recovery` are one event with their count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.events import Event, Severity
from engine.media import AUDIO_RATE
from kernels.clicks import CLICK_LEVEL, CLICK_SCORE

TAIL = 0.05  # seconds before the end of the audio seen so far in which a click waits for more audio


@dataclass(frozen=True)
class ClicksConfig(DetectorConfig):
    """A click is an impulse that stands score times above the local prediction residual (see
    kernels/clicks.py) with an amplitude over level_db (dBFS; quieter ones are inaudible). The event opens
    on the first click and resolves when none came for recovery seconds (onset is not used)."""

    onset: float = 0.0
    recovery: float = 1.0
    severity: Severity = Severity.WARNING
    score: float = CLICK_SCORE
    level_db: float = round(20 * float(np.log10(CLICK_LEVEL)), 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score <= 0:
            raise ValueError(f"score must be > 0, not {self.score}")


@register
class ClicksDetector(Detector):
    NAME = "clicks"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    THUMBNAIL = False
    Config = ClicksConfig

    def __init__(self, config: ClicksConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.level_db / 20.0)
        self.open: Event | None = None
        self.count = 0
        self.worst = 0.0
        self.last_click = 0.0
        self.channels: set[str] = set()
        self.held: list[tuple[float, float, set[str]]] = []  # clicks within TAIL of the audio seen so far
        self.since = 0.0  # clicks before this are the analysis's look-back into silence, not programme
        self.paused = False  # the engine paused the analysis (behind its live streams, engine.overload)

    def threshold(self) -> float:
        return self.config.score

    def message(self, value: float | None) -> str:
        return "click" if value is None else f"click (score {value:.0f})"

    def _resolve(self, **note: object) -> None:
        if self.open is not None:
            end = self.last_click + 1.0 / AUDIO_RATE
            self._emit(self.open.resolved(end, self.worst, clicks=self.count, channels=sorted(self.channels), **note))
            self.open = None

    def on_audio(self, m: AudioMetrics) -> None:
        if m.impulse is None:
            # The engine paused the analysis: nothing is known of this stretch. Clicks held back from the end of
            # input are programme (the input goes on), and an open event ends once its recovery time has passed,
            # saying it was not watched.
            self.paused = True
            self._take(self.held)
            self.held = []
            if self.open is not None and m.t0 - self.last_click >= self.config.recovery:
                self._resolve(analysis_paused=True)
            return
        if self.paused:
            # The analysis starts again from silence here (the engine reset its state): the first look-back
            # window is not programme, as at a stream's start.
            self.paused = False
            self.since = m.t0
        hit = (m.impulse > self.config.score) & (m.impulse_level > self.level)  # (C, W)
        names = m.channel_names or tuple(f"c{i}" for i in range(hit.shape[0]))
        for w in np.flatnonzero(hit.any(axis=0)):
            chans = np.flatnonzero(hit[:, w])
            c = chans[np.argmax(m.impulse[chans, w])]
            t = m.t0 + (w - m.impulse_lag) * m.window + float(m.impulse_at[c, w]) / AUDIO_RATE
            if t >= self.since:  # not the silence before the stream (the kernel's first look-back window)
                self.held.append((t, float(m.impulse[c, w]), {names[i] for i in chans}))
        end = m.t0 + (m.impulse.shape[-1] - m.impulse_lag) * m.window
        # Clicks are held for TAIL seconds: the audio of a file that stops dead at its end (the last
        # programme sample followed by nothing) is not a click in the programme.
        ready = [h for h in self.held if h[0] < end - TAIL]
        self.held = [h for h in self.held if h[0] >= end - TAIL]
        self._take(ready)
        if self.open is not None and end - self.last_click >= self.config.recovery:
            self._resolve()

    def _take(self, ready: list[tuple[float, float, set[str]]]) -> None:
        for t, score, chans in ready:
            if self.open is not None and t - self.last_click >= self.config.recovery:
                self._resolve()
            if self.open is None:
                self.count, self.worst, self.channels = 0, 0.0, set()
                self.open = self._make_event(t, score)
                self._emit(self.open)
            self.count += 1
            self.worst = max(self.worst, score)
            self.channels.update(chans)
            self.last_click = t

    def finish(self, end_time: float | None) -> None:
        self.held = []  # within TAIL of the end of input
        self._resolve()
