"""Encode clean frames into MPEG-TS, and decode a (possibly damaged) MPEG-TS the way a viewer's player does:
FFmpeg's decoder with its default error concealment. PyAV does both."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeSpec:
    codec: str  # "h264" | "hevc"
    bitrate: int  # bits/s
    gop: int  # frames between key frames
    slices: int = 4  # broadcast encoders cut pictures into slices so one loss does not take the whole picture
    bframes: int = 2


_ENCODERS = {"h264": "libx264", "hevc": "libx265"}


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB to planar 4:2:0 Y'CbCr (BT.601, limited range) as one (H*3/2, W) array, each chroma
    sample from its 2x2 pixels' mean colour. Integer arithmetic here instead of FFmpeg's swscale, whose SIMD
    paths differ between CPUs by a level here and there: the data set has to be the same bytes on every machine
    that builds it, and one level moved changes the encode, hence where damage lands and every label after."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} is not even")
    x = rgb.astype(np.int32)
    y = ((66 * x[..., 0] + 129 * x[..., 1] + 25 * x[..., 2] + 128) >> 8) + 16
    s = x.reshape(h // 2, 2, w // 2, 2, 3).sum((1, 3))  # four times each 2x2 mean
    u = ((-38 * s[..., 0] - 74 * s[..., 1] + 112 * s[..., 2] + 512) >> 10) + 128
    v = ((112 * s[..., 0] - 94 * s[..., 1] - 18 * s[..., 2] + 512) >> 10) + 128
    planes = [np.clip(c, 0, 255).astype(np.uint8).ravel() for c in (y, u, v)]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def i420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The inverse of rgb_to_i420 (chroma repeated over its 2x2 pixels), in integers for the same reason."""
    c = y.astype(np.int32) - 16
    d = np.repeat(np.repeat(u.astype(np.int32) - 128, 2, 0), 2, 1)[: y.shape[0], : y.shape[1]]
    e = np.repeat(np.repeat(v.astype(np.int32) - 128, 2, 0), 2, 1)[: y.shape[0], : y.shape[1]]
    rgb = np.stack([298 * c + 409 * e, 298 * c - 100 * d - 208 * e, 298 * c + 516 * d], -1)
    return np.clip((rgb + 128) >> 8, 0, 255).astype(np.uint8)


def encode_ts(frames: list[np.ndarray], fps: int, spec: EncodeSpec, x264_asm: str | None = None) -> bytes:
    """The frames encoded to MPEG-TS, the same bytes on every x86-64 CPU. `x264_asm` limits x264's instruction
    sets (as its `asm` option: "SSE2", "AVX2" ...), for the test that the output does not depend on them."""
    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mpegts") as out:
        st = out.add_stream(_ENCODERS[spec.codec], rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.bit_rate = spec.bitrate
        st.codec_context.gop_size = spec.gop
        # One thread: x264's and x265's threaded rate control depends on timing, and the data set must be the
        # same bytes for the same recipe. (The builder runs clips in parallel processes instead.)
        st.codec_context.thread_count = 1
        # Nor may the CPU decide: x264 picks some algorithms by instruction set (its AVX-512 code gave another
        # stream than its AVX2 code) unless `cpu-independent` is set, and x265's own SIMD primitives do not
        # agree with each other (SSE2, AVX2 and plain C gave three streams), so x265 runs its C code, which at
        # this preset and size is no slower.
        if spec.codec == "h264":
            asm = f"asm={x264_asm}:" if x264_asm else ""
            st.options = {"preset": "veryfast", "bf": str(spec.bframes),
                          "x264-params": f"{asm}cpu-independent=1:threads=1:lookahead-threads=1:scenecut=0:slices={spec.slices}:keyint={spec.gop}:min-keyint={spec.gop}:vbv-maxrate={spec.bitrate // 1000}:vbv-bufsize={spec.bitrate // 1000}"}
        else:
            st.options = {"preset": "ultrafast", "x265-params": (
                f"log-level=error:asm=false:pools=1:frame-threads=1:slices={spec.slices}:keyint={spec.gop}:min-keyint={spec.gop}:bframes={spec.bframes}:scenecut=0:"
                f"vbv-maxrate={spec.bitrate // 1000}:vbv-bufsize={spec.bitrate // 1000}:repeat-headers=1")}
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb_to_i420(rgb), format="yuv420p")
            f.pts = i
            f.time_base = Fraction(1, fps)
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return buf.getvalue()


def video_pid(data: bytes) -> int:
    with av.open(io.BytesIO(data), format="mpegts") as c:
        return int(c.streams.video[0].id)


def remux_packets(data: bytes, mutate) -> bytes:
    """The same TS with each video packet's payload passed through `mutate(bytes, is_key) -> bytes`."""
    out_buf = io.BytesIO()
    with av.open(io.BytesIO(data), format="mpegts") as src, av.open(out_buf, "w", format="mpegts") as out:
        ins = src.streams.video[0]
        ost = out.add_stream_from_template(ins)
        for p in src.demux(ins):
            if p.size == 0:
                continue
            q = av.Packet(mutate(bytes(p), bool(p.is_keyframe)))
            q.pts, q.dts, q.time_base = p.pts, p.dts, p.time_base
            q.is_keyframe = p.is_keyframe
            q.stream = ost
            out.mux(q)
    return out_buf.getvalue()


def decode_luma(data: bytes) -> tuple[dict[int, np.ndarray], int]:
    """Luma planes of every picture the decoder gives, by pts (90 kHz ticks), and the number of decode errors
    it reported. Damaged input is never an exception here: FFmpeg conceals what it can and goes on."""
    pictures, errors = decode_pictures(data)
    return {pts: p[0] for pts, p in pictures.items()}, errors


def decode_pictures(data: bytes) -> tuple[dict[int, tuple[np.ndarray, bool, bool, bool]], int]:
    """decode_luma with the decoder's key-frame and concealed-error flags of each picture and the loss evidence
    the engine's decoder gives it (the same DamageTracker on the same packets): ({pts: (luma, key_frame,
    corrupt, damaged)}, decode errors)."""
    from engine.decode.base import DamageTracker
    from engine.decode.pyav import decode_packet, loss_evidence

    frames: dict[int, tuple[np.ndarray, bool, bool, bool]] = {}
    errors = 0
    try:
        c = av.open(io.BytesIO(data), format="mpegts")
    except av.error.FFmpegError:
        return frames, 1
    tracker = DamageTracker()
    with c:
        st = c.streams.video[0]
        # One thread. Slice threads switch FFmpeg's H.264 error concealment off (its `enable_er` defaults to off
        # with them): damage came out unconcealed, two to three times the luma error of what a player shows, and
        # no picture was flagged as concealed. Frame threads conceal, but from whatever reference state the
        # threads reached, so not the same bytes run to run. One thread conceals as a player and the engine's
        # frame-threaded decoder do (the same error level; frame threads differ in detail).
        st.codec_context.thread_type = "NONE"
        st.codec_context.thread_count = 1
        packets = c.demux(st)
        while True:
            try:
                p = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                errors += 1
                continue
            out, failed, logged = decode_packet(st.codec_context, p if p.size else None)
            errors += failed
            if p.size:
                tracker.note_packet(p, st.codec_context.name, loss_evidence(st.codec_context.name, failed, logged))
            for f in out:
                if f.pts is not None:
                    y = f.to_ndarray(format="gray") if f.format.name not in ("yuv420p", "yuvj420p") else \
                        np.frombuffer(f.planes[0], np.uint8).reshape(-1, f.planes[0].line_size)[:f.height, :f.width].copy()
                    corrupt = bool(getattr(f, "is_corrupt", False))
                    frames[int(f.pts)] = (y, bool(f.key_frame), corrupt, tracker.take(f.pts) or corrupt)
                    if corrupt:
                        tracker.concealed()
    return frames, errors
