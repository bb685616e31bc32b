"""Decoders: compressed packets in, VideoFrame / AudioChunk out. PyAV on the CPU; NVDEC joins later."""

from engine.decode.base import AudioDecoder, VideoDecoder
from engine.decode.pyav import PyAVAudioDecoder, PyAVVideoDecoder

__all__ = ["AudioDecoder", "PyAVAudioDecoder", "PyAVVideoDecoder", "VideoDecoder"]
