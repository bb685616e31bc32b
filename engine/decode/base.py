"""The decoder interface every backend implements (PyAV now; NVDEC through PyNvVideoCodec next).

A decoder takes demuxed packets of one stream and returns frames with timestamps in raw stream seconds
(None when unknown); the source normalises them. Errors in a packet are counted, never raised: FFmpeg
conceals what it can and the stream goes on.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.media import AudioChunk, VideoFrame


class VideoDecoder(Protocol):
    backend: str
    fps: float  # nominal frame rate, for frame durations
    errors: int  # packets that failed to decode
    corrupt: int  # frames output with concealed errors

    def decode(self, packet: Any) -> list[tuple[float | None, VideoFrame]]:
        """Frames completed by this packet, each with its raw presentation time in seconds."""
        ...

    def flush(self) -> list[tuple[float | None, VideoFrame]]: ...


class AudioDecoder(Protocol):
    errors: int

    def decode(self, packet: Any) -> list[tuple[float | None, AudioChunk]]: ...

    def flush(self) -> list[tuple[float | None, AudioChunk]]: ...


class DamageTracker:
    """Loss and damage evidence of a video stream, as the transport and the decoder report it, carried to the
    pictures it may affect.

    A lost or garbled packet damages its picture and, through prediction, every picture decoded after it until
    the next key frame heals the stream. So in decode order: a packet the demuxer flags as corrupt (an MPEG-TS
    continuity-counter gap: lost TS packets) or that the decoder rejects marks the stream damaged; a key-frame
    packet that arrives whole clears the mark. Each packet's picture is noted with the mark as it stood after
    that packet (`note`), and the picture takes it when it leaves the decoder, reordered by its timestamp
    (`take`). Bounded: notes of pictures that never came out are dropped beyond `limit`."""

    def __init__(self, limit: int = 64) -> None:
        self.damaged = False
        self.limit = limit
        self._notes: dict[int, bool] = {}

    def note(self, pts: int | None, key: bool, bad: bool) -> None:
        self.damaged = bad if key else (self.damaged or bad)
        if pts is None:
            return
        self._notes[int(pts)] = self.damaged
        while len(self._notes) > self.limit:
            del self._notes[next(iter(self._notes))]

    def take(self, pts: int | None) -> bool:
        if pts is None:
            return self.damaged
        return self._notes.pop(int(pts), self.damaged)
