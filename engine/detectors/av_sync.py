"""A/V sync: how late (or early) the sound is against the picture, measured two ways.

Content: what is heard is compared with what is seen. The audio onset envelope (rises of the loudness of
each 5 ms window) and the visual change envelope (rises of the frame-to-frame difference, at each frame's
presentation time) are cross-correlated over the last `window` seconds, in blocks of `hop` seconds whose
sums add up (bounded memory, one small correlation per second). The lag of the best correlation is the
offset, positive when the audio lags the video. The estimate counts only when it is distinct: its
correlation must stand out of the best alternative lag by `min_confidence`; on content where sound and
picture changes have little to do with each other (music over slow pictures) nothing is claimed.

Timestamps: the container's audio timestamps against the count of samples decoded (the clock a player
plays audio by): audio gaps and overlaps in the container and timestamp drift show as a growing or
jumping difference, measured for every chunk.

Events carry `value` = the offset in seconds (positive: audio late) and `details.kind` = "content" or
"timestamps". Defaults follow ITU-R BT.1359's detectability thresholds: audio early by more than 45 ms or
late by more than 125 ms.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from engine.detectors.base import (
    AudioMetrics,
    Detector,
    DetectorConfig,
    Hysteresis,
    MetricRequest,
    VideoMetrics,
    positive,
    register,
)
from engine.events import Event, Severity
from engine.media import AUDIO_RATE, AUDIO_WINDOW
from kernels import sync as ksync

STEP = AUDIO_WINDOW / AUDIO_RATE  # the common grid: the audio analysis window
# A sound event and a picture event at most this far apart (after the offset) are the same event: about
# a frame, what lip-sync is judged to.
MATCH_TOLERANCE = 0.045
# An event is a local peak of an envelope this many standard deviations above its block's mean.
EVENT_SIGMAS = 4.0
MAX_EVENTS = 16  # per block and kind, the strongest


def _events(x: np.ndarray, t0: float) -> np.ndarray:
    """Times of the distinct events of a block's envelope (sharp rises that stand out of it)."""
    if x.size < 3 or not x.max() > 0:
        return np.zeros(0)
    level = x.mean() + EVENT_SIGMAS * x.std()
    peak = (x > level) & (x >= np.roll(x, 1)) & (x >= np.roll(x, -1))
    idx = np.flatnonzero(peak)
    if idx.size > MAX_EVENTS:
        idx = idx[np.argsort(x[idx])[-MAX_EVENTS:]]
    return t0 + np.sort(idx) * STEP


@dataclass(frozen=True)
class AvSyncConfig(DetectorConfig):
    """early / late: seconds the audio may lead / lag the picture before it is a fault (ITU-R BT.1359:
    45 ms early, 125 ms late are detectable). window: seconds of content correlated for each estimate
    (min_window before the first); hop: seconds between estimates; max_offset: the largest offset searched
    either way (keep it under half the period of a repeating test pattern). min_confidence: how far the
    best lag's correlation must stand out of the best other lag (0..1, share of the peak); min_correlation:
    the least correlation at the best lag; min_matches: the least number of distinct sound events that
    line up with picture events at that lag (and at least half of the rarer kind must), so one chance
    coincidence of a few events cannot decide. timestamps: also judge the container's audio timestamps.
    The content measurement needs every frame: in a sparse density tier only the timestamps are judged."""

    onset: float = 3.0
    recovery: float = 2.0
    severity: Severity = Severity.MAJOR
    early: float = 0.045
    late: float = 0.125
    window: float = 20.0
    min_window: float = 6.0
    hop: float = 1.0
    max_offset: float = 0.5
    min_confidence: float = 0.3
    min_correlation: float = 0.2
    min_matches: int = 4
    timestamps: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("early", "late", "window", "min_window", "hop", "max_offset"):
            positive(name, getattr(self, name))
        if self.min_window > self.window:
            raise ValueError("min_window must not exceed window")
        if not 0.0 <= self.min_confidence <= 1.0 or not 0.0 <= self.min_correlation <= 1.0:
            raise ValueError("min_confidence and min_correlation must be within 0..1")


@dataclass(slots=True)
class Estimate:
    """One content-level measurement: offset (s, audio late > 0), its correlation, its confidence, and the
    span of media time it covers."""

    offset: float
    correlation: float
    confidence: float
    start: float
    end: float
    matches: int = 0  # sound events that line up with a picture event at this offset
    events: int = 0  # events of the rarer kind (sound or picture) in the span

    def confident(self, cfg: AvSyncConfig) -> bool:
        return (self.confidence >= cfg.min_confidence and self.correlation >= cfg.min_correlation
                and self.matches >= cfg.min_matches and 2 * self.matches >= self.events)

    def to_dict(self) -> dict[str, float]:
        return {"offset": round(self.offset, 4), "correlation": round(self.correlation, 3),
                "confidence": round(self.confidence, 3), "matches": self.matches, "events": self.events,
                "start": round(self.start, 3), "end": round(self.end, 3)}


class _Ring:
    """A signal on the 5 ms grid, by absolute grid index, keeping the last `size` steps; unknown steps are
    NaN (a gap in the audio, the time before the first frame)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = np.full(size, np.nan)
        self.upto = 0  # first index not written yet
        self.first: int | None = None  # first index ever written

    def write(self, g0: int, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if self.first is None:
            self.first = self.upto = g0
        g1 = g0 + len(values)
        if g1 <= self.upto:
            return  # time never runs back on a stream; a repeat is ignored
        if g0 < self.upto:
            values, g0 = values[self.upto - g0 :], self.upto
        if g0 > self.upto:  # a hole: unknown
            self._put(self.upto, np.full(min(g0 - self.upto, self.size), np.nan), g0 - self.upto)
        self._put(g0, values[-self.size :], len(values))
        self.upto = g1

    def _put(self, g0: int, values: np.ndarray, n: int) -> None:
        g0 += n - len(values)
        idx = (g0 + np.arange(len(values))) % self.size
        self.data[idx] = values

    def read(self, g0: int, g1: int) -> np.ndarray | None:
        if g0 < self.upto - self.size or g1 > self.upto:
            return None
        return self.data[np.arange(g0, g1) % self.size]


@register
class AvSyncDetector(Detector):
    NAME = "av_sync"
    VERSION = "1.0"
    MEDIA = "av"
    # The content measurement needs every frame's time; in a sparse tier the detector judges timestamps only
    # (so it does not keep such streams out of cheap tiers).
    NEEDS_EVERY_FRAME = False
    THUMBNAIL = False
    Config = AvSyncConfig

    def __init__(self, config: AvSyncConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.hyst.make_event = self._content_event
        self.lag = max(1, round(config.max_offset / STEP))
        self.hop = max(1, round(config.hop / STEP))
        self.blocks_per_window = max(1, round(config.window / config.hop))
        self.min_blocks = max(1, round(config.min_window / config.hop))
        size = self.hop + 4 * self.lag + round(10.0 / STEP)  # slack for one side running ahead of the other
        self.audio = _Ring(size)
        self.video = _Ring(size)
        # How new each picture is, from the batched scoring step (kernels.sync.novelty_segments); not in a
        # sparse tier, where the pictures are seconds apart and only timestamps are judged.
        self.request = MetricRequest("novelty", (("depth", 8), ("pool", 4)))
        self.next_block: int | None = None  # grid index where the next block starts
        self.blocks: deque[tuple] = deque()  # (r, ea, ev, t0, t1, audio events, video events) per hop
        self.total: list[torch.Tensor] | None = None
        # The events of the whole stream for the overall estimate, bounded: the last hour of blocks.
        self.history: deque[tuple] = deque(maxlen=max(1, round(3600 / config.hop)))
        self.total_span: tuple[float, float] | None = None
        self.estimates = 0
        self.confident_estimates = 0
        self.last: Estimate | None = None
        self.last_is_confident = False
        self.last_confident: Estimate | None = None
        self.content_t = 0.0
        # Timestamps: their own state machine, events marked as such.
        self.ts_hyst = Hysteresis(config.onset, config.recovery, self._ts_event, self._emit)
        self.drift: float | None = None
        self.max_drift = 0.0
        self.gaps = self.overlaps = self.resets = 0
        self.ts_t: float | None = None

    def threshold(self) -> float:
        return self.config.late

    def message(self, value: float | None) -> str:
        if value is None:
            return "audio out of sync"
        return f"audio {'late' if value > 0 else 'early'} by {abs(value) * 1000:.0f} ms"

    def _content_event(self, start: float, value: float | None) -> Event:
        from dataclasses import replace

        e = self._make_event(start, value)
        est = self.last_confident
        extra = {"kind": "content"}
        if est is not None:
            extra.update(confidence=round(est.confidence, 3), correlation=round(est.correlation, 3))
        return replace(e, details={**e.details, **extra})

    def _ts_event(self, start: float, value: float | None) -> Event:
        from dataclasses import replace

        e = self._make_event(start, value)
        return replace(e, message=e.message + " (container timestamps)", details={**e.details, "kind": "timestamps"})

    def _faulty(self, offset: float) -> bool:
        return offset < -self.config.early or offset > self.config.late

    def requests(self) -> list[MetricRequest]:
        return [self.request] if self.ctx.tier == "all" else []

    # -- the two envelopes
    def on_video(self, m: VideoMetrics) -> None:
        if self.ctx.tier != "all":
            return
        novelty = m.get(self.request, "novelty").astype(np.float64)
        # Each picture's novelty sits on the grid step holding its presentation time; the steps up to the
        # next picture are quiet (known, zero).
        pts = np.asarray(m.pts)
        g = np.floor(pts / STEP + 1e-6).astype(np.int64)
        ends = np.floor((pts + np.asarray(m.duration)) / STEP + 1e-6).astype(np.int64)
        for k in range(len(g)):
            sig = np.zeros(max(1, int(ends[k] - g[k])))
            sig[0] = novelty[k]
            self.video.write(int(g[k]), sig)
        self._advance(final=False)

    def on_audio(self, m: AudioMetrics) -> None:
        if self.config.timestamps:
            self._timestamps(m)
        if m.onset is None or m.onset.size == 0 or self.ctx.tier != "all":
            return
        g0 = int(math.floor(m.t0 / STEP + 0.5))
        self.audio.write(g0, np.asarray(m.onset, dtype=np.float64))
        self._advance(final=False)

    # -- content estimate
    def _advance(self, final: bool) -> None:
        if self.next_block is None:
            if self.audio.first is None or self.video.first is None:
                return
            # Blocks lie on a fixed grid from where both signals (and the video's lag context) exist, so
            # the result does not depend on how the input happened to be cut into ticks.
            first = max(self.audio.first, self.video.first + self.lag)
            self.next_block = -(-first // self.hop) * self.hop
        while True:
            b0 = self.next_block
            b1 = b0 + self.hop
            if b1 > self.audio.upto or b1 + self.lag > self.video.upto:
                if not final:
                    return
                b1 = min(self.audio.upto, self.video.upto - self.lag)
                if b1 - b0 < self.hop // 4:
                    return
            a = self.audio.read(b0, b1)
            v = self.video.read(b0 - self.lag, b1 + self.lag)
            self.next_block = b1
            if a is None or v is None:
                continue  # fell out of the ring (one side far behind): that block is lost, not guessed
            self._block(a, v, b0 * STEP, b1 * STEP)
            if final and b1 >= min(self.audio.upto, self.video.upto - self.lag):
                return

    def _block(self, a: np.ndarray, v: np.ndarray, t0: float, t1: float) -> None:
        # Unknown steps (gaps) count as quiet; a block that is mostly unknown is skipped.
        if np.isnan(a).mean() > 0.5 or np.isnan(v).mean() > 0.5:
            return
        at = torch.from_numpy(np.nan_to_num(a)).unsqueeze(0)
        vt = torch.from_numpy(np.nan_to_num(v)).unsqueeze(0)
        r, ea, ev = ksync.xcorr_terms(at, vt, self.lag)
        a_events = _events(np.nan_to_num(a), t0)
        v_events = _events(np.nan_to_num(v[self.lag : len(v) - self.lag]), t0)
        self.blocks.append((r, ea, ev, t0, t1, a_events, v_events))
        while len(self.blocks) > self.blocks_per_window:
            self.blocks.popleft()
        self.history.append(self.blocks[-1])
        if self.total is None:
            self.total = [r.clone(), ea.clone(), ev.clone()]
            self.total_span = (t0, t1)
        else:
            self.total[0] += r
            self.total[1] += ea
            self.total[2] += ev
            self.total_span = (self.total_span[0], t1)
        if len(self.blocks) < self.min_blocks:
            return
        r = sum(b[0] for b in self.blocks)
        ea = sum(b[1] for b in self.blocks)
        ev = sum(b[2] for b in self.blocks)
        est = self._estimate(r, ea, ev, self.blocks[0][3], t1, self.blocks)
        self.estimates += 1
        self.last = est
        self.last_is_confident = est.confident(self.config)
        if not self.last_is_confident:
            return  # not enough evidence either way: hold, claim nothing
        self.confident_estimates += 1
        self.last_confident = est
        faulty = self._faulty(est.offset)
        start = max(self.content_t, est.start) if self.content_t else est.start
        if faulty and not self.hyst.active and self.hyst.pending_start is None:
            self.hyst.higher_is_worse = est.offset > 0
        self.hyst.update(np.array([start]), np.array([est.end]), np.array([faulty]), np.array([est.offset]))
        self.content_t = est.end

    def _estimate(self, r: torch.Tensor, ea: torch.Tensor, ev: torch.Tensor, t0: float, t1: float,
                  blocks: Iterable[tuple] = ()) -> Estimate:
        corr = ksync.pearson(r, ea, ev)
        # Two frames either side of the peak belong to it (a cut's rise can straddle two grid steps and a
        # frame); anything further is a rival explanation.
        exclude = max(2, round(0.08 / STEP))
        idx, peak, rival = ksync.peak_and_rival(corr, exclude)
        i, p, q = int(idx[0]), float(peak[0]), float(rival[0])
        c = corr[0].numpy()
        # Parabolic refinement between grid steps.
        frac = 0.0
        if 0 < i < len(c) - 1:
            den = c[i - 1] - 2 * c[i] + c[i + 1]
            if den < 0:
                frac = float(np.clip(0.5 * (c[i - 1] - c[i + 1]) / den, -0.5, 0.5))
        offset = (i - self.lag + frac) * STEP
        confidence = 0.0 if p <= 0 else float(np.clip((p - max(q, 0.0)) / p, 0.0, 1.0))
        a_ev = np.concatenate([b[5] for b in blocks]) if blocks else np.zeros(0)
        v_ev = np.concatenate([b[6] for b in blocks]) if blocks else np.zeros(0)
        matches = 0
        if len(a_ev) and len(v_ev):
            gap = np.abs(a_ev[:, None] - offset - v_ev[None, :]).min(axis=1)
            matches = int((gap <= MATCH_TOLERANCE).sum())
        return Estimate(offset, p, confidence, t0, t1, matches, int(min(len(a_ev), len(v_ev))))

    # -- timestamps
    def _timestamps(self, m: AudioMetrics) -> None:
        notes = m.timestamps
        if not notes:
            return
        t = np.array([n.t for n in notes])
        drift = np.array([n.drift if n.drift is not None else np.nan for n in notes])
        for n in notes:
            if n.jump > 0:
                self.gaps += 1
            elif n.jump < 0:
                self.overlaps += 1
            if n.reset:
                self.resets += 1
        known = ~np.isnan(drift)
        if not known.any():
            return
        t, drift = t[known], drift[known]
        self.drift = float(drift[-1])
        worst = drift[np.argmax(np.abs(drift))]
        if abs(worst) > abs(self.max_drift):
            self.max_drift = float(worst)
        starts = np.concatenate(([self.ts_t if self.ts_t is not None else t[0]], t[:-1]))
        faulty = (drift < -self.config.early) | (drift > self.config.late)
        if self.ctx.extra.get("video_expected") is False:
            faulty[:] = False  # sound with no picture to be out of step with: measured, never an A/V alert
        if faulty.any() and not self.ts_hyst.active and self.ts_hyst.pending_start is None:
            self.ts_hyst.higher_is_worse = bool(drift[faulty][0] > 0)
        self.ts_hyst.update(starts, t, faulty, drift)
        self.ts_t = float(t[-1])

    def finish(self, end_time: float | None) -> None:
        self._advance(final=True)
        super().finish(end_time)
        self.ts_hyst.finish(end_time)

    def summary(self) -> dict[str, object]:
        """The stream's A/V sync so far, for reports: the estimate over everything seen (None when not
        confident), the latest sliding estimate, and the timestamp findings."""
        overall = None
        if self.total is not None and len(self.blocks) >= 1:
            est = self._estimate(*self.total, *self.total_span, self.history)
            overall = est.to_dict() | {"confident": est.confident(self.config)}
        return {
            "offset": overall["offset"] if overall and overall["confident"] else None,
            "confidence": overall["confidence"] if overall else None,
            "correlation": overall["correlation"] if overall else None,
            "overall": overall,
            "latest": self.last.to_dict() if self.last is not None else None,
            "estimates": self.estimates,
            "confident_estimates": self.confident_estimates,
            "timestamps": {
                "drift": None if self.drift is None else round(self.drift, 4),
                "max_drift": round(self.max_drift, 4),
                "gaps": self.gaps,
                "overlaps": self.overlaps,
                "resets": self.resets,
            },
        }
