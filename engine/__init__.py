"""framewatch engine: sources, decoding, batching, scoring, detectors, alerts, config and CLI."""

__version__ = "0.1.0"
