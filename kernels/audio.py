"""Per-window level, silence and clipping measurements on batched audio.

Every function takes samples `x` of shape (N, C, T): N streams, C channels, T samples at 48 kHz with T a
multiple of `window`, and answers per window, shape (N, C, W) with W = T // window. They only use tensor
ops on `x`'s own device and dtype, so one call serves a CPU batch or a CUDA batch without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

# 5 ms at 48 kHz, the same value as engine.media.AUDIO_WINDOW (kernels never import the engine).
DEFAULT_WINDOW = 240

# FFmpeg's silencedetect default (-60 dB) as an amplitude.
SILENCE_THRESHOLD = 0.001


def _windows(x: Tensor, window: int) -> Tensor:
    """(N, C, T) -> (N, C, W, window) view; the shape checks only read Python ints, so no device sync."""
    if x.dim() != 3:
        raise ValueError(f"expected samples of shape (N, C, T), got {tuple(x.shape)}")
    t = x.shape[-1]
    if window <= 0 or t % window:
        raise ValueError(f"T={t} is not a multiple of window={window}")
    return x.unflatten(-1, (t // window, window))


def _per_sample(value: float | Tensor, x: Tensor) -> float | Tensor:
    """Let a per-stream (N,) or per-channel (N, C) threshold broadcast against (N, C, T) samples."""
    if isinstance(value, Tensor):
        value = value.to(device=x.device, dtype=x.dtype)
        while value.dim() < 3 and value.dim() > 0:
            value = value.unsqueeze(-1)
    return value


def window_peak(x: Tensor, window: int = DEFAULT_WINDOW) -> Tensor:
    """Absolute sample peak per window, (N, C, W)."""
    return _windows(x.abs(), window).amax(-1)


def window_mean_square(x: Tensor, window: int = DEFAULT_WINDOW) -> Tensor:
    """Mean of the squared samples per window, (N, C, W); average these to get the power of longer spans."""
    return _windows(x, window).square().mean(-1)


def to_db(x: Tensor, floor_db: float = -150.0) -> Tensor:
    """20*log10 of amplitudes (peaks, RMS), clamped below at `floor_db` so digital silence stays finite."""
    return (20.0 * torch.log10(x)).clamp_min(floor_db)


def power_to_db(x: Tensor, floor_db: float = -150.0) -> Tensor:
    """10*log10 of powers (mean squares), clamped below at `floor_db`."""
    return (10.0 * torch.log10(x)).clamp_min(floor_db)


def silent_windows(
    x: Tensor, threshold: float | Tensor = SILENCE_THRESHOLD, window: int = DEFAULT_WINDOW
) -> Tensor:
    """(N, C, W) bool: True where every sample of the window has |s| < threshold.

    This is FFmpeg silencedetect's per-sample test (`s < noise && s > -noise`), so a NaN sample is never
    silent. `threshold` is an amplitude (0.001 for -60 dB); a tensor of shape (N,) or (N, C), or anything
    that broadcasts against (N, C, T), gives each stream or channel its own threshold.
    """
    quiet = x.abs() < _per_sample(threshold, x)
    return _windows(quiet, window).all(-1)


def _loud(x: Tensor, threshold: float | Tensor, window: int) -> Tensor:
    # Negated "quiet" rather than |s| >= threshold so NaN counts as loud, exactly the complement of silence.
    return _windows(~(x.abs() < _per_sample(threshold, x)), window)


def first_loud_offset(
    x: Tensor, threshold: float | Tensor = SILENCE_THRESHOLD, window: int = DEFAULT_WINDOW
) -> Tensor:
    """(N, C, W) int64: index inside each window of the first sample that is not silent, -1 if none.

    With `silent_windows` this places the end of a silence on the exact sample: the silence ends at
    `w * window + first_loud_offset[..., w]` for the first non-silent window w.
    """
    loud = _loud(x, threshold, window)
    first = loud.to(torch.uint8).argmax(-1)  # argmax returns the first of equal maxima
    return torch.where(loud.any(-1), first, -1)


def last_loud_offset(
    x: Tensor, threshold: float | Tensor = SILENCE_THRESHOLD, window: int = DEFAULT_WINDOW
) -> Tensor:
    """(N, C, W) int64: index inside each window of the last sample that is not silent, -1 if none.

    A silence starts on the sample after `w * window + last_loud_offset[..., w]` of the last non-silent
    window w before it.
    """
    loud = _loud(x, threshold, window)
    last = window - 1 - loud.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(loud.any(-1), last, -1)


def clipped_windows(
    x: Tensor,
    level: float | Tensor = 0.999,
    min_run: int = 3,
    window: int = DEFAULT_WINDOW,
    carry: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Count clipped samples per window: those in a run of >= `min_run` consecutive samples with |s| >= level.

    Clipping shows up as flat runs at full scale, while a lone full-scale sample is legitimate, hence the
    run-length condition.

    `carry` (N, C) int64, and the returned new carry, is the length of the run of |s| >= level samples that
    ends on the last sample of the chunk, counted across all earlier chunks it spans (0 when the last
    sample is below `level`). Pass the returned carry back with the next chunk of the same streams; pass
    None (zeros) at a stream start or after a gap, so no run is joined across a discontinuity.

    Returns (counts (N, C, W) int64, new_carry (N, C) int64). Whole runs inside a chunk are counted in the
    windows their samples lie in, and a run reaching the chunk end is counted as soon as it is >= min_run
    long. Only a run that is still shorter than `min_run` at a chunk end is undecided: if the next chunk
    completes it, its up to `min_run - 1` samples from the earlier chunk are added to the first window of
    the next chunk. Summed over a stream, the counts are therefore exactly those of the whole signal.
    """
    _windows(x, window)  # shape check
    n, c, t = x.shape
    if carry is None:
        carry = torch.zeros(n, c, dtype=torch.int64, device=x.device)
    else:
        carry = carry.to(device=x.device, dtype=torch.int64)

    hot = x.abs() >= _per_sample(level, x)
    idx = torch.arange(t, device=x.device)
    # Run bounds from prefix scans: the nearest non-hot sample at or before / at or after each sample.
    prev_cold = torch.where(hot, -1, idx).cummax(-1).values
    next_cold = torch.where(hot, t, idx).flip(-1).cummin(-1).values.flip(-1)
    run = next_cold - prev_cold - 1
    # The chunk's leading run continues the previous chunk's trailing run.
    run = run + torch.where(prev_cold < 0, carry.unsqueeze(-1), 0)

    counts = _windows(hot & (run >= min_run), window).sum(-1)
    deferred = torch.where(hot[..., 0] & (carry < min_run) & (run[..., 0] >= min_run), carry, 0)
    counts[..., 0] += deferred
    new_carry = torch.where(hot[..., -1], run[..., -1], 0)
    return counts, new_carry


def window_mean(x: Tensor, window: int = DEFAULT_WINDOW) -> Tensor:
    """Mean sample value per window, (N, C, W): averaged over a second it is the channel's DC offset."""
    return _windows(x, window).mean(-1)


def window_cross(x: Tensor, a: Tensor, b: Tensor, window: int = DEFAULT_WINDOW) -> Tensor:
    """Mean of x[:, a] * x[:, b] per window, (N, W), for one channel pair per stream.

    `a` and `b` are (N,) int64 channel indices on x's device (the front left/right pair of each stream's
    layout); with the channels' mean squares this gives their correlation over any span of windows.
    """
    if x.dim() != 3:
        raise ValueError(f"expected samples of shape (N, C, T), got {tuple(x.shape)}")
    rows = torch.arange(x.shape[0], device=x.device)
    return _windows((x[rows, a] * x[rows, b]).unsqueeze(1), window).mean(-1).squeeze(1)
