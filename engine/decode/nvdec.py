"""NVDEC decoding through PyNvVideoCodec: frames stay on the GPU as torch tensors (DLPack, no host copy).

Two ways in, both producing the core's VideoFrame:

- `NvdecVideoDecoder` is a packet-level backend for MediaSource: PyAV demuxes (files, live URLs, audio,
  reconnects, timestamps: all shared with the CPU path), the packets are rewritten to Annex B and handed to
  one NVDEC session per stream. Density tiers drop packets before they reach it.
- `NvdecFileSource` decodes a whole file with PyNvVideoCodec's ThreadedDecoder: demux and decode run in
  native threads without the GIL, and Python only collects batches of finished surfaces. This is the
  density path for files at tier `all`.

PyNvVideoCodec is imported lazily: the rest of framewatch (and every CPU test) runs without it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.decode.base import DamageTracker, annex_b
from engine.decode.gpu_frames import convert_surfaces, thumbnail_rgb
from engine.media import ColorRange, LumaSummary, VideoFrame

log = logging.getLogger(__name__)

_NVC: Any = None
_NVC_ERROR: str | None = None
_LOCK = threading.Lock()

# FFmpeg codec name -> PyNvVideoCodec cudaVideoCodec member name
_CODECS = {"h264": "H264", "hevc": "HEVC", "av1": "AV1", "vp9": "VP9", "vp8": "VP8", "mpeg2video": "MPEG2",
           "mpeg4": "MPEG4", "vc1": "VC1", "mjpeg": "JPEG"}


class NvdecUnavailable(RuntimeError):
    """NVDEC cannot decode this stream here (no GPU, no PyNvVideoCodec, codec not supported)."""


def load() -> Any:
    """The PyNvVideoCodec module, or NvdecUnavailable with the reason (cached)."""
    global _NVC, _NVC_ERROR
    with _LOCK:
        if _NVC is not None:
            return _NVC
        if _NVC_ERROR is not None:
            raise NvdecUnavailable(_NVC_ERROR)
        if not torch.cuda.is_available():
            _NVC_ERROR = "no CUDA device visible to torch"
            raise NvdecUnavailable(_NVC_ERROR)
        try:
            import PyNvVideoCodec as nvc  # noqa: N813
        except Exception as exc:  # ImportError, or its own RuntimeError when the driver lacks NVDEC/NVENC
            _NVC_ERROR = f"PyNvVideoCodec not usable: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            raise NvdecUnavailable(_NVC_ERROR) from None
        _NVC = nvc
        return nvc


def available() -> tuple[bool, str]:
    try:
        load()
        return True, "ok"
    except NvdecUnavailable as exc:
        return False, str(exc)


def gpu_index(device: str | torch.device) -> int:
    d = torch.device(device)
    if d.type != "cuda":
        raise NvdecUnavailable(f"NVDEC needs a CUDA device, not {d}")
    return d.index if d.index is not None else 0


# Pixel formats whose NVDEC output is 8-bit NV12, the only surface the conversion reads. 10-bit streams come
# out as P016 (16 bits a sample) and 4:2:2/4:4:4 ones in other layouts: read as NV12 they would give garbage
# pictures, so they are decoded on the CPU instead, and said (the same fallback as no NVDEC at all).
NV12_SOURCES = frozenset({"yuv420p", "yuvj420p", "nv12"})


def format_problem(codec_context: Any) -> str | None:
    """Why this stream's pictures cannot take the NVDEC path (None: they can, or the format is not known yet,
    as before a live stream's first sequence header)."""
    fmt = getattr(codec_context, "pix_fmt", None)
    if not fmt or fmt in NV12_SOURCES:
        return None
    return f"NVDEC frames are read as 8-bit 4:2:0 here, this stream is {fmt}"


def _codec(nvc: Any, name: str) -> Any:
    member = _CODECS.get(name)
    if member is None or not hasattr(nvc.cudaVideoCodec, member):
        raise NvdecUnavailable(f"NVDEC does not decode {name}")
    return getattr(nvc.cudaVideoCodec, member)


_CONVERSION: dict[int, torch.cuda.Stream] = {}


def conversion_stream(device: torch.device) -> torch.cuda.Stream:
    """The one CUDA stream per GPU on which decoded surfaces are turned into frames.

    Shared by every source on that GPU: torch's caching allocator keeps the blocks a stream freed for that
    stream alone, so with a stream per source each kept its own copy of the conversion's temporary buffers
    (tens of MB per stream at 1080p); one stream lets all sources reuse the same blocks."""
    index = device.index or 0
    with _LOCK:
        if index not in _CONVERSION:
            _CONVERSION[index] = torch.cuda.Stream(device)
        return _CONVERSION[index]


def frames_from_surfaces(
    surfaces: list[torch.Tensor], height: int | None, full: bool, stream: torch.cuda.Stream | None,
    keep_luma: bool = False,
) -> list[tuple[torch.Tensor | None, torch.Tensor, LumaSummary, Callable[[], Any]]]:
    """Copy a batch of decoded surfaces into frames: (luma or None, small, summary, rgb) per frame.

    `height` is the display height when known (else taken from each surface). Runs of surfaces of one size
    are converted together, so a resolution change inside a batch (the decoder reconfigured itself on a new
    sequence header) is handled. The work is queued on the stream's own CUDA stream and waited for once per
    batch here, in the source's thread (the wait releases the GIL): the scoring step then never needs to
    synchronise with decoders.
    """
    runs: list[list[torch.Tensor]] = []
    for s in surfaces:
        if runs and runs[-1][0].shape == s.shape:
            runs[-1].append(s)
        else:
            runs.append([s])
    out = []
    for run in runs:
        h = run[0].shape[0] * 2 // 3
        if height is not None and 0 <= h - height < 16:
            h = height  # coded height (macroblock/CTU padding) vs the picture's display height
        out.extend(_convert_run(run, h, full, stream, keep_luma))
    return out


def _convert_run(
    surfaces: list[torch.Tensor], height: int, full: bool, stream: torch.cuda.Stream | None, keep_luma: bool
) -> list[tuple[torch.Tensor | None, torch.Tensor, LumaSummary, Callable[[], Any]]]:
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        c = convert_surfaces(surfaces, height, full, keep_luma)
        done = torch.cuda.Event() if stream is not None else None
        if done is not None:
            done.record(stream)
    if done is not None:
        # The stream is shared by every source on the GPU: wait for this batch's work only, not for what
        # other sources queued after it.
        done.synchronize()
    width = int(surfaces[0].shape[-1])
    # One unbind per plane instead of an index per frame and plane: this runs in the source threads under the
    # GIL for every decoded picture, and each tensor call from Python costs microseconds.
    lumas = c.luma.unbind(0) if c.luma is not None else (None,) * len(surfaces)
    out = []
    for luma, s, ch, hist, rows in zip(lumas, c.small.unbind(0), c.chroma.unbind(0), c.hist.unbind(0), c.rows.unbind(0),
                                       strict=True):
        summary = LumaSummary(hist, rows, c.row_stride, height, width)
        out.append((luma, s, summary, lambda s=s, ch=ch: thumbnail_rgb(s.cpu().numpy(), ch.cpu().numpy(), full)))
    return out


class NvdecVideoDecoder:
    """Packet-level NVDEC decoder for one stream (the `nvdec` backend of MediaSource)."""

    backend = "nvdec"

    def __init__(self, stream: Any, threads: int = 0, device: str = "cuda:0", low_latency: bool = False,
                 keep_luma: bool = False) -> None:
        problem = format_problem(stream.codec_context)
        if problem:
            raise NvdecUnavailable(problem)
        nvc = load()
        self.name = stream.codec_context.name
        self.gpu = gpu_index(device)
        self.device = torch.device("cuda", self.gpu)
        codec = _codec(nvc, self.name)
        # The evidence the packets give (the demuxer's loss flag, refused packets, slices missing from the
        # layout) and each picture's key flag, as on the CPU path; NVDEC itself reports no concealment.
        self.damage = DamageTracker()
        self.rebind(stream)
        self.errors = 0
        self.corrupt = 0
        self.keep_luma = keep_luma
        self.cuda_stream = torch.cuda.Stream(self.device)
        self._nvc = nvc
        # A sparse tier feeds whole, independent pictures: ask for each one as soon as it is decoded, not
        # when the next packet (a GOP later) pushes it out.
        self._eop = None
        self._dec = None
        if low_latency and hasattr(nvc, "DisplayDecodeLatencyType") and hasattr(nvc, "VideoPacketFlag"):
            try:
                self._dec = nvc.CreateDecoder(gpuid=self.gpu, codec=codec, cudacontext=0,
                                              cudastream=self.cuda_stream.cuda_stream, usedevicememory=True,
                                              latency=nvc.DisplayDecodeLatencyType.LOW)
                self._eop = nvc.VideoPacketFlag.ENDOFPICTURE
            except Exception as exc:  # older binding: normal latency still decodes every picture
                log.debug("low-latency NVDEC session not available: %s", exc)
        if self._dec is None:
            self._dec = _create_decoder(nvc, self.gpu, codec, self.cuda_stream)

    def rebind(self, stream: Any) -> None:
        """Take the packets of a (re)opened input: a reconnect keeps the NVDEC session, whose parser follows
        the new stream's sequence headers (a new resolution reconfigures the decoder), and only the container
        side (Annex B rewriting, time base, rate, range) is set up again."""
        from av.bitstream import BitStreamFilterContext

        cc = stream.codec_context
        if cc.name != self.name:
            raise NvdecUnavailable(f"codec changed from {self.name} to {cc.name}")
        problem = format_problem(cc)
        if problem:  # a reconnect that brings 10-bit pictures: a CPU decoder takes over, said
            raise NvdecUnavailable(problem)
        extradata = bytes(cc.extradata or b"")
        self.bsf = None
        if self.name in ("h264", "hevc") and not annex_b(extradata):
            self.bsf = BitStreamFilterContext(f"{self.name}_mp4toannexb", in_stream=stream)
        self.damage.annexb = self.bsf is None
        self.stream = stream
        self.time_base = stream.time_base
        self.fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        self.full = int(getattr(cc, "color_range", 0) or 0) == 2 or (cc.pix_fmt or "").startswith("yuvj")

    def _packet(self, ptr: int, size: int, pts: int | None) -> Any:
        pd = self._nvc.PacketData()
        pd.bsl_data = ptr
        pd.bsl = size
        if pts is not None:
            pd.pts = int(pts)
        if self._eop is not None and size:
            pd.decode_flag = self._eop
        return pd

    def _run(self, pd: Any) -> list[Any]:
        try:
            return list(self._dec.Decode(pd))
        except Exception as exc:  # a damaged packet: counted, the session goes on
            self.errors += 1
            log.debug("nvdec decode error: %s", exc)
            return []

    def _surfaces(self, packet: Any | None) -> list[Any]:
        """NVDEC's decoded surfaces for a packet (None: end of stream, drain everything)."""
        if packet is None:
            rest: list[Any] = []
            if self.bsf is not None:
                try:
                    rest = list(self.bsf.filter(None) or [])
                except Exception:  # a filter with nothing buffered may refuse the end marker
                    rest = []
        else:
            rest = list(self.bsf.filter(packet)) if self.bsf is not None else [packet]
        decoded: list[Any] = []
        for p in rest:
            if p.buffer_size:
                decoded.extend(self._run(self._packet(p.buffer_ptr, p.buffer_size, p.pts)))
        if packet is None:
            decoded.extend(self._run(self._packet(0, 0, None)))
        return decoded

    def decode(self, packet: Any) -> list[tuple[float | None, VideoFrame]]:
        errors = self.errors
        surfaces = self._surfaces(packet)
        if packet is not None and packet.size:
            self.damage.note_packet(packet, self.name, self.errors > errors)
        return self._frames(surfaces)

    def flush(self) -> list[tuple[float | None, VideoFrame]]:
        return self._frames(self._surfaces(None))

    def decode_only(self, packet: Any | None) -> int:
        """Pictures a packet (None: the end) completes, left unconverted: the benchmark's decode ceiling."""
        return len(self._surfaces(packet))

    def _convert(self, decoded: list[Any]) -> list[tuple[Any, Any, Any, Any]]:
        with torch.cuda.device(self.device):
            surfaces = [torch.from_dlpack(f) for f in decoded]
            height = int(self.stream.codec_context.height or 0) or None
            conv = conversion_stream(self.device)
            conv.wait_stream(self.cuda_stream)  # NVDEC's output copy was queued on the session's stream
            return frames_from_surfaces(surfaces, height, self.full, conv, self.keep_luma)

    def _frames(self, decoded: list[Any]) -> list[tuple[float | None, VideoFrame]]:
        if not decoded:
            return []
        pieces = self._convert(decoded)
        out = []
        tb = float(self.time_base) if self.time_base else None
        for f, (luma, small, summary, rgb) in zip(decoded, pieces, strict=True):
            pts = _frame_pts(f)
            ts = pts * tb if (pts is not None and tb) else None
            damaged, key = self.damage.take_picture(pts)
            out.append((ts, VideoFrame(pts=0.0, duration=1.0 / self.fps, luma=luma, small=small, rgb=rgb,
                                       color_range=ColorRange.FULL if self.full else ColorRange.LIMITED,
                                       summary=summary, key_frame=key, damaged=damaged)))
        return out


def drain_count(td: Any, batch: int) -> int:
    """Pictures a ThreadedDecoder delivers until its end, left unconverted (ceilings and probes)."""
    n = 0
    while True:
        frames = td.get_batch_frames(batch)
        if not frames:
            td.end()
            return n
        n += len(frames)


def _frame_pts(frame: Any) -> int | None:
    for name in ("getPTS", "timestamp"):
        v = getattr(frame, name, None)
        if v is None:
            continue
        try:
            return int(v() if callable(v) else v)
        except (TypeError, ValueError):
            continue
    return None


def _create_decoder(nvc: Any, gpu: int, codec: Any, stream: torch.cuda.Stream) -> Any:
    """One NVDEC session on the given CUDA stream, frames in device memory."""
    attempts = (
        {"gpuid": gpu, "codec": codec, "cudacontext": 0, "cudastream": stream.cuda_stream, "usedevicememory": True},
        {"gpuid": gpu, "codec": codec, "usedevicememory": True},
    )
    last: Exception | None = None
    for kw in attempts:
        try:
            return nvc.CreateDecoder(**kw)
        except TypeError as exc:  # an older binding without the stream arguments
            last = exc
    raise NvdecUnavailable(f"cannot create an NVDEC session: {last}")


class ThreadedFileDecoder:
    """A whole file through PyNvVideoCodec's ThreadedDecoder, as batches of (time, VideoFrame).

    Times come from the frame index and the stream's frame rate: the native decoder does not expose the
    container's time base, and files at constant frame rate (what this path is for) lose nothing.
    """

    backend = "nvdec-threaded"

    def __init__(self, path: str, device: str = "cuda:0", batch: int = 8, full_range: bool = False,
                 decoder_cache: int = 1, keep_luma: bool = False) -> None:
        nvc = load()
        self.gpu = gpu_index(device)
        self.device = torch.device("cuda", self.gpu)
        self.batch = batch
        self.full = full_range
        self.keep_luma = keep_luma
        self.cuda_stream = conversion_stream(self.device)
        # One cached session and a small surface ring: the defaults (4 sessions, large rings) cost hundreds of
        # MB of GPU memory per stream, which decides how many streams fit, not how fast they decode.
        self._td = nvc.ThreadedDecoder(path, buffer_size=batch, gpu_id=self.gpu, use_device_memory=True,
                                       decoder_cache_size=decoder_cache)
        meta = self._td.get_stream_metadata()
        self.width = int(getattr(meta, "width", 0) or 0)
        self.height = int(getattr(meta, "height", 0) or 0)
        self.fps = float(getattr(meta, "average_fps", 0) or 0) or 25.0
        self.codec = str(getattr(meta, "codec_name", "") or "")
        self.expected = int(getattr(meta, "num_frames", 0) or 0)
        self.index = 0
        self.errors = 0
        self.corrupt = 0

    def next_batch(self) -> list[tuple[float | None, VideoFrame]]:
        decoded = self._td.get_batch_frames(self.batch)
        tries = 0
        while not decoded and self.index < self.expected and tries < 3:
            # An empty batch before the container's frame count: the decode thread may still be draining
            # its last pictures; ask again briefly before calling it the end.
            time.sleep(0.01)
            decoded = self._td.get_batch_frames(self.batch)
            tries += 1
        if not decoded:
            return []
        with torch.cuda.device(self.device):
            surfaces = [torch.from_dlpack(f) for f in decoded]
            pieces = frames_from_surfaces(surfaces, self.height or None, self.full, self.cuda_stream, self.keep_luma)
        out = []
        for luma, small, summary, rgb in pieces:
            t = self.index / self.fps
            self.index += 1
            out.append((t, VideoFrame(pts=0.0, duration=1.0 / self.fps, luma=luma, small=small, rgb=rgb,
                                      color_range=ColorRange.FULL if self.full else ColorRange.LIMITED,
                                      summary=summary)))
        return out

    def close(self) -> None:
        try:
            self._td.end()
        except Exception:  # ending a decoder that already failed must not raise
            pass
