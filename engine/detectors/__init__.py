"""Detectors: one module each, registered by name. Adding a detector is a new module plus one import here."""

from engine.detectors import (  # noqa: F401  (imported for registration)
    black,
    blockiness,
    blur,
    clipping,
    corruption,
    freeze,
    glitch,
    loudness,
    no_signal,
    silence,
)
from engine.detectors.base import REGISTRY, Detector, DetectorConfig, MetricRequest, Region, register

__all__ = ["REGISTRY", "Detector", "DetectorConfig", "MetricRequest", "Region", "register"]
