"""Clicks and pops: impulses that stand out of the linear-prediction residual, placed on the exact sample.

Music and speech are well predicted from their last few milliseconds; a click is not. Each 5 ms window gets
an order-16 predictor fitted on the 20 ms up to its end (Hann-tapered autocorrelation, Levinson-Durbin),
with first-pass residual outliers replaced by their prediction so that a click does not spoil its own fit.
The residual goes through the filter matched to an impulse's trace in it (the prediction-error filter
reversed): that statistic peaks on the impulse's own sample, where the raw residual may peak a sample or two
later, and divided by the filter's norm it estimates the impulse's amplitude.

The score is that peak over a robust residual scale: the median residual of the window and of the 2 ms on
either side of the peak. Four things keep real sounds from scoring as clicks:
- an attack (drum, clap, synth note) leaves the residual after it louder than before it; the scale takes the
  residual after the peak raised by that growth, so an impulse that opens a louder sound is an onset;
- a burst of noise has other peaks of its size close by: the score is capped at 5 times the peak's ratio to
  the largest other peak from 2 ms before to 4 ms after it;
- the edges of a sawtooth or square wave are steps that recur: a step-shaped peak whose neighbourhood recurs,
  at about its size, in the last 20 ms is capped the same way. Impulse-shaped repeats (a click every 10 ms
  from a failing buffer) are not, so click trains are still reported;
- sound starting from, or stopping into, digital silence is not reported: that transition is the silence
  and dropout detectors' event (a hard stop is audible as a click, but it is reported there once). An
  impulse inside digital silence is a click.

Placing an impulse needs the residual after it and judging an onset needs the next 5 ms, so results lag the
input by LAG_WINDOWS: see `impulse_windows`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_WINDOW = 240
LAG_WINDOWS = 1

# Recommended decision: score over CLICK_SCORE and level over CLICK_LEVEL. The score of clean speech, music
# and drum samples stayed under 12, a 0.05 click in music where it can be heard scores over 20. The level
# floor (-50 dBFS) is for the detector: impulses below it are inaudible under anything but silence, and
# near silence the codec's own block edges score up to ~8 at levels around 0.001.
CLICK_SCORE = 16.0
CLICK_LEVEL = 0.003

_ORDER = 16
_FIT_WINDOWS = 4  # the predictor's fit span, in windows (20 ms)
# A window reports its strongest impulse only when no sample of its neighbours within this many samples has
# a larger amplitude estimate, so one click (or pop) straddling a window boundary is reported once.
_GUARD = 48
_RING = 96  # samples on either side of the peak for its local scale and isolation (2 ms)
_ONSET = 4.0  # the most by which residual growth after an impulse raises its scale
_ISO_K = 5.0
_ISO_AHEAD = 200  # isolation looks this far after the peak: as far as the one-window lookahead allows
_ISO_SKIP = 32  # ... from this far on: the first 2/3 ms after a pop's start are its own decay
_PERIOD_WINDOWS = 4  # how far back a periodic edge's twin is looked for (20 ms: waveforms down to 50 Hz)
_STEP_LIKE = 1.2  # step-template over impulse-template match above which a peak counts as an edge
_TWIN_HALF = 8  # a twin is a 17-sample stretch of the signal's slope that
_TWIN_CORR = 0.9  # correlates this well with the slope around the peak,
_TWIN_SIZE = 1.25  # has its energy within this factor (squared),
_TWIN_PROMINENCE = 30.0  # for a peak whose slope has this many times the typical slope energy around it
_OUTLIER = 5.0  # first-pass residual outliers, in sigmas, replaced by their prediction for the fit

# Fit regularisation: -30 dB of white noise keeps pure tones from making a razor-edged predictor, and a
# -100 dBFS floor makes digital silence fit a zero predictor rather than NaN.
_WHITE = 1e-3
_FIT_FLOOR = 1e-10
# Scale floor (-140 dBFS), only so that digital silence scores 0 rather than NaN.
_SCALE_FLOOR = 1e-7
_MEDIAN_TO_SIGMA = 1.0 / 0.6745
# The analysis runs in float32 whatever the input: float64 doubled the CPU time and changed no decision on
# the test material (the regularised fit keeps the filters well conditioned).
_DTYPE = torch.float32

# Context in windows before the chunk's first described window's left neighbour: the first-pass fit and its
# outlier-run look-back, the final fit, the older predictor offered as an alternative and the periodicity
# look-back (see `_analyse`).
_CONTEXT_WINDOWS = 3 * _FIT_WINDOWS + _PERIOD_WINDOWS


def state_samples(window: int = DEFAULT_WINDOW) -> int:
    """Length of the state: the last samples of the stream that the next chunk needs as context."""
    return _CONTEXT_WINDOWS * window


def impulse_windows(
    x: Tensor, state: Tensor | None = None, window: int = DEFAULT_WINDOW
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per window, the strongest impulse and how far it stands out: (score, offset, level, new_state).

    x: (N, C, T) samples at 48 kHz, T a multiple of `window`. state: (N, C, state_samples(window)) as
    returned by the previous call for the same streams; None starts a stream after digital silence (the
    same as zeros). The state is the stream's last samples, so streams can be regrouped between calls by
    indexing it.

    Results lag one window: result w (of W = T // window) describes the window that starts at sample
    (w - LAG_WINDOWS) * window of this chunk, so result 0 is the last window of the previous chunk (of the
    silence before the stream on its first call). Its impulse is at sample
    (w - LAG_WINDOWS) * window + offset[..., w] of this chunk.

    score (N, C, W) float: the impulse's size over the local residual scale, in residual standard
        deviations (see the module docstring); 0 where a larger impulse less than 1 ms away, in a
        neighbouring window, reports it instead. Over CLICK_SCORE is a click.
    offset (N, C, W) int64: index in the described window of the impulse's sample (a pop's first sample).
    level (N, C, W) float: the impulse's estimated amplitude, for an absolute floor such as CLICK_LEVEL.

    Pure tensor ops on x's device: one call serves a CPU or a CUDA batch without a host sync.
    """
    if x.dim() != 3:
        raise ValueError(f"expected samples of shape (N, C, T), got {tuple(x.shape)}")
    n, c, t = x.shape
    if window <= _ISO_AHEAD + _ORDER:
        raise ValueError(f"window={window} is too short: the lookahead needs more than {_ISO_AHEAD + _ORDER}")
    if t == 0 or t % window:
        raise ValueError(f"T={t} is not a positive multiple of window={window}")
    s = state_samples(window)
    if state is None:
        state = x.new_zeros(n, c, s)
    elif state.shape != (n, c, s):
        raise ValueError(f"expected a state of shape {(n, c, s)}, got {tuple(state.shape)}")
    xc = torch.cat([state.to(x), x], dim=-1)
    score, offset, level = _analyse(xc.to(_DTYPE), window, t // window)
    return score.to(x.dtype), offset, level.to(x.dtype), xc[..., -s:].clone()


@functools.lru_cache(maxsize=16)
def _taper(size: int, device: torch.device) -> Tensor:
    # Cached: building constants on a CUDA device is a blocking host copy per call.
    return torch.hann_window(size, periodic=False, dtype=_DTYPE, device=device)


@functools.lru_cache(maxsize=16)
def _lag_window(order: int, device: torch.device) -> Tensor:
    # 60 Hz Gaussian bandwidth expansion: the predictor does not hinge on a tone's exact frequency.
    k = torch.arange(order + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (2 * torch.pi * 60.0 * k / 48000.0) ** 2).to(device, _DTYPE)


def _levinson(r: Tensor, order: int) -> Tensor:
    """Prediction-error filters [1, -a1, ..., -ap] from autocorrelations r (..., order + 1)."""
    err = r[..., 0]
    a = torch.zeros(*r.shape[:-1], order + 1, dtype=r.dtype, device=r.device)
    a[..., 0] = 1.0
    for i in range(1, order + 1):
        acc = (a[..., :i] * r[..., 1 : i + 1].flip(-1)).sum(-1)
        # The clamp only matters for rounding: a tapered autocorrelation is positive definite.
        k = (-acc / err).clamp(-0.9999, 0.9999).unsqueeze(-1)
        a = torch.cat([a[..., : i + 1] + k * a[..., : i + 1].flip(-1), a[..., i + 1 :]], dim=-1)
        err = err * (1.0 - k[..., 0].square())
    return a


def _fit(y: Tensor, window: int) -> Tensor:
    """Filters (N, C, len - _FIT_WINDOWS + 1, _ORDER + 1), one per window of y from its _FIT_WINDOWS-th on,
    each fitted on the _FIT_WINDOWS windows ending with it."""
    fit = _FIT_WINDOWS * window
    spans = y.unfold(-1, fit, window) * _taper(fit, y.device)
    size = 1 << (fit + _ORDER).bit_length()
    spec = torch.fft.rfft(spans, size)
    r = torch.fft.irfft(spec.real.square() + spec.imag.square(), size)[..., : _ORDER + 1]
    r = r * _lag_window(_ORDER, y.device)
    r[..., 0] = r[..., 0] * (1.0 + _WHITE) + _FIT_FLOOR * fit
    return _levinson(r, _ORDER)


def _taps(frames: Tensor, taps: Tensor, length: int) -> Tensor:
    """sum_k taps[..., k] * frames[..., t + k] for t < length, one set of taps per row of frames."""
    # A loop over the taps: einsum over an unfolded view would copy the frames _ORDER + 1 times.
    out = taps[..., :1] * frames[..., :length]
    for k in range(1, _ORDER + 1):
        out.addcmul_(taps[..., k : k + 1], frames[..., k : k + length])
    return out


def _residual(xd: Tensor, a: Tensor, j0: int, window: int, length: int) -> Tensor:
    """Residual of windows j0, j0 + 1, ... of xd, one per filter in `a`, each with its own filter, over
    `length` samples from the window's start (zeros past the end of xd)."""
    frames = F.pad(xd, (0, window))[..., j0 * window - _ORDER :].unfold(-1, length + _ORDER, window)
    return _taps(frames[..., : a.shape[-2], :], a.flip(-1), length)


def _neighbours(v: Tensor, w0: int, w_out: int, count: int) -> Tensor:
    """Per described window, `count` consecutive windows of v (…, windows, window) from w0 on, joined."""
    return torch.cat([v[..., w0 + i : w0 + i + w_out, :] for i in range(count)], -1)


def _robust_fits(xd: Tensor, window: int) -> tuple[Tensor, int]:
    """Filters for xd's windows from the returned index on, fitted with first-pass outliers replaced.

    A sample whose first-pass residual stands out after a quiet stretch is replaced by its prediction for
    the final fit, so that a click does not whiten the predictor around it (which would raise the residual
    that hides it). Only the first sample of a run: the residual after a click is large because the
    predictor saw the click, not because those samples are bad.
    """
    p = _ORDER
    n, c, _ = xd.shape
    j1 = _FIT_WINDOWS - 1
    e1 = _residual(xd, _fit(xd, window), j1, window, window)
    sigma1 = e1.abs().median(-1, keepdim=True).values * _MEDIAN_TO_SIGMA
    flag = (e1.abs() > _OUTLIER * sigma1.clamp_min(_SCALE_FLOOR)).flatten(-2).to(xd.dtype)
    after_run = F.max_pool1d(F.pad(flag, (p, 0)).flatten(0, 1).unsqueeze(1), p, 1)[:, 0, :-1]
    fix = F.pad(e1.flatten(-2) * flag * (1.0 - after_run.reshape(n, c, -1)), (j1 * window, 0))
    # Windows j1 + 1 on have the full look-back for runs; the final fits start from there.
    return _fit((xd - fix)[..., (j1 + 1) * window :], window), j1 + _FIT_WINDOWS


def _periodic_edge(slope: Tensor, step_like: Tensor, off: Tensor, window: int, w_out: int) -> Tensor:
    """Whether each described window's peak is an edge of a periodic waveform: step-shaped (`step_like`),
    standing out of the signal's slope around it, and with a twin in the last _PERIOD_WINDOWS windows (a
    stretch of slope of about its size that correlates with the one around it). The slope rather than the
    residual, so that windows fitted with different predictors compare alike."""
    h = _TWIN_HALF
    rows = _neighbours(slope, 0, w_out, _PERIOD_WINDOWS + 2).flatten(0, 2)
    at = (off + _PERIOD_WINDOWS * window).reshape(-1, 1) + torch.arange(-h, h + 1, device=slope.device)
    tmpl = rows.gather(-1, at)
    nfft = 1 << rows.shape[-1].bit_length()
    dot = torch.fft.irfft(torch.fft.rfft(rows, nfft) * torch.fft.rfft(tmpl, nfft).conj(), nfft)
    dot = dot[:, : rows.shape[-1] - 2 * h]  # dot[:, i] = sum_k rows[:, i + k] * tmpl[:, k]
    cum = F.pad(rows.square().cumsum(-1), (1, 0))
    energy = (cum[:, 2 * h + 1 :] - cum[:, : -2 * h - 1]).clamp_min(0.0)
    tnorm = tmpl.square().sum(-1, keepdim=True)
    size = (energy / tnorm.clamp_min(1e-30)).sqrt()
    lag = torch.arange(rows.shape[-1] - 2 * h, device=slope.device) - at[:, :1]
    twin = (lag <= -_RING) & (dot >= _TWIN_CORR * (energy * tnorm).sqrt())
    twin = (twin & (size * _TWIN_SIZE >= 1.0) & (size <= _TWIN_SIZE)).any(-1)
    # Only an edge that dominates the slope around it can be told from a chance likeness in noise.
    typical = rows.square().median(-1, keepdim=True).values * (2 * h + 1)
    prominent = (tnorm > _TWIN_PROMINENCE * typical)[:, 0]
    return (twin & prominent).reshape(off.shape) & step_like


def _silence_edge(loud: Tensor, centre: Tensor) -> Tensor:
    """Whether the peak at `centre` of the joined windows (previous, described, next) in which `loud`
    marks the non-zero samples starts sound after digital silence, or stops it into digital silence, and
    the sound lasts on its side. The peak of a transition may land a few samples off it, hence the slack."""
    ring = torch.arange(_RING, device=loud.device)
    adjacent = torch.arange(1, 4, device=loud.device)
    slack = 8

    def quiet(start: Tensor) -> Tensor:
        return ~loud.gather(-1, start + ring).any(-1)

    def sound(start: Tensor) -> Tensor:
        return loud.gather(-1, start + ring).sum(-1) * 2 > _RING

    starts = quiet(centre - slack - _RING) & loud.gather(-1, centre + adjacent).any(-1)
    stops = quiet(centre + slack + 1) & loud.gather(-1, centre - adjacent).any(-1)
    return (starts & sound(centre + slack + _RING)) | (stops & sound(centre - slack - 2 * _RING))


def _analyse(xd: Tensor, window: int, w_out: int) -> tuple[Tensor, Tensor, Tensor]:
    p = _ORDER
    wc = xd.shape[-1] // window
    a_all, a_first = _robust_fits(xd, window)

    # Per-window arrays cover the described windows, _PERIOD_WINDOWS before them and the lookahead window.
    first = wc - 1 - w_out - _PERIOD_WINDOWS
    a = a_all[..., first - a_first :, :]
    e = _residual(xd, a, first, window, window + p)
    sigma = e[..., :window].abs().median(-1).values
    # A predictor whose span holds a loud transient (a pop, a burst) fits the music around it badly; the
    # one fitted on the 20 ms before may do better, and the better one is kept.
    a_old = a_all[..., first - _FIT_WINDOWS - a_first : wc - _FIT_WINDOWS - a_first, :]
    e_old = _residual(xd, a_old, first, window, window + p)
    sigma_old = e_old[..., :window].abs().median(-1).values
    older = (sigma_old < sigma).unsqueeze(-1)
    a = torch.where(older, a_old, a)
    e = torch.where(older, e_old, e)
    sigma = torch.minimum(sigma, sigma_old) * _MEDIAN_TO_SIGMA

    norm = a.square().sum(-1, keepdim=True).sqrt()
    z = _taps(e, a, window) / norm  # matched filter; white residual of sigma gives sigma
    amp = (z / norm).abs()  # least-squares amplitude of an impulse at each sample: comparable across windows
    steps = a.cumsum(-1)  # the trace of a step, for telling edges from impulses
    zs = _taps(e, steps, window).abs() / steps.square().sum(-1, keepdim=True).sqrt()

    v0 = _PERIOD_WINDOWS
    peak, off = z.abs()[..., v0 : v0 + w_out, :].max(-1)
    level = amp[..., v0 : v0 + w_out, :].gather(-1, off.unsqueeze(-1))[..., 0]
    # A larger impulse just across the window's edge reports itself (and this one's trace) instead.
    left = amp[..., v0 - 1 : v0 - 1 + w_out, window - _GUARD :].amax(-1)
    right = amp[..., v0 + 1 : v0 + 1 + w_out, :_GUARD].amax(-1)

    # Scale: the window's residual, and the residual just before and just after the peak (leaving out the
    # impulse's own trace), the latter raised by its growth over the former.
    centre = (off + window).unsqueeze(-1)
    res = _neighbours(e[..., :window].abs(), v0 - 1, w_out, 3)
    side = torch.arange(_RING - 4, device=xd.device)
    before = res.gather(-1, centre - _RING + side).median(-1).values * _MEDIAN_TO_SIGMA
    after = res.gather(-1, centre + p + 4 + side).median(-1).values * _MEDIAN_TO_SIGMA
    growth = (after / before.clamp_min(_SCALE_FLOOR)).clamp(1.0, _ONSET)
    scale = torch.maximum(torch.maximum(sigma[..., v0 : v0 + w_out], before), after * growth)
    score = peak / scale.clamp_min(_SCALE_FLOOR)

    # Isolation: the largest other amplitude estimate close by, beyond the impulse's own trace; a twin
    # makes a periodic edge count as not isolated at all.
    span = v0 + 2
    rel = torch.arange(span * window, device=xd.device) - (off + v0 * window).unsqueeze(-1)
    near = ((rel >= -_RING) & (rel < -p - 4)) | ((rel > _ISO_SKIP) & (rel <= _ISO_AHEAD))
    other = torch.where(near, _neighbours(amp, 0, w_out, span), 0.0).amax(-1)
    step = _neighbours(zs, v0 - 1, w_out, 3).gather(-1, centre + torch.arange(-3, 4, device=xd.device))
    slope = torch.diff(xd, dim=-1, prepend=xd[..., :1]).unflatten(-1, (wc, window))[..., first:, :]
    twin = _periodic_edge(slope, step.amax(-1) > _STEP_LIKE * peak, off, window, w_out)
    other = torch.where(twin, torch.maximum(other, level), other)
    score = torch.minimum(score, _ISO_K * level / other.clamp_min(_SCALE_FLOOR))

    loud = _neighbours(xd.unflatten(-1, (wc, window))[..., first:, :] != 0, v0 - 1, w_out, 3)
    edge = _silence_edge(loud, centre)
    score = torch.where((left >= level) | (right > level) | edge, 0.0, score)
    return score, off, level
