"""Source interface and timestamp normalisation shared by every source."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from engine.batch import StreamQueue
from engine.media import StreamInfo


class SourceError(Exception):
    """A problem with one stream's input (bad URL, unreadable media); reported for that stream alone."""


@dataclass
class SourceOptions:
    pace: str = "auto"  # "fast" | "realtime" | "auto" (files fast, live and synthetic real time)
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    video: bool = True
    audio: bool = True
    threads: int = 0
    decoder: str = "auto"  # video decoder backend: auto | pyav | nvdec (engine.decode.BACKEND_NAMES)
    tier: str = "all"  # density tier: all | skip_nonref | keyframes (engine.decode.tiers)
    device: str = "cpu"  # where decoded frames go; set by the engine from its device
    keep_luma: bool = False  # GPU decoders keep the whole luma plane, not only its summary (set by the engine)
    threaded: bool = True  # files on NVDEC: the native threaded reader (False: PyAV demux + packet-level NVDEC)


class Source(ABC):
    """Produces frames of one stream into its queue from an I/O thread until stopped or finished."""

    live: bool = False

    def __init__(self, url: str, options: SourceOptions) -> None:
        self.url = url
        self.options = options
        self.info = StreamInfo(url=url, live=self.live)

    @property
    def realtime(self) -> bool:
        if self.options.pace == "auto":
            return self.live
        return self.options.pace == "realtime"

    @abstractmethod
    def run(self, queue: StreamQueue, stop: threading.Event) -> None:
        """Blocking loop; must put a final `eof` or `error` status before returning."""


class Timeline:
    """Turns raw stream timestamps into seconds from the stream start, monotonic and without resets.

    Files keep their gaps (a gap is a fact about the media). Live streams re-anchor on resets and big jumps
    (an encoder restart, a timestamp wrap), continuing from where they were plus the wall-clock time that
    passed, so detectors never see time run backwards.
    """

    JUMP = 5.0

    def __init__(self, live: bool) -> None:
        self.live = live
        self.origin: float | None = None
        self.last: float | None = None  # last normalised time handed out
        self.last_wall: float | None = None
        self.resets = 0  # live timestamp discontinuities re-anchored on

    def anchor(self, raw: float | None, duration: float, wall: float) -> None:
        """Set the origin from the first timestamp of the stream, or of a new connection, where time
        continues after the outage (the wall-clock time that passed) instead of restarting."""
        if self.origin is not None:
            return
        if self.last is None:
            self.origin = raw if raw is not None else 0.0
        else:
            gap = max(duration, wall - (self.last_wall or wall))
            self.origin = (raw if raw is not None else 0.0) - (self.last + gap)

    def map(self, raw: float | None, duration: float, wall: float) -> float:
        self.anchor(raw, duration, wall)
        if raw is None:
            t = (self.last + duration) if self.last is not None else 0.0
        else:
            t = raw - self.origin
            if self.last is not None:
                jumped = t < self.last - self.JUMP or t > self.last + self.JUMP
                if self.live and jumped:
                    self.resets += 1
                    gap = max(duration, wall - (self.last_wall or wall))
                    self.origin = raw - (self.last + gap)
                    t = self.last + gap
                elif t < self.last + 0.25 * duration:
                    # Out-of-order or repeated timestamps (guessed AVI times, pts = dts): keep cadence.
                    t = self.last + duration
        self.last = t
        self.last_wall = wall
        return t

    def reconnected(self) -> None:
        """A new connection brings new timestamps: re-anchor on its first one."""
        self.origin = None


class AudioClock:
    """Audio time from a sample count, re-synchronised on the container's timestamps when they jump
    (a gap or overlap in the audio), so long files do not drift and gaps stay visible."""

    RESYNC = 0.1

    def __init__(self, timeline: Timeline, rate: int) -> None:
        self.timeline = timeline
        self.rate = rate
        self.next: float | None = None
        # What the last chunk's timestamp said (see engine.detectors.base.TimestampNote): the sample clock
        # minus the timestamp (None without one), and the size of a re-synchronisation (0: none).
        self.drift: float | None = None
        self.jump_size = 0.0

    def map(self, raw: float | None, samples: int, wall: float | None = None) -> tuple[float, bool]:
        """Start time of a chunk of `samples`, and whether it is discontinuous with the previous one."""
        tl = self.timeline
        t = None
        if raw is not None:
            tl.anchor(raw, samples / self.rate, time.time() if wall is None else wall)
            t = raw - tl.origin
        jump = False
        self.jump_size = 0.0
        if self.next is None:
            start = t if t is not None else 0.0
        elif t is not None and abs(t - self.next) > self.RESYNC:
            start, jump = t, True
            self.jump_size = t - self.next
        else:
            start = self.next
        self.drift = None if t is None else start - t
        self.next = start + samples / self.rate
        return start, jump
