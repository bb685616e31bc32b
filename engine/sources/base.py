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
    # Pictures per batch from the threaded NVDEC reader (its surface ring): larger batches mean fewer Python calls
    # per picture in the source thread, at about 3 MB of GPU memory per 1080p surface.
    decode_batch: int = 8


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
    # Live pictures come out of the decoder in presentation order and audio in sample order, so a live
    # stream's time never steps back by more than a few reordered frames: a bigger step back is a sender that
    # restarted its clock (a fresh encoder starts near zero), however short the stream ran before it.
    BACK = 1.0

    def __init__(self, live: bool) -> None:
        self.live = live
        self.origin: float | None = None
        # The origin before the last live reset, until the first picture of the new timestamps: the decoder
        # still holds a few pictures of the old ones when the new packets (often audio first) arrive, and
        # those keep their place instead of counting as another reset.
        self.prev_origin: float | None = None
        self.last: float | None = None  # last normalised time handed out
        self.last_wall: float | None = None
        # Where a new connection's time resumes (after the outage): the first pictures of the connection
        # continue from here, however long the outage, so they are no timestamp reset.
        self.resume: float | None = None
        self.resets = 0  # live timestamp discontinuities re-anchored on
        # A file's forward jump beyond JUMP is a gap only when the next timestamp (of either track) agrees:
        # one garbage timestamp from a damaged packet would otherwise move everything after it hours on.
        self.pending: float | None = None
        self.outliers = 0  # timestamps of a file ignored as garbage
        # For a source that can hold the item back (a file's pictures): `deferring` says the last item mapped
        # is such a first timestamp beyond a jump, given the cadence time for now; `confirmed` then carries its
        # own time once the next timestamp showed the jump to be real (None: it was garbage, cadence it is).
        self.deferring = False
        self.confirmed: float | None = None
        self.step = 0.0  # the last forward step between two pictures' times (files: what a jump is measured by)

    def outlier(self, t: float, expected: float, step: float = 0.0) -> bool:
        """Whether a file's time `t`, where about `expected` was due, is a lone jump to be ignored. A jump is
        beyond JUMP and beyond four of the track's usual steps (`step`: a slide show or a sparse tier moves
        in big steps). Its first timestamp is held as pending; the next jumping one confirms it unless it went
        back to where the series was (then the first was garbage), and the next in-step one clears it."""
        self.confirmed = None
        if self.live or t <= expected + max(self.JUMP, 4.0 * step):
            self.pending = None
            return False
        if self.pending is not None and t >= self.pending - self.JUMP:
            self.confirmed, self.pending = self.pending, None
            self.outliers -= 1  # the first one was right after all
            return False
        self.pending = t
        self.outliers += 1
        return True

    def anchor(self, raw: float | None, duration: float, wall: float) -> None:
        """Set the origin from the first timestamp of the stream, or of a new connection, where time
        continues after the outage (the wall-clock time that passed) instead of restarting."""
        if self.origin is not None:
            return
        if self.last is None:
            self.origin = raw if raw is not None else 0.0
        else:
            gap = max(duration, wall - (self.last_wall or wall))
            self.resume = self.last + gap
            self.origin = (raw if raw is not None else 0.0) - self.resume

    def discontinuous(self, t: float, expected: float) -> bool:
        """Whether a live time `t`, where about `expected` was due, comes from reset timestamps."""
        return self.live and (t < expected - self.BACK or t > expected + self.JUMP)

    def continue_after(self, raw: float, expected: float, wall: float, min_gap: float) -> float:
        """Time of `raw`, the first timestamp seen after a live discontinuity: re-anchors after `expected`
        plus the wall-clock time since the last item arrived (the outage, if any), at least `min_gap`."""
        self.resets += 1
        gap = max(min_gap, wall - (self.last_wall or wall))
        self.prev_origin = self.origin
        self.origin = raw - (expected + gap)
        return expected + gap

    def map(self, raw: float | None, duration: float, wall: float) -> float:
        self.deferring = False
        self.anchor(raw, duration, wall)
        if raw is None:
            t = (self.last + duration) if self.last is not None else 0.0
        else:
            t = raw - self.origin
            if self.last is not None:
                expected = self.last if self.resume is None else max(self.last, self.resume)
                if self.prev_origin is not None:
                    old = raw - self.prev_origin
                    if abs(old - expected) < abs(t - expected):
                        t = old
                    else:
                        self.prev_origin = None
                if self.discontinuous(t, expected):
                    t = self.continue_after(raw, expected, wall, duration)
                elif self.outlier(t, expected, self.step):
                    t = self.last + duration
                    self.deferring = True
                if t < self.last + 0.25 * duration:
                    # Out-of-order or repeated timestamps (guessed AVI times, pts = dts): keep cadence.
                    t = self.last + duration
                if not self.deferring:
                    self.step = t - self.last
        self.last = t
        self.last_wall = wall
        return t

    def reconnected(self) -> None:
        """A new connection brings new timestamps: re-anchor on its first one."""
        self.origin = None
        self.prev_origin = None


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
        wall = time.time() if wall is None else wall
        t = None
        if raw is not None:
            tl.anchor(raw, samples / self.rate, wall)
            t = raw - tl.origin
            if self.next is not None and tl.discontinuous(t, self.next) and (tl.last is None or tl.discontinuous(t, tl.last)):
                # The audio of a restarted sender often arrives before its first picture: re-anchor here, or
                # the audio would run seconds behind (or ahead of) the pictures from now on. Continue after
                # whichever of the two got furthest. (Audio back in step with the pictures after a long hole
                # in the audio alone is a gap, not a reset.)
                expected = max(self.next, tl.last) if tl.last is not None else self.next
                t = tl.continue_after(raw, expected, wall, 0.0)
            elif self.next is not None and tl.outlier(t, self.next, samples / self.rate):
                t = None  # the sample count goes on
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
        # An audio-only stream has no pictures to measure an outage from.
        tl.last_wall = wall
        return start, jump
