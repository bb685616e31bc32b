"""Density tiers: which compressed video packets a stream decodes at all.

Dropping packets before the decoder is what makes a cheaper tier cheaper on every backend: NVDEC (or the
CPU) never sees them. Both backends take the same decision from the same bytes, so the CPU and GPU paths
analyse exactly the same frames.

- `all`: every frame.
- `skip_nonref`: frames no other frame predicts from (H.264 nal_ref_idc 0, HEVC *_N pictures). Dropping
  them cannot damage any other picture; with B-frames that is typically a third to a half of the frames.
- `keyframes`: random-access pictures only (IDR/CRA), one per GOP.
"""

from __future__ import annotations

from enum import StrEnum


class Tier(StrEnum):
    ALL = "all"
    SKIP_NONREF = "skip_nonref"
    KEYFRAMES = "keyframes"


TIERS = tuple(t.value for t in Tier)

_H264_VCL = range(1, 6)
_HEVC_VCL = range(0, 32)


def _nal_units(data: bytes, length_size: int) -> list[int]:
    """Offsets of NAL unit headers: Annex B start codes when present, else length-prefixed (MP4/MKV)."""
    if data[:3] == b"\x00\x00\x01" or data[:4] == b"\x00\x00\x00\x01":
        out = []
        i = 0
        n = len(data)
        while True:
            j = data.find(b"\x00\x00\x01", i)
            if j < 0 or j + 3 >= n:
                break
            out.append(j + 3)
            i = j + 3
        return out
    out = []
    i = 0
    while i + length_size < len(data):
        size = int.from_bytes(data[i : i + length_size], "big")
        if size <= 0:
            break
        out.append(i + length_size)
        i += length_size + size
    return out


def is_reference(codec: str, data: bytes, length_size: int = 4) -> bool | None:
    """Whether the picture in this packet may be used for prediction; None when the packet holds no slice
    of a codec we can read (then the packet is kept: unknown is never dropped)."""
    if codec == "h264":
        for off in _nal_units(data, length_size):
            b = data[off]
            if (b & 0x1F) in _H264_VCL:
                return ((b >> 5) & 3) != 0
        return None
    if codec in ("hevc", "h265"):
        for off in _nal_units(data, length_size):
            t = (data[off] >> 1) & 0x3F
            if t in _HEVC_VCL:
                # Types 0..14 with an even number are sub-layer non-reference pictures (TRAIL_N, TSA_N, STSA_N,
                # RADL_N, RASL_N and the reserved _N types).
                return not (t <= 14 and t % 2 == 0)
        return None
    return None


class TierFilter:
    """Decides per packet whether it is decoded in a tier. Counts what it drops."""

    def __init__(self, tier: Tier | str, codec: str, length_size: int = 4) -> None:
        self.tier = Tier(tier)
        self.codec = codec
        self.length_size = length_size
        self.kept = 0
        self.dropped = 0

    @classmethod
    def for_stream(cls, tier: Tier | str, stream: object) -> TierFilter:
        """The filter for a PyAV video stream (codec and NAL length size from its parameters)."""
        cc = stream.codec_context  # type: ignore[attr-defined]
        return cls(tier, cc.name, nal_length_size(bytes(cc.extradata or b""), cc.name))

    def keep(self, data: bytes | memoryview, key: bool) -> bool:
        if self.tier is Tier.ALL:
            ok = True
        elif self.tier is Tier.KEYFRAMES:
            ok = key
        else:
            # 64 bytes hold the first slice header in practice, after any AUD/SPS/PPS/SEI: those large SEI
            # units (x264's settings string) come before, so look further only when needed.
            head = bytes(data[:64])
            ref = is_reference(self.codec, head, self.length_size)
            if ref is None and len(data) > 64:
                ref = is_reference(self.codec, bytes(data), self.length_size)
            ok = key or ref is None or ref
        if ok:
            self.kept += 1
        else:
            self.dropped += 1
        return ok


def nal_length_size(extradata: bytes | None, codec: str) -> int:
    """NAL length prefix size from avcC/hvcC extradata (4 when unknown or Annex B)."""
    if not extradata or extradata[:3] in (b"\x00\x00\x01",) or extradata[:4] == b"\x00\x00\x00\x01":
        return 4
    try:
        if codec == "h264" and extradata[0] == 1:
            return (extradata[4] & 3) + 1
        if codec in ("hevc", "h265") and len(extradata) > 21:
            return (extradata[21] & 3) + 1
    except IndexError:
        pass
    return 4
