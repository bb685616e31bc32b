"""Missing channel: a channel of exact digital zero while others carry sound (unrouted, a lost embedder
pair), or fewer channels than the stream should have (a 5.1 service that fell back to stereo)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, register
from engine.events import Severity


@dataclass(frozen=True)
class MissingChannelConfig(DetectorConfig):
    """channels: how many channels the stream must carry (None: no count check). A channel is missing when
    every sample is exactly 0 while another channel is not; LFE channels count only with include_lfe."""

    onset: float = 1.0
    recovery: float = 0.0
    severity: Severity = Severity.MAJOR
    channels: int | None = None
    include_lfe: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels is not None and not 1 <= self.channels <= 64:
            raise ValueError(f"channels must be within 1..64, not {self.channels}")


@register
class MissingChannelDetector(Detector):
    NAME = "missing_channel"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = MissingChannelConfig

    def __init__(self, config: MissingChannelConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.hyst.higher_is_worse = False  # the fewest channels seen is the worst

    def threshold(self) -> float | None:
        return None if self.config.channels is None else float(self.config.channels)

    def message(self, value: float | None) -> str:
        if value is not None and self.config.channels is not None and value < self.config.channels:
            return f"missing channels ({int(value)} of {self.config.channels})"
        return "channel missing (digital zero)"

    def on_audio(self, m: AudioMetrics) -> None:
        t = m.times
        c = m.peak.shape[0]
        if self.config.channels is not None:
            # A whole-stream fault: fewer channels than configured, for as long as it lasts.
            few = np.full(len(t), c < self.config.channels)
            self.hyst.update(t, t + m.window, few, np.full(len(t), float(c)))
        names = m.channel_names or tuple(f"c{i}" for i in range(c))
        watched = [i for i, n in enumerate(names) if self.config.include_lfe or not n.startswith("LFE")]
        if len(watched) < 2:
            return
        zero = m.peak[watched] == 0.0
        for j, i in enumerate(watched):
            others = np.delete(~zero, j, axis=0).any(axis=0)
            self.channel_hysteresis(names[i]).update(t, t + m.window, zero[j] & others)
