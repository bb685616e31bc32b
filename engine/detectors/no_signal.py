"""No signal: the source stopped delivering pictures (connection lost, encoder down, a gap in the media)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import Detector, DetectorConfig, VideoMetrics, register
from engine.events import Event, Severity


@dataclass(frozen=True)
class NoSignalConfig(DetectorConfig):
    """onset: seconds without a frame before the event fires: wall-clock seconds for live and real-time
    sources, media seconds (a gap in the timestamps) for files read as fast as possible. The event
    resolves with the first frame that arrives again."""

    onset: float = 2.0
    recovery: float = 0.0
    severity: Severity = Severity.CRITICAL

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.onset < 0.1:
            # Pictures are always some time apart: a shorter onset calls every one of those gaps an outage.
            raise ValueError(f"onset must be at least 0.1 s, not {self.onset}")


@register
class NoSignalDetector(Detector):
    NAME = "no_signal"
    VERSION = "1.0"
    MEDIA = "stream"
    NEEDS_EVERY_FRAME = False
    Config = NoSignalConfig
    THUMBNAIL = False

    def __init__(self, config: NoSignalConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.last_end: float | None = None  # media time at which the last frame ended
        self.open: Event | None = None
        self.started_wall: float | None = None
        self.opened_wall = 0.0  # wall-clock time the open event fired
        self.outage_end = 0.0  # media time up to which pictures came out before the outage, late ones too
        self.spacing = 0.0  # seconds between decoded pictures in a sparse tier

    def threshold(self) -> float:
        return self.config.onset

    def message(self, value: float | None) -> str:
        return "no signal" if value is None else f"no signal for {value:.1f} s"

    def on_video(self, m: VideoMetrics) -> None:
        first = float(m.pts[0])
        if self.open is not None:
            # The first frame after the outage. Only something that arrived after the event fired brings the
            # signal back: pictures that came out before it but are scored only now, and pictures a source
            # hands out late (what a demuxer had buffered when the input stalled), are from before the outage.
            after = m.pts[m.pts >= self.outage_end - 1e-6]
            if after.size == 0 or not self._arrived_since_open():
                self.last_end = float(m.pts[-1] + m.duration[-1])
                return
            self._emit(self.open.resolved(float(after[0])))
            self.open = None
        elif not self.ctx.live:
            # Gaps in the timestamps of a file read faster than real time, before and inside this batch.
            ends = np.concatenate(([self.last_end if self.last_end is not None else first], m.pts[:-1] + m.duration[:-1]))
            for i in np.flatnonzero(m.pts - ends >= self.config.onset):
                event = self._make_event(float(ends[i]), float(m.pts[i] - ends[i]))
                self._emit(event)
                self._emit(event.resolved(float(m.pts[i])))
        self.last_end = float(m.pts[-1] + m.duration[-1])
        if self.ctx.tier != "all":
            self.spacing = float(np.max(m.duration))

    def onset(self) -> float:
        """A sparse tier decodes a picture every GOP or so: silence between those pictures is not an outage,
        so the wall-clock onset is at least 2.5 picture spacings there."""
        return max(self.config.onset, 2.5 * self.spacing)

    def _arrived_since_open(self) -> bool:
        arrival = self.ctx.extra.get("last_arrival")
        return arrival is not None and arrival > self.opened_wall

    def on_tick(self, wallclock: float, media_time: float) -> None:
        """Called every engine tick; `media_time` is the end of the last frame that arrived."""
        last_arrival = self.ctx.extra.get("last_arrival")
        if self.started_wall is None:
            self.started_wall = wallclock
        if self.open is not None and not self._arrived_since_open():
            self.outage_end = max(self.outage_end, media_time)
        if not self.ctx.live or self.open is not None:
            return
        since = wallclock - (last_arrival if last_arrival is not None else self.started_wall)
        if since >= self.onset():
            self.opened_wall, self.outage_end = wallclock, media_time
            self.open = self._make_event(media_time, since)
            self._emit(self.open)

    def finish(self, end_time: float | None) -> None:
        if self.open is not None:
            self._emit(self.open.resolved(end_time if end_time is not None else self.open.start))
            self.open = None
            return
        if self.ctx.live or end_time is None or not self.ctx.extra.get("video_expected"):
            return
        # A file whose pictures stop while its sound goes on (a dead or truncated video track), or that has a
        # video track with no picture at all: as long a gap as one between pictures.
        last = self.last_end if self.last_end is not None else 0.0
        if end_time - last >= self.config.onset:
            event = self._make_event(last, end_time - last)
            self._emit(event)
            self._emit(event.resolved(end_time))
