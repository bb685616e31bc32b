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
    continuity-counter gap: lost TS packets), one the decoder rejects, or a picture the decoder had to conceal
    errors in marks the stream damaged; a key-frame packet that arrives whole clears the mark. Each packet's
    picture is noted with the mark as it stood after that packet (`note`), and the picture takes it when it
    leaves the decoder, reordered by its timestamp (`take`). Bounded: notes of pictures that never came out are
    dropped beyond `limit`.

    The demuxer's flag arrives one packet early. FFmpeg's parser (H.264, HEVC and MPEG-2 in MPEG-TS) can only
    end a picture when the next one starts, so it emits picture n while it is fed the PES of picture n+1, and
    the flag of that PES goes on the packet it emits: the flag on packet n says that packet n+1 came in short.
    Read as damage of its own packet, a flag marked the clean picture before the loss and, when the loss took
    the start of a key frame, let that damaged key frame clear the mark for its whole GOP (measured on the
    corruption data's held-out decodes: 24 % of the corrupt pictures carried the mark at 97 % precision
    before, 43 % at 99.5 % after)."""

    def __init__(self, limit: int = 64) -> None:
        self.damaged = False
        self.limit = limit
        self._flagged = False  # the demuxer flagged the previous packet: this one came in short
        self._notes: dict[int, bool] = {}

    def note(self, pts: int | None, key: bool, flagged: bool, rejected: bool = False) -> None:
        """One packet in decode order: `flagged` is the demuxer's corrupt flag on it, `rejected` whether the
        decoder refused it."""
        bad = rejected or self._flagged
        self._flagged = flagged
        self.damaged = bad if key else (self.damaged or bad)
        if pts is None:
            return
        self._notes[int(pts)] = self.damaged
        while len(self._notes) > self.limit:
            del self._notes[next(iter(self._notes))]

    def concealed(self) -> None:
        """A picture came out with errors the decoder concealed: what follows may predict from it."""
        self.damaged = True

    def take(self, pts: int | None) -> bool:
        if pts is None:
            return self.damaged
        return self._notes.pop(int(pts), self.damaged)
