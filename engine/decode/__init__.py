"""Decoders: compressed packets in, VideoFrame / AudioChunk out. PyAV on the CPU, NVDEC on NVIDIA GPUs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from engine.decode.base import AudioDecoder, VideoDecoder
from engine.decode.pyav import PyAVAudioDecoder, PyAVVideoDecoder
from engine.decode.tiers import TIERS, Tier, TierFilter

log = logging.getLogger(__name__)


def _nvdec(stream: Any, threads: int, device: str, tier: str = "all", keep_luma: bool = False) -> VideoDecoder:
    from engine.decode.nvdec import NvdecVideoDecoder

    return NvdecVideoDecoder(stream, threads, device, low_latency=tier == Tier.KEYFRAMES, keep_luma=keep_luma)


# name -> factory(stream, threads, device, tier) for video.
VIDEO_BACKENDS: dict[str, Callable[..., VideoDecoder]] = {
    "pyav": lambda stream, threads, device, tier="all", keep_luma=True: PyAVVideoDecoder(
        stream, threads, low_delay=tier == Tier.KEYFRAMES),
    "nvdec": _nvdec,
}
BACKEND_NAMES = ("auto", *VIDEO_BACKENDS)


def video_decoder(
    stream: Any, backend: str = "pyav", threads: int = 0, device: str = "cpu", tier: str = "all",
    keep_luma: bool = False,
) -> tuple[VideoDecoder, str | None]:
    """The video decoder for a demuxed stream, and the reason when it is not the backend asked for.

    `auto` takes NVDEC when the device is a GPU and NVDEC can decode the stream, else PyAV. An explicit
    `nvdec` that cannot be honoured also falls back to PyAV: monitoring on the CPU beats no monitoring, but
    the fallback is returned so that it is logged and counted, never silent. Raises ValueError for an
    unknown backend name.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown decoder backend {backend!r}; available: {', '.join(BACKEND_NAMES)}")
    if backend == "pyav" or (backend == "auto" and not str(device).startswith("cuda")):
        return VIDEO_BACKENDS["pyav"](stream, threads, device, tier), None
    from engine.decode.nvdec import NvdecUnavailable

    try:
        gpu = device if str(device).startswith("cuda") else "cuda:0"
        return VIDEO_BACKENDS["nvdec"](stream, threads, gpu, tier, keep_luma), None
    except NvdecUnavailable as exc:
        return VIDEO_BACKENDS["pyav"](stream, threads, device, tier), f"NVDEC unavailable, decoding on the CPU: {exc}"


__all__ = [
    "BACKEND_NAMES", "TIERS", "VIDEO_BACKENDS", "AudioDecoder", "PyAVAudioDecoder",
    "PyAVVideoDecoder", "Tier", "TierFilter", "VideoDecoder", "video_decoder",
]
