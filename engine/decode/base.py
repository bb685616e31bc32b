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
