"""Shared by the audio detectors that judge a sliding span of 5 ms windows (DC offset, phase): running sums
over the span, and the placement of a fault's edges on the window where the signal really changed.

A sliding statistic crosses its threshold late (half a span after a step) and gradually; the moment the
fault began is where the statistic of the windows before and after differs most, a change point found by
trying every split of the recent windows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# A split leaves at least this many windows on each side, so one odd window cannot be a change point.
MIN_SIDE = 4

# (k, cols) column sums of k candidate segments and (k,) their window counts -> (k,) faultiness
Stat = Callable[[np.ndarray, np.ndarray], np.ndarray]


class SpanSums:
    """Sums of per-window columns over the last `span` windows, for every window pushed, in bounded memory.

    It also keeps the last `keep` windows (times and columns) for the change-point search.
    """

    def __init__(self, span: int, keep: int, cols: int) -> None:
        self.span = span
        self.keep = max(keep, span)
        self.cols = cols
        self.t = np.zeros(0)
        self.x = np.zeros((0, cols))

    def reset(self) -> None:
        self.t = np.zeros(0)
        self.x = np.zeros((0, self.cols))

    def push(self, t: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add windows (times (k,), columns (k, cols)); returns the span sums ending at each new window (k,
        cols) and how many windows each sum holds (k,) (fewer than `span` at the start)."""
        # Trimmed here rather than after: the change-point search that follows a push may look back into
        # everything this push brought (a file read fast hands over seconds per tick).
        self.t, self.x = self.t[-self.keep :], self.x[-self.keep :]
        old = len(self.t)
        t_all = np.concatenate([self.t, t])
        x_all = np.concatenate([self.x, x])
        csum = np.concatenate([np.zeros((1, self.cols)), np.cumsum(x_all, axis=0)])
        end = old + np.arange(1, len(t) + 1)
        start = np.maximum(end - self.span, 0)
        sums = csum[end] - csum[start]
        self.t, self.x = t_all, x_all
        return sums, end - start

    def change_point(self, before: float, lookback: float, stat: Stat, rising: bool, window: float,
                     valid_col: int | None = None, faulty_like: Callable[[np.ndarray], np.ndarray] | None = None,
                     refine: int = 10) -> float:
        """The time in (before - lookback, before] where the fault most plausibly began (rising) or ended
        (falling): the split of the kept windows in that range that maximises the difference of `stat`
        (higher = more faulty) between the two sides, weighted like a two-sample t statistic so a split that
        leaves a few noisy windows on one side does not win. Falls back to `before`."""
        sel = np.flatnonzero((self.t > before - lookback - 1e-9) & (self.t <= before + 1e-9))
        if sel.size < 2 * MIN_SIDE:
            return before
        x = self.x[sel]
        csum = np.concatenate([np.zeros((1, self.cols)), np.cumsum(x, axis=0)])
        n = x.shape[0]
        k = np.arange(MIN_SIDE, n - MIN_SIDE + 1)
        f_before = stat(csum[k], k)
        f_after = stat(csum[n] - csum[k], n - k)
        gain = (f_after - f_before) if rising else (f_before - f_after)
        score = gain * np.sqrt(k * (n - k) / n)
        if not np.isfinite(score).any():
            return before
        best = int(k[int(np.nanargmax(score))])
        if faulty_like is not None:
            # The statistic finds the neighbourhood; within `refine` windows of it the edge goes where the
            # fewest windows would sit on the wrong side by their own value (a sharp step in a noisy one).
            ok = x[:, valid_col] > 0 if valid_col is not None else np.ones(n, bool)
            bad = faulty_like(x) & ok
            good = ~faulty_like(x) & ok
            lo, hi = max(best - refine, 1), min(best + refine, n - 1)
            ks = np.arange(lo, hi + 1)
            cb, cg = np.concatenate(([0], np.cumsum(bad))), np.concatenate(([0], np.cumsum(good)))
            if rising:  # clean before, faulty after
                errors = (cb[ks] - cb[lo]) + (cg[hi] - cg[ks])
            else:
                errors = (cg[ks] - cg[lo]) + (cb[hi] - cb[ks])
            fewest = np.flatnonzero(errors == errors.min())
            best = int(ks[fewest[np.argmin(np.abs(ks[fewest] - best))]])
        if valid_col is not None:
            # Windows that do not count (too quiet to judge) fit either side equally; the edge goes next to
            # the nearest window that does, on the faulty side.
            ok = x[:, valid_col] > 0
            if rising:
                while best < n - 1 and not ok[best]:
                    best += 1
            else:
                while best > 1 and not ok[best - 1]:
                    best -= 1
        return float(self.t[sel[best]]) if rising else float(self.t[sel[best - 1]] + window)
