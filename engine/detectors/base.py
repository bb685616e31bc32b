"""What every detector shares: its config base, the metric requests it makes of the scoring step, the
onset/recovery state machine, and the registry new detectors join.

A detector is one module: a frozen config dataclass with documented defaults, a VERSION, the metric requests
it needs, and `on_video` / `on_audio` / `on_tick` handlers that feed a `Hysteresis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from engine.events import Event, Severity, Status, new_event_id, now_iso
from engine.media import VideoFrame


@dataclass(frozen=True, slots=True)
class Region:
    """A rectangle in fractions of the picture (0..1), so one config fits every resolution."""

    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"region {name}={v} must be within 0..1 (fractions of the picture)")
        if self.w <= 0 or self.h <= 0:
            raise ValueError("region w and h must be > 0")


def unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within 0..1, not {value}")


def below_full_scale(name: str, value: float) -> None:
    if value >= 0:
        raise ValueError(f"{name} must be < 0 dBFS, not {value}")


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, not {value}")


@dataclass(frozen=True)
class DetectorConfig:
    """Fields every detector has.

    onset: seconds a fault must last before the event fires.
    recovery: seconds the fault must be gone before the event resolves (shorter gaps keep it open).
    ignore: regions left out of the analysis (a clock, a logo, a ticker); video detectors only.
    """

    enabled: bool = True
    onset: float = 2.0
    recovery: float = 0.5
    severity: Severity = Severity.WARNING
    ignore: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML's .nan and .inf pass every comparison below and then break detection
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, not {v}")
        if self.onset < 0 or self.recovery < 0:
            raise ValueError("onset and recovery must be >= 0 seconds")


@dataclass(frozen=True, slots=True)
class MetricRequest:
    """A per-frame metric a detector asks the batched scoring step for; equal requests are computed once."""

    family: str
    params: tuple[tuple[str, Any], ...] = ()
    ignore: tuple[Region, ...] = ()

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


@dataclass(slots=True)
class VideoMetrics:
    """The scored frames of one stream from one tick, in order."""

    stream: str
    pts: np.ndarray  # (k,) seconds
    duration: np.ndarray  # (k,) seconds
    values: dict[MetricRequest, dict[str, np.ndarray]]
    small: torch.Tensor  # (k, h, w) uint8 small planes of these frames
    last: VideoFrame  # the last of these frames (thumbnails)
    prev_small: torch.Tensor | None  # (h, w) the frame before the first one here, None at stream start

    def get(self, request: MetricRequest, name: str) -> np.ndarray:
        return self.values[request][name]


@dataclass(frozen=True, slots=True)
class TimestampNote:
    """What the container's audio timestamps said about one decoded chunk.

    `drift` is the chunk's time by the count of samples decoded minus its time by its own timestamp: how
    much later than its timestamps say the audio is heard by a player that clocks audio by its samples,
    positive when audio is late. `jump` is a re-synchronisation of the audio clock on the timestamps (a gap,
    positive, or an overlap, negative, too big to be timing jitter); `reset` a timestamp discontinuity the
    source re-anchored on (an encoder restart)."""

    t: float
    drift: float | None
    jump: float = 0.0
    reset: bool = False


@dataclass(slots=True)
class AudioMetrics:
    """5 ms analysis windows of one stream from one tick, in order."""

    stream: str
    t0: float  # media time of the first window
    window: float  # seconds per window
    peak: np.ndarray  # (C, W) absolute peak, linear
    mean_square: np.ndarray  # (C, W) linear
    clipped: np.ndarray  # (C, W) samples in clipping runs
    momentary: np.ndarray  # (W,) LUFS, 400 ms sliding
    short_term: np.ndarray  # (W,) LUFS, 3 s sliding
    window_power: np.ndarray  # (W,) K-weighted, channel-weighted power of each window
    layout: str = ""
    channel_names: tuple[str, ...] = ()  # one name per channel (FL, FR, FC, LFE, ...)
    mean: np.ndarray | None = None  # (C, W) mean sample value (DC)
    pair: tuple[int, int] | None = None  # the front left/right channels, None for mono
    cross: np.ndarray | None = None  # (W,) mean of left * right over the pair
    onset: np.ndarray | None = None  # (W,) rise of log10 window_power (A/V sync)
    true_peak: np.ndarray | None = None  # (C, W) 4x oversampled peak, linear
    impulse: np.ndarray | None = None  # (C, W) how far the strongest impulse stands out of its residual
    impulse_at: np.ndarray | None = None  # (C, W) sample of that impulse within its window
    impulse_level: np.ndarray | None = None  # (C, W) its residual amplitude
    # The impulse values describe windows `impulse_lag` windows earlier than the others (the click kernel
    # looks ahead): value w belongs to the window starting at t0 + (w - impulse_lag) * window.
    impulse_lag: int = 1
    timestamps: list[TimestampNote] = field(default_factory=list)  # container timing news since last tick
    restart: bool = False  # the first windows after a gap in the audio

    @property
    def times(self) -> np.ndarray:
        return self.t0 + self.window * np.arange(self.peak.shape[-1])


Emit = Callable[[Event], None]
ThumbnailFn = Callable[[str], str | None]  # event id -> path of the JPEG written, or None


@dataclass(slots=True)
class _Open:
    event: Event
    worst: float | None
    clear_since: float | None = None


@dataclass(slots=True)
class Hysteresis:
    """Onset/recovery state machine of one check on one stream.

    Fed runs of per-frame (or per-window) fault flags with their media times. A fault becomes an event once
    it has lasted `onset` seconds; the event resolves once the fault has been gone for `recovery` seconds,
    with `end` at the moment the fault stopped. Work is per run of equal flags, not per frame.
    """

    onset: float
    recovery: float
    make_event: Callable[[float, float | None], Event]  # (start, value) -> firing event
    emit: Emit
    higher_is_worse: bool = True
    fill: float = 0.8  # share of the onset span that must really be faulty (gaps excluded)
    pending_start: float | None = None
    pending_faulty: float = 0.0  # faulty seconds since pending_start
    pending_worst: float | None = None
    pending_clear: float | None = None  # when a pending fault last went away
    open: _Open | None = None
    last_end: float = 0.0
    # Extra facts for the resolved event, asked for when it resolves (a click count, the true peak).
    details: Callable[[], dict[str, object]] | None = None

    def _worse(self, a: float | None, b: float | None) -> float | None:
        vals = [v for v in (a, b) if v is not None and not math.isnan(v)]
        if not vals:
            return None
        return max(vals) if self.higher_is_worse else min(vals)

    def update(self, start: np.ndarray, end: np.ndarray, faulty: np.ndarray, values: np.ndarray | None = None) -> None:
        """start/end: (k,) media times of each frame or window; faulty: (k,) bool; values: (k,) metric."""
        k = len(faulty)
        if k == 0:
            return
        faulty = np.asarray(faulty, dtype=bool)
        if self.open is None and self.pending_start is None and not faulty.any():
            # The common case, a healthy stream: nothing pending, nothing to do but note the time.
            self.last_end = float(end[-1])
            return
        cuts = np.flatnonzero(faulty[1:] != faulty[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [k]))
        for i in range(len(bounds) - 1):
            a, b = int(bounds[i]), int(bounds[i + 1])
            run_worst = None
            if values is not None and faulty[a]:  # only a faulty run's values are ever reported
                seg = np.asarray(values[a:b], dtype=np.float64)
                seg = seg[~np.isnan(seg)]
                if seg.size:
                    run_worst = float(seg.max() if self.higher_is_worse else seg.min())
            self._run(float(start[a]), float(end[b - 1]), bool(faulty[a]), run_worst)
        self.last_end = float(end[-1])

    def _run(self, t0: float, t1: float, faulty: bool, worst: float | None) -> None:
        op = self.open
        if faulty:
            if op is not None:
                if op.clear_since is not None and t0 - op.clear_since >= self.recovery:
                    self._resolve(op.clear_since)
                    op = None
                else:
                    op.clear_since = None
                    op.worst = self._worse(op.worst, worst)
                    return
            gap_too_long = self.pending_clear is not None and t0 - self.pending_clear >= self.recovery - 1e-9
            if self.pending_start is None or gap_too_long:
                self.pending_start, self.pending_worst, self.pending_faulty = t0, worst, 0.0
            else:
                self.pending_worst = self._worse(self.pending_worst, worst)
            self.pending_clear = None
            self.pending_faulty += t1 - t0
            span = t1 - self.pending_start
            # Short gaps do not restart the count, but a fault that is mostly absent (a blocky garbage frame
            # every few frames, isolated loud peaks) must not add up to a sustained one.
            if span >= self.onset - 1e-9 and self.pending_faulty >= self.fill * span - 1e-9:
                event = self.make_event(self.pending_start, self.pending_worst)
                self.open = _Open(event=event, worst=self.pending_worst)
                self.pending_start = self.pending_worst = self.pending_clear = None
                self.emit(event)
        else:
            if self.pending_start is not None:
                # A fault that has not reached its onset survives gaps shorter than the recovery time, so a
                # flickering decision (a few clean frames inside a blur) does not restart the count.
                # (It must still fill `fill` of the span, see above.)
                if self.pending_clear is None:
                    self.pending_clear = t0
                if t1 - self.pending_clear >= self.recovery - 1e-9:
                    self.pending_start = self.pending_worst = self.pending_clear = None
            if op is not None:
                if op.clear_since is None:
                    op.clear_since = t0
                if t1 - op.clear_since >= self.recovery - 1e-9:
                    self._resolve(op.clear_since)

    def _resolve(self, end: float) -> None:
        op = self.open
        assert op is not None
        self.open = None
        extra = self.details() if self.details is not None else {}
        self.emit(op.event.resolved(end, op.worst, **extra))

    def finish(self, end_time: float | None = None) -> None:
        """End of input: an open event resolves at the moment its fault stopped, or at the end of input."""
        end = self.last_end if end_time is None else end_time
        if self.pending_clear is not None:
            end = min(end, self.pending_clear)
        elif self.pending_start is not None:
            self.pending_faulty += max(0.0, end - self.last_end)  # the fault lasts to the end of input
        span = end - self.pending_start if self.pending_start is not None else 0.0
        if self.pending_start is not None and span >= self.onset - 1e-9 and self.pending_faulty >= self.fill * span - 1e-9:
            event = self.make_event(self.pending_start, self.pending_worst)
            self.open = _Open(event=event, worst=self.pending_worst)
            self.emit(event)
        self.pending_start = self.pending_worst = self.pending_clear = None
        if self.open is not None:
            self._resolve(self.open.clear_since if self.open.clear_since is not None else end)

    @property
    def active(self) -> bool:
        return self.open is not None


@dataclass
class StreamContext:
    """What a detector instance knows about the stream it watches."""

    stream: str
    emit: Emit
    thumbnail: ThumbnailFn | None = None
    live: bool = False
    tier: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)


class Detector:
    """Base class: subclasses set NAME, VERSION, MEDIA ('video' | 'audio' | 'stream') and Config."""

    NAME: ClassVar[str]
    VERSION: ClassVar[str]
    MEDIA: ClassVar[str]
    Config: ClassVar[type[DetectorConfig]]
    DEFAULT_SEVERITY: ClassVar[Severity] = Severity.WARNING
    THUMBNAIL: ClassVar[bool] = True
    NEEDS_EVERY_FRAME: ClassVar[bool] = True
    # Reads the decoder's packet evidence (VideoFrame.key_frame, .damaged): decoders that see no packets (the
    # threaded NVDEC file reader) are not used for such a stream.
    NEEDS_PACKETS: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig, ctx: StreamContext) -> None:
        self.config = config
        self.ctx = ctx
        self.hyst = Hysteresis(config.onset, config.recovery, self._make_event, self._emit)

    # -- what the scoring step must compute for this detector
    def requests(self) -> list[MetricRequest]:
        return []

    # -- handlers
    def on_video(self, m: VideoMetrics) -> None:
        pass

    def on_audio(self, m: AudioMetrics) -> None:
        pass

    def on_tick(self, wallclock: float, media_time: float) -> None:
        pass

    def finish(self, end_time: float | None) -> None:
        self.hyst.finish(end_time)
        for h in getattr(self, "_per_channel", {}).values():
            h.finish(end_time)

    def channel_hysteresis(self, channel: str) -> Hysteresis:
        """A state machine of its own for one audio channel, whose events name the channel (a dead left
        channel and a dead right one are two faults)."""
        per: dict[str, Hysteresis] = self.__dict__.setdefault("_per_channel", {})
        if channel not in per:
            def make(start: float, value: float | None, channel: str = channel) -> Event:
                from dataclasses import replace

                e = self._make_event(start, value)
                return replace(e, message=f"{e.message}: channel {channel}", details={**e.details, "channel": channel})

            per[channel] = Hysteresis(self.config.onset, self.config.recovery, make, self._emit,
                                      higher_is_worse=self.hyst.higher_is_worse)
        return per[channel]

    # -- event plumbing
    def threshold(self) -> float | None:
        return None

    def message(self, value: float | None) -> str:
        return self.NAME

    def _make_event(self, start: float, value: float | None) -> Event:
        event_id = new_event_id()
        thumb = None
        if self.THUMBNAIL and self.MEDIA == "video" and self.ctx.thumbnail is not None:
            thumb = self.ctx.thumbnail(event_id)
        return Event(
            id=event_id,
            stream=self.ctx.stream,
            type=self.NAME,
            status=Status.FIRING,
            start=round(start, 6),
            end=None,
            duration=None,
            wallclock=now_iso(),
            value=None if value is None else round(float(value), 4),
            threshold=self.threshold(),
            severity=self.config.severity,
            detector_version=self.VERSION,
            thumbnail=thumb,
            message=self.message(value),
            details={"tier": self.ctx.tier},
        )

    def _emit(self, event: Event) -> None:
        if event.value is not None:
            event = _round_value(event)
        self.ctx.emit(event)


def _round_value(event: Event) -> Event:
    from dataclasses import replace

    return replace(event, value=round(float(event.value), 4)) if event.value is not None else event


class SpatialThresholdDetector(Detector):
    """A video check that compares one value of the spatial metric family with a threshold."""

    METRIC: ClassVar[str]
    LABEL: ClassVar[str]

    def __init__(self, config: DetectorConfig, ctx: StreamContext) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest("spatial", (("rows", config.rows),), config.ignore)  # type: ignore[attr-defined]

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float:
        return self.config.threshold  # type: ignore[attr-defined]

    def message(self, value: float | None) -> str:
        return f"{self.LABEL} picture" if value is None else f"{self.LABEL} picture ({self.METRIC} {value:.2f})"

    def on_video(self, m: VideoMetrics) -> None:
        v = m.get(self.request, self.METRIC)
        # NaN (a picture too flat to judge) never counts as faulty: NaN >= x is False.
        with np.errstate(invalid="ignore"):
            faulty = np.greater_equal(v, self.threshold())
        self.hyst.update(m.pts, m.pts + m.duration, faulty, v)


REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: makes a detector known to config, scoring and the CLI by its NAME."""
    if cls.NAME in REGISTRY:
        raise ValueError(f"detector {cls.NAME!r} registered twice")
    REGISTRY[cls.NAME] = cls
    return cls
