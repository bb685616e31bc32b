"""Files decoded by PyNvVideoCodec's ThreadedDecoder: the GPU density path for tier `all`.

Demux and decode run in native threads, so hundreds of these sources share one Python process without the
GIL limiting NVDEC. Audio, when the file has any, is read by a PyAV audio-only reader in a second thread
into the same queue. Where NVDEC cannot take the file, the source says why (logged and counted) and reads it
with MediaSource on the CPU instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from engine.batch import StreamQueue
from engine.media import SourceStatus
from engine.sources.base import Source, SourceOptions, Timeline
from engine.sources.media import MediaSource, describe_error

log = logging.getLogger(__name__)


class _AudioOnly:
    """The stream's queue as the audio reader sees it: its audio goes through, its end-of-input and
    connection news do not (the video reader owns them); errors are passed on."""

    def __init__(self, queue: StreamQueue) -> None:
        self._q = queue

    def __getattr__(self, name: str) -> Any:
        return getattr(self._q, name)

    def put_video(self, frame: Any, now: float | None = None) -> bool:
        return True

    def put_status(self, status: SourceStatus) -> None:
        if status.kind == "error":
            self._q.put_status(SourceStatus("error", f"audio: {status.message}", status.wallclock))


class NvdecFileSource(Source):
    live = False

    def __init__(self, url: str, options: SourceOptions) -> None:
        super().__init__(url, options)
        self.path = url[len("file://"):] if url.startswith("file://") else url
        self.batch = max(1, int(options.decode_batch))

    def _probe(self) -> tuple[bool, bool, str | None]:
        """(has audio, full-range video, video codec) from the container, read once with PyAV. NvdecUnavailable
        for pictures the NVDEC path cannot read (10-bit, 4:2:2, 4:4:4)."""
        import av

        from engine.decode.nvdec import NvdecUnavailable, format_problem

        with av.open(self.path, metadata_errors="replace") as c:
            vs = c.streams.video[0] if c.streams.video else None
            problem = format_problem(vs.codec_context) if vs is not None else None
            if problem:
                raise NvdecUnavailable(problem)
            full = vs is not None and (
                int(getattr(vs.codec_context, "color_range", 0) or 0) == 2
                or (vs.codec_context.pix_fmt or "").startswith("yuvj")
            )
            if c.duration is not None:
                self.info.duration = c.duration / 1_000_000
            self.info.container = c.format.name
            if c.streams.audio:
                a = c.streams.audio[0].codec_context
                self.info.audio_codec, self.info.audio_channels, self.info.audio_rate = a.name, a.channels, a.sample_rate
            return bool(c.streams.audio) and self.options.audio, full, vs.codec_context.name if vs else None

    def _fallback(self, queue: StreamQueue, stop: threading.Event, exc: BaseException) -> None:
        why = f"NVDEC unavailable, decoding on the CPU: {describe_error(exc)}"
        queue.counters.decoder_fallbacks += 1
        log.warning("%s: %s", self.url, why)
        fallback = MediaSource(self.url, self.options)
        fallback.info.decoder_note = why
        self.info = fallback.info
        return fallback.run(queue, stop)

    def run(self, queue: StreamQueue, stop: threading.Event) -> None:
        from engine.decode.nvdec import NvdecUnavailable, ThreadedFileDecoder

        if not os.path.exists(self.path):
            queue.put_status(SourceStatus("error", f"no such file: {self.path}", time.time()))
            queue.put_status(SourceStatus("eof", "", time.time()))
            return
        try:
            has_audio, full, codec = self._probe()
        except NvdecUnavailable as exc:  # pictures NVDEC's path cannot read (10-bit...): the CPU, said
            return self._fallback(queue, stop, exc)
        except Exception as exc:  # unreadable: the CPU reader reports it in its own words
            log.debug("probe failed: %s", exc)
            return MediaSource(self.url, self.options).run(queue, stop)
        try:
            dec = ThreadedFileDecoder(self.path, self.options.device, self.batch, full,
                                      keep_luma=self.options.keep_luma)
        except Exception as exc:  # NvdecUnavailable or a session that fails to open: fall back, reported
            return self._fallback(queue, stop, exc)
        info = self.info
        info.decoder = dec.backend
        info.video_codec = codec or dec.codec
        info.width, info.height, info.fps = dec.width, dec.height, dec.fps
        queue.put_status(SourceStatus("connected", "", time.time(), info=info))
        audio_thread = None
        if has_audio:
            opts = SourceOptions(**{**self.options.__dict__, "video": False, "audio": True, "decoder": "pyav"})
            reader = MediaSource(self.url, opts)
            audio_thread = threading.Thread(target=reader.run, args=(_AudioOnly(queue), stop), daemon=True,
                                            name=f"{threading.current_thread().name}-audio")
            audio_thread.start()
        timeline = Timeline(live=False)
        timeline.origin = 0.0
        counters = queue.counters
        try:
            while not stop.is_set() and not queue.closed:
                items = dec.next_batch()
                if not items:
                    break
                now = time.time()
                for raw, frame in items:
                    frame.pts = timeline.map(raw, frame.duration, now)
                    frame.index = counters.video_frames
                    counters.video_frames += 1
                    queue.put_video(frame, now)
        except Exception as exc:  # a failing session ends this stream only, with the reason
            queue.put_status(SourceStatus("error", f"NVDEC: {describe_error(exc)}", time.time()))
        finally:
            dec.close()
        if audio_thread is not None:
            audio_thread.join()
        queue.put_status(SourceStatus("eof", "", time.time()))
