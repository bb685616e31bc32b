"""The decoder interface every backend implements (PyAV now; NVDEC through PyNvVideoCodec next).

A decoder takes demuxed packets of one stream and returns frames with timestamps in raw stream seconds
(None when unknown); the source normalises them. Errors in a packet are counted, never raised: FFmpeg
conceals what it can and the stream goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
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


# How far into a packet the first slice header is looked for: past the access unit delimiter, parameter sets
# and SEI that precede it (x264's first SEI alone is about 700 bytes).
_SCAN = 4096
_HEVC_NON_REF = frozenset(range(0, 15, 2))  # TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N, reserved _N types


def annex_b_units(data: bytes) -> Iterator[int]:
    """Offsets of the NAL unit headers (or MPEG-2 start code values) in Annex B bytes."""
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        yield i + 3
        i = data.find(b"\x00\x00\x01", i + 3)


def is_slice(header: int, codec: str) -> bool:
    """An H.264 slice NAL unit (non-IDR or IDR) or an HEVC slice segment (a VCL type)."""
    return (header & 0x1F) in (1, 5) if codec == "h264" else ((header >> 1) & 0x3F) < 32


def picture_reference(data: bytes | memoryview, codec: str) -> tuple[bool, bool]:
    """(reference, layered) of the picture an Annex B / MPEG-2 packet carries, from its first slice or picture
    header: `reference` False only when the header says no picture may predict from this one (H.264
    nal_ref_idc 0, an HEVC sub-layer non-reference type, an MPEG-2 B picture); `layered` True for an HEVC slice
    of a temporal sub-layer above the lowest. Unknown codecs and unreadable packets count as reference: a
    wrong True only keeps today's caution, a wrong False would drop evidence."""
    head = bytes(data[:_SCAN])
    for o in annex_b_units(head[:-1]):  # every header read here has a byte after it
        b = head[o]
        if codec in ("h264", "hevc"):
            if is_slice(b, codec):
                return ((b >> 5) & 3 != 0, False) if codec == "h264" else \
                    (((b >> 1) & 0x3F) not in _HEVC_NON_REF, (head[o + 1] & 7) > 1)
        elif codec in ("mpeg2video", "mpeg1video"):
            if b == 0x00 and o + 2 < len(head):  # picture_start_code: temporal_reference(10) picture_coding_type(3)
                return (head[o + 2] >> 3) & 7 != 3, False
        else:
            break
    return True, False


def annex_b(extradata: bytes | None) -> bool:
    """Whether a stream's packets are in Annex B: no extradata (MPEG-TS) or extradata with start codes, where
    MP4 and Matroska carry avcC/hvcC and length-prefixed packets."""
    return not extradata or extradata[:3] == b"\x00\x00\x01" or extradata[:4] == b"\x00\x00\x00\x01"


def slice_count(data: bytes | memoryview, codec: str) -> int | None:
    """Slices in an Annex B packet (H.264 slice NAL units, HEVC slice segments); None for other codecs. Start
    codes cannot occur inside a NAL unit (emulation prevention), so counting them is exact."""
    if codec not in ("h264", "hevc"):
        return None
    b = bytes(data)
    return sum(is_slice(b[o], codec) for o in annex_b_units(b))


# Pictures in a row, a key frame among them, with the same number of slices before a stream's slice layout is
# taken as fixed (slice_count, DamageTracker).
LAYOUT_RUN = 30


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

    A picture no other picture predicts from (`reference` False: picture_reference) is marked alone: its damage
    goes nowhere. Marking the stream from it flagged every whole picture after a lost B slice to the end of the
    GOP (measured on the corruption data's held-out decodes: most of the H.264 pictures flagged without visible
    damage). HEVC streams with temporal sub-layers keep the stream-wide mark, since a sub-layer non-reference
    picture may still be predicted from by a higher layer.

    A picture with fewer slices than the stream's fixed layout lost one (`slices`: slice_count). Broadcast
    encoders cut every picture into the same slices, and a slice lost before the transport (a contribution link,
    a remux) leaves whole TS packets: FFmpeg's H.264 decoder conceals the hole and says so, its HEVC decoder
    leaves it unconcealed and says nothing (measured on the corruption data's held-out decodes: the HEVC slice
    losses were most of the short damage episodes no other evidence or the model found). The layout counts as
    fixed after LAYOUT_RUN pictures in a row with the same count, a key frame among them: encoders that cut
    slices by size give key frames more slices than the pictures between them, so they never qualify. A key
    frame with another count starts learning afresh (a new encoder configuration) without a mark.

    The demuxer's flag arrives one packet early. FFmpeg's parser (H.264, HEVC and MPEG-2 in MPEG-TS) can only
    end a picture when the next one starts, so it emits picture n while it is fed the PES of picture n+1, and
    the flag of that PES goes on the packet it emits: the flag on packet n says that packet n+1 came in short.
    Read as damage of its own packet, a flag marked the clean picture before the loss and, when the loss took
    the start of a key frame, let that damaged key frame clear the mark for its whole GOP (measured on the
    corruption data's held-out decodes: 24 % of the corrupt pictures carried the mark at 97 % precision
    before, 43 % at 99.5 % after)."""

    def __init__(self, limit: int = 64, annexb: bool = True) -> None:
        self.damaged = False
        # Packets in Annex B (MPEG-TS, RTP, raw streams): slices are counted only there. MP4's length-prefixed
        # packets can hold a start code's bytes in a length field, which would count slices that are not.
        self.annexb = annexb
        self.limit = limit
        self.layered = False  # an HEVC temporal sub-layer was seen: non-reference types may still be predicted from
        self._flagged = False  # the demuxer flagged the previous packet: this one came in short
        self._notes: dict[int, tuple[bool, bool, bool, int]] = {}  # pts -> (mark, reference, key, decode index)
        self._taken_ref = True
        self._taken_at: int | None = None  # decode index of the picture last taken (None: it had no note)
        self._seq = 0  # decode index of the next packet
        self._last_key = -1  # decode index of the last key-frame packet
        self.layout: int | None = None  # slices per picture, once the stream's layout is known to be fixed
        self._run: tuple[int | None, int, bool] = (None, 0, False)  # (slices, pictures in a row, a key frame among them)

    def _slices_short(self, key: bool, slices: int | None) -> bool:
        if not slices:  # not known, or a packet without a picture (parameter sets, an end of sequence)
            return False
        if self.layout is not None and slices < self.layout and not key:
            return True
        if key and self.layout is not None and slices != self.layout:
            self.layout, self._run = None, (None, 0, False)
        count, n, seen_key = self._run
        self._run = (count, n + 1, seen_key or key) if slices == count else (slices, 1, key)
        if self._run[1] >= LAYOUT_RUN and self._run[2]:
            self.layout = slices
        return False

    def note(self, pts: int | None, key: bool, flagged: bool, rejected: bool = False, reference: bool = True,
             layered: bool = False, slices: int | None = None) -> None:
        """One packet in decode order: `flagged` is the demuxer's corrupt flag on it, `rejected` whether the
        decoder refused it, `reference` and `layered` what picture_reference read in it, `slices` how many
        slices it holds (slice_count; None: not known)."""
        bad = self._slices_short(key, slices) or rejected or self._flagged
        self._flagged = flagged
        self.layered = self.layered or layered
        reference = reference or key or self.layered
        mark = bad if key else (self.damaged or bad)
        if reference:
            self.damaged = mark
        seq, self._seq = self._seq, self._seq + 1
        if key:
            self._last_key = seq
        if pts is None:
            return
        self._notes[int(pts)] = (mark, reference, key, seq)
        while len(self._notes) > self.limit:
            del self._notes[next(iter(self._notes))]

    def note_packet(self, packet: Any, codec: str, rejected: bool = False) -> None:
        """note() for a demuxed PyAV packet (pts, key and corrupt flags, payload) of a stream in `codec`."""
        ref, layered = picture_reference(memoryview(packet), codec) if packet.size else (True, False)
        slices = slice_count(memoryview(packet), codec) if packet.size and self.annexb else None
        self.note(packet.pts, bool(packet.is_keyframe), bool(packet.is_corrupt), rejected, ref, layered, slices)

    def concealed(self) -> None:
        """The picture last taken came out with errors the decoder concealed: what was decoded after it may
        predict from it, unless nothing predicts from it, up to the next key frame.

        The flag comes with the picture, in display order, one or two packets after the packet that carried it:
        the pictures decoded in between (B pictures that predict from it) are still waiting in the decoder, and
        their notes are marked here. Marking only the stream from now on left them unmarked (measured on the
        corruption data's training and validation H.264 decodes: they were most of the damaged pictures that
        only the decoder's logged errors caught), and marked a GOP that a whole key frame had already begun."""
        if not (self._taken_ref or self.layered):
            return
        if self._taken_at is None:
            self.damaged = True
            return
        healed = self._last_key > self._taken_at
        end = self._last_key if healed else self._seq
        for pts, (mark, reference, key, seq) in self._notes.items():
            if self._taken_at < seq < end and not mark:
                self._notes[pts] = (True, reference, key, seq)
        if not healed:
            self.damaged = True

    def take(self, pts: int | None) -> bool:
        return self.take_picture(pts)[0]

    def take_picture(self, pts: int | None) -> tuple[bool, bool]:
        """(damaged, key frame) of the picture with this pts, as its packet said: NVDEC's pictures carry no key
        flag of their own, and the corruption detector's hold ends at key frames."""
        mark, key, self._taken_ref, self._taken_at = self.damaged, False, True, None
        if pts is not None and int(pts) in self._notes:
            mark, self._taken_ref, key, self._taken_at = self._notes.pop(int(pts))
        return mark, key
