"""Detectors: one module each, registered by name. Adding a detector is a new module plus one import here."""

from engine.detectors import (  # noqa: F401  (imported for registration)
    av_sync,
    black,
    blockiness,
    blur,
    channel_silence,
    clicks,
    clipping,
    corruption,
    dc_offset,
    dropout,
    freeze,
    glitch,
    loudness,
    missing_channel,
    no_signal,
    phase,
    silence,
    true_peak,
)
from engine.detectors.base import REGISTRY, Detector, DetectorConfig, MetricRequest, Region, register

__all__ = ["REGISTRY", "Detector", "DetectorConfig", "MetricRequest", "Region", "register"]
