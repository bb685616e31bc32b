"""Per-stream bounded queues between a stream's I/O thread and the device tick.

Every queue has a limit and a policy. Live streams thin their pictures when the tick falls behind (every
other one dropped, counted, never silent; see StreamQueue._thin) and drop their oldest audio; files read as fast as possible block the reader instead, so file QC sees every
frame. Status messages (connect, disconnect, errors, end of input) are never dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engine.media import AudioChunk, SourceStatus, StreamCounters, VideoFrame


@dataclass
class Drained:
    video: list[VideoFrame] = field(default_factory=list)
    audio: list[AudioChunk] = field(default_factory=list)
    status: list[SourceStatus] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.video or self.audio or self.status)


class StreamQueue:
    def __init__(
        self,
        counters: StreamCounters,
        max_video: int = 64,
        max_audio: int = 256,
        block: bool = False,
        wakeup: threading.Event | None = None,
        wake_at: int = 16,
    ) -> None:
        self.counters = counters
        self.max_video = max_video
        self.max_audio = max_audio
        self.block = block
        self._video: deque[VideoFrame] = deque()
        self._audio: deque[AudioChunk] = deque()
        self._status: deque[SourceStatus] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._wakeup = wakeup
        # The tick is woken early only when a whole batch is waiting: waking it for every frame would
        # score tiny batches and spend the CPU on per-call overhead instead of on the kernels.
        self.wake_at = wake_at
        self.last_arrival: float | None = None

    def close(self) -> None:
        """Unblocks a waiting producer for good (stream removed or engine stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _put(self, q: deque, item: object, limit: int, dropped_attr: str, now: float | None) -> bool:
        with self._cond:
            if self.block:
                while len(q) >= limit and not self._closed:
                    self._cond.wait(0.1)
            elif len(q) >= limit and q is self._video:
                self._thin()
            elif len(q) >= limit:
                q.popleft()
                setattr(self.counters, dropped_attr, getattr(self.counters, dropped_attr) + 1)
            if self._closed:
                return False
            q.append(item)
            if now is not None:
                self.last_arrival = now
            full = len(self._video) >= self.wake_at
        if full and self._wakeup is not None:
            self._wakeup.set()
        return True

    def _thin(self) -> None:
        """A live queue that is full drops every other picture, and each kept picture stands for the one
        dropped after it (its duration grows by that one's). The tick behind then scores the same stretch of
        time at a lower picture rate, without holes, so a black or frozen picture still adds up to its onset
        and fires; dropping the oldest pictures instead scored short runs with holes between them, and under
        sustained overload no fault ever filled its onset. The queue keeps its limit and, since the tick
        takes the oldest pictures first, its lag stays bounded (about two ticks)."""
        kept: list[VideoFrame] = []
        for i, f in enumerate(self._video):
            if i % 2 == 0:
                kept.append(f)
            else:
                kept[-1].duration += f.duration
        self.counters.frames_dropped += len(self._video) - len(kept)
        self._video.clear()  # in place: _put holds this deque
        self._video.extend(kept)

    def put_video(self, frame: VideoFrame, now: float | None = None) -> bool:
        return self._put(self._video, frame, self.max_video, "frames_dropped", now)

    def put_audio(self, chunk: AudioChunk, now: float | None = None) -> bool:
        return self._put(self._audio, chunk, self.max_audio, "audio_dropped", now)

    def put_status(self, status: SourceStatus) -> None:
        with self._cond:
            self._status.append(status)
        if self._wakeup is not None:
            self._wakeup.set()

    def empty(self) -> bool:
        """Nothing queued (read without the lock: a frame arriving meanwhile is simply taken next tick)."""
        return not (self._video or self._audio or self._status)

    def wait_taken(self, timeout: float) -> bool:
        """Wait until every queued picture has been taken by the tick (False: timeout or closed)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._video and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._closed

    def drain(self, max_video: int, max_audio: int | None = None) -> Drained:
        """Up to max_video frames and max_audio audio chunks (all of them without a limit), and the news.
        Bounding both bounds a tick's work when the scoring falls behind: the queues drop their oldest
        items (counted) and every stream is still scored every tick, instead of one huge tick."""
        with self._cond:
            out = Drained()
            while self._video and len(out.video) < max_video:
                out.video.append(self._video.popleft())
            while self._audio and (max_audio is None or len(out.audio) < max_audio):
                out.audio.append(self._audio.popleft())
            # End of input goes out after the frames and audio queued before it; other news (a disconnect, an
            # error) at once, so a live queue that never empties cannot hold it back.
            keep: deque[SourceStatus] = deque()
            for st in self._status:
                (keep if st.kind == "eof" and (self._video or self._audio) else out.status).append(st)
            self._status = keep
            self._cond.notify_all()
        return out

    def ready(self, frames: int) -> bool:
        """Whether draining now is worth a tick: a whole batch of frames, news (end of input, errors), or
        audio piling up (a producer that waits on a full audio queue must not wait for video that cannot
        come)."""
        with self._cond:
            return len(self._video) >= frames or bool(self._status) or len(self._audio) >= self.max_audio // 2

    def pending(self) -> int:
        with self._cond:
            return len(self._video) + len(self._audio) + len(self._status)
