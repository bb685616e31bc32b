"""Decoders: compressed packets in, VideoFrame / AudioChunk out. PyAV on the CPU; NVDEC joins as a backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.decode.base import AudioDecoder, VideoDecoder
from engine.decode.pyav import PyAVAudioDecoder, PyAVVideoDecoder

# name -> factory(stream, threads) for video; a GPU backend registers itself here.
VIDEO_BACKENDS: dict[str, Callable[[Any, int], VideoDecoder]] = {"pyav": PyAVVideoDecoder}


def video_decoder(stream: Any, backend: str = "pyav", threads: int = 0) -> VideoDecoder:
    """The video decoder for a demuxed stream. Raises ValueError for an unknown backend."""
    factory = VIDEO_BACKENDS.get(backend)
    if factory is None:
        raise ValueError(f"unknown decoder backend {backend!r}; available: {', '.join(sorted(VIDEO_BACKENDS))}")
    return factory(stream, threads)


__all__ = ["VIDEO_BACKENDS", "AudioDecoder", "PyAVAudioDecoder", "PyAVVideoDecoder", "VideoDecoder", "video_decoder"]
