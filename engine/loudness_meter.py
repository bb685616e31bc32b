"""EBU R128 loudness meter for one stream: momentary, short-term, integrated loudness and loudness range.

The meter is fed the output of the loudness kernels, one value per 5 ms window: the K-weighted,
channel-weighted mean-square power of the window (`kernels.loudness.weighted_power` of
`kernels.audio.window_mean_square` of `kernels.loudness.k_weight`), for one stream, in order. Everything
after that is cheap bookkeeping on the CPU, in float64 numpy, in bounded memory:

* momentary (400 ms) and short-term (3 s) loudness at the end of every window, from running sums over the
  last 3 s of window powers;
* integrated loudness (BS.1770-4 gating) and loudness range (EBU Tech 3342) from fixed-size histograms of
  the 400 ms and 3 s block loudness, sampled every 100 ms as FFmpeg's ebur128 filter does, so a stream
  that runs for months keeps the same few hundred kilobytes.

The timing follows FFmpeg: block k covers the audio up to k * 100 ms after the meter start, momentary
values exist from 400 ms, short-term values from 3 s.

Feeding a batch of streams from the GPU: compute `weighted_power` for the whole (N, C, T) batch, move the
(N, W) result to the CPU once, and feed row n to stream n's meter; feeding CUDA rows one by one would
cost a device sync per stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.media import AUDIO_RATE, AUDIO_WINDOW

LUFS_OFFSET = -0.691  # BS.1770's calibration, as in kernels.loudness
LUFS_FLOOR = -200.0  # what digital silence reads

ABS_GATE = -70.0  # LUFS, for both integrated loudness and LRA
REL_GATE_I = -10.0  # LU below the abs-gated mean, BS.1770-4
REL_GATE_LRA = -20.0  # LU, EBU Tech 3342
LRA_LOW_PCT = 10
LRA_HIGH_PCT = 95

# Histogram of block loudness in 0.01 LU bins from the absolute gate to +10 LUFS (louder blocks land in
# the top bin), like FFmpeg's: the gates and percentiles are resolved to the bin, the energies are kept
# exactly per bin.
HIST_GRAIN = 100  # bins per LU
HIST_TOP = 10.0
HIST_BINS = round((HIST_TOP - ABS_GATE) * HIST_GRAIN) + 1

MOMENTARY_S = 0.4
SHORT_TERM_S = 3.0
BLOCK_STEP_S = 0.1


def _lufs(power: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(LUFS_OFFSET + 10.0 * np.log10(power), LUFS_FLOOR)


def _bin(lufs: np.ndarray) -> np.ndarray:
    return np.clip(((lufs - ABS_GATE) * HIST_GRAIN).astype(np.int64), 0, HIST_BINS - 1)


@dataclass(frozen=True, slots=True)
class MeterBlock:
    """Per-window loudness for the windows of one `feed` call.

    `first_window` is the index of the first of them counted from the meter start (or last reset); value k
    belongs to the window that ends `(first_window + k + 1) * window_s` seconds after the start.
    `momentary` is NaN for windows ending before 400 ms of audio, `short_term` before 3 s.
    """

    first_window: int
    window_s: float
    momentary: np.ndarray
    short_term: np.ndarray

    def end_times(self) -> np.ndarray:
        """Seconds from the meter start to the end of each window."""
        return (self.first_window + np.arange(1, self.momentary.size + 1)) * self.window_s


class _GateHistogram:
    """Block counts and summed block powers per 0.01 LU loudness bin above the absolute gate."""

    def __init__(self) -> None:
        self.count = np.zeros(HIST_BINS, dtype=np.int64)
        self.energy = np.zeros(HIST_BINS, dtype=np.float64)

    def add(self, power: np.ndarray) -> None:
        lufs = _lufs(power)
        keep = lufs >= ABS_GATE  # FFmpeg and the Tech 3342 example gate with >=
        if keep.any():
            idx = _bin(lufs[keep])
            self.count += np.bincount(idx, minlength=HIST_BINS)
            self.energy += np.bincount(idx, weights=power[keep], minlength=HIST_BINS)

    def gate_bin(self, relative_lu: float) -> int | None:
        """The bin holding the relative gate (blocks in it and above pass), None before any block."""
        n = int(self.count.sum())
        if n == 0:
            return None
        mean_lufs = float(_lufs(np.array([self.energy.sum() / n]))[0])
        return int(_bin(np.array([mean_lufs + relative_lu]))[0])


class LoudnessMeter:
    """EBU R128 meter for one stream, fed with 5 ms window powers in order (see the module docstring).

    Values are LUFS (LU for the range) as floats; NaN means "not enough audio yet".
    """

    def __init__(self, window: int = AUDIO_WINDOW, rate: int = AUDIO_RATE) -> None:
        step = rate * BLOCK_STEP_S
        if window <= 0 or step % window:
            raise ValueError(f"a window of {window} samples does not divide R128's 100 ms step")
        self.window_s = window / rate
        self._step = round(step / window)  # windows per 100 ms gating step
        self._m_len = round(MOMENTARY_S * rate / window)
        self._s_len = round(SHORT_TERM_S * rate / window)
        self.reset()

    def reset(self) -> None:
        """Forget everything, as at a new programme or after the stream restarted."""
        self._fed = 0
        # The last (short-term length - 1) window powers: all a sliding 3 s sum needs from the past.
        self._tail = np.zeros(0, dtype=np.float64)
        self._i_hist = _GateHistogram()
        self._lra_hist = _GateHistogram()
        self._momentary = math.nan
        self._short_term = math.nan
        self._max_momentary = math.nan
        self._max_short_term = math.nan

    @property
    def windows_fed(self) -> int:
        return self._fed

    @property
    def time_s(self) -> float:
        """Seconds of audio fed since the start or the last reset."""
        return self._fed * self.window_s

    def feed(self, window_power: np.ndarray | torch.Tensor) -> MeterBlock:
        """Add the next windows' weighted power (1-D, any length) and return their momentary/short-term LUFS.

        Non-finite powers (NaN from a broken decode) are taken as silence so they cannot poison 3 s of
        sums and the whole integrated value.
        """
        if isinstance(window_power, torch.Tensor):
            window_power = window_power.detach().to("cpu", torch.float64).numpy()
        p = np.asarray(window_power, dtype=np.float64).reshape(-1)
        p = np.where(np.isfinite(p) & (p > 0.0), p, 0.0)
        w = p.size
        first = self._fed
        if w == 0:
            empty = np.zeros(0, dtype=np.float64)
            return MeterBlock(first, self.window_s, empty, empty.copy())

        buf = np.concatenate([self._tail, p])
        csum = np.concatenate(([0.0], np.cumsum(buf)))
        # Counting non-zero windows exactly lets a window span of pure digital silence read as such instead
        # of as the rounding residue of the cumulative sum.
        cnz = np.concatenate(([0], np.cumsum(buf > 0.0)))
        end = self._tail.size + np.arange(1, w + 1)  # csum index just past each new window
        n_seen = first + np.arange(1, w + 1)  # windows fed up to and including each new window

        def sliding(length: int) -> tuple[np.ndarray, np.ndarray]:
            start = np.maximum(end - length, 0)
            total = np.where(cnz[end] > cnz[start], np.maximum(csum[end] - csum[start], 0.0), 0.0)
            return total / length, n_seen >= length

        m_power, m_valid = sliding(self._m_len)
        s_power, s_valid = sliding(self._s_len)
        momentary = np.where(m_valid, _lufs(m_power), np.nan)
        short_term = np.where(s_valid, _lufs(s_power), np.nan)

        on_step = n_seen % self._step == 0
        self._i_hist.add(m_power[m_valid & on_step])
        self._lra_hist.add(s_power[s_valid & on_step])

        self._fed += w
        self._tail = buf[-(self._s_len - 1) :].copy() if buf.size >= self._s_len else buf
        self._momentary = float(momentary[-1])
        self._short_term = float(short_term[-1])
        if m_valid.any():
            self._max_momentary = float(np.fmax(self._max_momentary, momentary[m_valid].max()))
        if s_valid.any():
            self._max_short_term = float(np.fmax(self._max_short_term, short_term[s_valid].max()))
        return MeterBlock(first, self.window_s, momentary, short_term)

    @property
    def momentary(self) -> float:
        """Loudness of the last 400 ms, LUFS."""
        return self._momentary

    @property
    def short_term(self) -> float:
        """Loudness of the last 3 s, LUFS."""
        return self._short_term

    @property
    def max_momentary(self) -> float:
        return self._max_momentary

    @property
    def max_short_term(self) -> float:
        return self._max_short_term

    @property
    def integrated(self) -> float:
        """Gated programme loudness since the start (BS.1770-4), LUFS; NaN until a 400 ms block is above -70."""
        h = self._i_hist
        gate = h.gate_bin(REL_GATE_I)
        if gate is None:
            return math.nan
        n = h.count[gate:].sum()
        if n == 0:
            return math.nan
        return float(_lufs(np.array([h.energy[gate:].sum() / n]))[0])

    @property
    def loudness_range_bounds(self) -> tuple[float, float]:
        """(low, high): the 10th and 95th percentiles of the gated short-term loudness, LUFS (bin edges)."""
        h = self._lra_hist
        gate = h.gate_bin(REL_GATE_LRA)
        if gate is None:
            return math.nan, math.nan
        cum = np.cumsum(h.count[gate:])
        n = int(cum[-1])
        if n == 0:
            return math.nan, math.nan
        # FFmpeg's rank rounding; the low rank is kept >= 1 so a handful of blocks does not read from an
        # empty bin at the gate.
        low_rank = max(int(LRA_LOW_PCT * n / 100 + 0.5), 1)
        high_rank = int(LRA_HIGH_PCT * n / 100 + 0.5)
        low = gate + int(np.searchsorted(cum, low_rank))
        high = gate + int(np.searchsorted(cum, high_rank))
        return ABS_GATE + low / HIST_GRAIN, ABS_GATE + high / HIST_GRAIN

    @property
    def loudness_range(self) -> float:
        """EBU Tech 3342 loudness range (LRA), LU; NaN until a 3 s block is above -70 LUFS."""
        low, high = self.loudness_range_bounds
        return high - low
