"""Channel silence: one channel silent while the others carry sound (a dead microphone, a broken leg of a
stereo pair). A channel of exact digital zero is a missing channel (its own detector), not a silent one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.detectors.base import AudioMetrics, Detector, DetectorConfig, below_full_scale, register
from engine.events import Severity


@dataclass(frozen=True)
class ChannelSilenceConfig(DetectorConfig):
    """A channel is silent when its peak stays below noise_db (dBFS; -60 like silencedetect) while another
    channel is above it; LFE channels are left out unless include_lfe (a quiet LFE is normal)."""

    onset: float = 2.0
    recovery: float = 0.0
    severity: Severity = Severity.MAJOR
    noise_db: float = -60.0
    include_lfe: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        below_full_scale("noise_db", self.noise_db)


@register
class ChannelSilenceDetector(Detector):
    NAME = "channel_silence"
    VERSION = "1.0"
    MEDIA = "audio"
    NEEDS_EVERY_FRAME = False
    Config = ChannelSilenceConfig

    def __init__(self, config: ChannelSilenceConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.level = 10 ** (config.noise_db / 20.0)
        self.hyst.higher_is_worse = False

    def threshold(self) -> float:
        return self.config.noise_db

    def message(self, value: float | None) -> str:
        return "channel silent" if value is None else f"channel silent (peak {value:.1f} dBFS)"

    def on_audio(self, m: AudioMetrics) -> None:
        names = m.channel_names or tuple(f"c{i}" for i in range(m.peak.shape[0]))
        watched = [i for i, n in enumerate(names) if self.config.include_lfe or not n.startswith("LFE")]
        if len(watched) < 2:
            return  # mono: silence is the silence detector's
        peak = m.peak[watched]
        quiet = peak < self.level
        t = m.times
        for j, i in enumerate(watched):
            others_loud = np.delete(~quiet, j, axis=0).any(axis=0)
            faulty = quiet[j] & (peak[j] > 0.0) & others_loud
            self.channel_hysteresis(names[i]).update(t, t + m.window, faulty, 20 * np.log10(np.maximum(peak[j], 1e-10)))
