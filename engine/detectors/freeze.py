"""Frozen picture, including pictures frozen before the encoder.

Like FFmpeg's freezedetect, every frame is compared with an anchor: the last frame that was not frozen,
so slow motion accumulates against it instead of hiding in small frame-to-frame steps. Unlike
freezedetect, a frame also counts as frozen when it differs from the anchor only by coding noise: an
encoder fed a still picture keeps refining it and refreshes it at every key frame, so decoded frames of a
real freeze are not identical. Coding noise is weak and spread over the whole picture; motion, even slow
(leaves in light wind, a pedestrian far away), changes some pixels clearly, so the test is "mean
difference small AND almost no pixel clearly changed", both on the area-averaged small plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.detectors.base import (
    Detector,
    DetectorConfig,
    MetricRequest,
    VideoMetrics,
    positive,
    register,
    unit_interval,
)
from engine.events import Severity
from kernels.difference import changed_fraction, mafd
from kernels.masks import region_mask


@dataclass(frozen=True)
class FreezeConfig(DetectorConfig):
    """A frame is frozen when its mean difference from the anchor is within noise_db (freezedetect's
    tolerance, -60 dB = 0.1 % of full scale) or, with `coded`, within coded_mafd code values (coding
    noise), and in both cases at most coded_changed of its pixels differ by more than coded_level code
    values (small plane): a small moving object barely moves the mean but clearly changes its pixels. Pictures with less detail than min_activity (mean step
    between neighbouring pixels, code values) never count as frozen: a black or flat picture shows nothing
    that could move, and black has its own detector. Defaults: freezedetect's -60 dB and 2 s."""

    onset: float = 2.0
    recovery: float = 0.0
    severity: Severity = Severity.CRITICAL
    noise_db: float = -60.0
    coded: bool = True
    coded_mafd: float = 1.5
    coded_level: int = 6
    coded_changed: float = 0.002
    min_activity: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_db >= 0:
            raise ValueError(f"noise_db must be < 0 dB, not {self.noise_db}")
        positive("coded_mafd", self.coded_mafd)
        unit_interval("coded_changed", self.coded_changed)
        if not 0 <= self.coded_level < 255:
            raise ValueError(f"coded_level must be within 0..254, not {self.coded_level}")


@register
class FreezeDetector(Detector):
    NAME = "freeze"
    VERSION = "1.0"
    MEDIA = "video"
    NEEDS_EVERY_FRAME = False
    Config = FreezeConfig

    def __init__(self, config: FreezeConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest(
            "difference", (("level", config.coded_level),), config.ignore
        )
        # freezedetect divides the sum of absolute differences by 2^bits, so -60 dB is 0.256 code values.
        self.noise = 10 ** (config.noise_db / 20.0) * 256.0
        self.anchor: torch.Tensor | None = None
        self.anchor_pts = 0.0
        self.anchor_is_prev = True  # the anchor is the previous frame: the batched diffs already compare them
        self._mask_cache: tuple[tuple[int, int], torch.Tensor | None] | None = None

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float:
        return self.config.noise_db

    def message(self, value: float | None) -> str:
        return "frozen picture"

    def _frozen(self, d: np.ndarray, changed: np.ndarray) -> np.ndarray:
        c = self.config
        small = d <= self.noise
        if c.coded:
            small |= d <= c.coded_mafd
        # Whatever the mean says, a picture with clearly changed pixels is moving: a small object (a
        # pedestrian far away) hardly moves the mean but changes its own pixels by far more than noise.
        return small & (changed <= c.coded_changed)

    def _mask(self, small: torch.Tensor) -> torch.Tensor | None:
        if not self.config.ignore:
            return None
        shape = (int(small.shape[-2]), int(small.shape[-1]))
        if self._mask_cache is None or self._mask_cache[0] != shape:
            self._mask_cache = (shape, region_mask(shape[0], shape[1], self.config.ignore, small.device))
        return self._mask_cache[1]

    def on_video(self, m: VideoMetrics) -> None:
        k = len(m.pts)
        d_prev = m.get(self.request, "mafd")
        c_prev = m.get(self.request, "changed")
        frozen = np.zeros(k, dtype=bool)
        diff = np.zeros(k, dtype=np.float64)
        start = m.pts.astype(np.float64).copy()
        if self.anchor is None:
            # Stream start: the first frame becomes the anchor.
            self.anchor, self.anchor_pts, self.anchor_is_prev = m.small[0].clone(), float(m.pts[0]), True
            i = 1
        else:
            i = 0
        flat = m.get(self.request, "activity") < self.config.min_activity
        prev_frozen = self._frozen(d_prev, c_prev) & ~flat
        mask = self._mask(m.small)
        while i < k:
            if self.anchor_is_prev:
                # Moving picture: the anchor follows every frame, so the batched previous-frame diffs decide,
                # up to the next frame that is frozen against its predecessor.
                hits = np.flatnonzero(prev_frozen[i:])
                j = i + int(hits[0]) if hits.size else k
                diff[i:j] = d_prev[i:j]
                if j >= k:
                    self.anchor, self.anchor_pts = m.small[k - 1].clone(), float(m.pts[k - 1])
                    break
                anchor_pts = float(m.pts[j - 1]) if j > 0 else self.anchor_pts
                if j > 0:
                    self.anchor = m.small[j - 1].clone()
                self.anchor_pts, self.anchor_is_prev = anchor_pts, False
                i = j
                continue
            # Still picture: compare the rest of the batch with the fixed anchor in one call.
            rest = m.small[i:]
            d = mafd(rest, self.anchor.unsqueeze(0), mask).cpu().numpy().astype(np.float64)
            ch = changed_fraction(rest, self.anchor.unsqueeze(0), self.config.coded_level, mask).cpu().numpy()
            fz = self._frozen(d, ch) & ~flat[i:]
            stop = np.flatnonzero(~fz)
            j = i + int(stop[0]) if stop.size else k
            frozen[i:j] = True
            diff[i:j] = d[: j - i]
            start[i:j] = self.anchor_pts  # a freeze starts at the picture that stopped moving
            if j >= k:
                break
            diff[j] = d[j - i]
            self.anchor, self.anchor_pts, self.anchor_is_prev = m.small[j].clone(), float(m.pts[j]), True
            i = j + 1
        self.hyst.update(start, m.pts + m.duration, frozen, diff)
