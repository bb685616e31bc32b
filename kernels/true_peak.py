"""True peak (ITU-R BS.1770-4 Annex 2): the peak of the signal 4x oversampled, per 5 ms window, batched.

The interpolator is the one FFmpeg's `ebur128=peak=true` gets from libswresample's defaults when it
resamples 48 kHz to 192 kHz (filter_size 32, Kaiser window beta 9, cut off at the input Nyquist since the
ratio is an upsampling) rather than BS.1770's 48-tap example, so our figures are FFmpeg's to float
rounding instead of within the tolerance BS.1770 leaves between meters. Oversampled value 4n + p
interpolates the input at time n + p/4 from input samples n - 15 ... n + 16; phase 0 is the input sample
itself. The interpolation is flat within 0.01 dB up to 20 kHz and 1.5 dB down at 22 kHz.

Window assignment (latency 16 samples, 1/3 ms): output window w holds the oversampled values at times
[240w - 16, 240w + 224), i.e. every window is late by the 16 samples of look-ahead the filter needs, so a
window is final as soon as its own input has arrived. This is also exactly how FFmpeg's 100 ms frames
(its FTPK log values) group the oversampled signal, so 20 of our windows make one FFmpeg frame. A peak in
the last 16 samples of a window is reported in the next window, and the last 16 samples of a stream are
never reported (FFmpeg does not flush its resampler either). Before the first sample of a stream (state
None) the input is taken as silence; FFmpeg mirrors the first samples instead, so the two differ only on
the first 16 samples of a stream that starts loud.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.audio import DEFAULT_WINDOW, to_db

TAPS = 32
CENTER = 15  # libswresample's (TAPS - 1) // 2: the tap that multiplies input sample n
KAISER_BETA = 9.0
LOOKAHEAD = TAPS - 1 - CENTER  # 16 input samples
STATE_LEN = TAPS - 1  # 31: the input before a chunk that its first window's values read

# TF32, which cuDNN uses for float32 convolutions by default, keeps 10 mantissa bits: a 5e-4 relative error
# that would make a GPU read differently from the CPU. float64 also computes as FFmpeg does, and costs
# only ~1.5x the float32 time on the CPU (about 8 s of one core per stream-hour of stereo).
FILTER_DTYPE = torch.float64


def _taps() -> list[list[float]]:
    """Phases 1..3 of libswresample's build_filter for 48 -> 192 kHz, as plain floats.

    The sum of phase 0's taps normalises every phase (only phase 0's, so phases 1..3 keep their own DC gain
    ripple of about 1e-5, which is what FFmpeg computes); phase 0 is a unit impulse at CENTER.
    """
    norm = torch.special.i0(torch.tensor(KAISER_BETA, dtype=torch.float64)).item()
    phases = []
    for p in range(1, 4):
        row = []
        for i in range(TAPS):
            d = (i - CENTER) - p / 4
            w = d / (TAPS / 2)
            window = torch.special.i0(
                torch.tensor(KAISER_BETA * math.sqrt(max(1.0 - w * w, 0.0)), dtype=torch.float64)
            ).item()
            row.append(math.sin(math.pi * d) / (math.pi * d) * window / norm)
        phases.append(row)
    return phases


@functools.lru_cache(maxsize=16)
def _filter(device: torch.device, dtype: torch.dtype) -> Tensor:
    # Cached because building a tensor from Python floats on a CUDA device is a blocking host copy per call.
    return torch.tensor(_taps(), device=device, dtype=dtype).unsqueeze(1)  # (3, 1, TAPS)


def true_peak(x: Tensor, state: Tensor | None = None, window: int = DEFAULT_WINDOW) -> tuple[Tensor, Tensor]:
    """Per-window true peak of samples (N, C, T) at 48 kHz, and the state for the next chunk.

    Returns (peak, state): `peak` (N, C, W) in x's dtype is the largest |value| of the 4x oversampled signal
    over each window's span (see the module docstring: spans are 16 samples late), linear amplitude; `state`
    (N, C, 31) holds the last 31 input samples, the history the next chunk's first window needs. Pass it
    back with the next chunk of the same streams and the windows are those of the whole signal at once;
    None (zeros) starts from silence.
    """
    if x.dim() != 3:
        raise ValueError(f"expected samples of shape (N, C, T), got {tuple(x.shape)}")
    n, c, t = x.shape
    if window <= 0 or t % window:
        raise ValueError(f"T={t} is not a multiple of window={window}")
    if state is None:
        state = x.new_zeros(n, c, STATE_LEN)
    if t == 0:
        return x.new_zeros(n, c, 0), state.to(device=x.device, dtype=x.dtype)
    xp = torch.cat([state.to(device=x.device, dtype=x.dtype), x], dim=-1)  # (N, C, 31 + T)

    rows = n * c
    weight = _filter(x.device, FILTER_DTYPE)
    # Output j of the convolution reads xp[j : j + 32], i.e. it interpolates around input time j - 16:
    # the 16 samples of latency above. One filter group per row is the depthwise form, the fast one for
    # float64 on the CPU (the plain batched form there is ~15x slower) and a single kernel on the GPU.
    y = F.conv1d(xp.reshape(1, rows, -1).to(FILTER_DTYPE), weight.repeat(rows, 1, 1), groups=rows)
    y = y.view(n, c, 3, t // window, window)
    # Two reductions rather than abs() first: that would write out another copy of the oversampled signal.
    peak = torch.maximum(y.amax((2, 4)), -y.amin((2, 4))).to(x.dtype)
    phase0 = xp[..., CENTER : CENTER + t].abs().view(n, c, t // window, window).amax(-1)
    peak = torch.maximum(peak, phase0)
    # A copy, so the state does not keep the whole chunk alive.
    return peak, xp[..., -STATE_LEN:].clone()


def to_dbtp(peak: Tensor, floor_db: float = -150.0) -> Tensor:
    """True peaks (linear) in dBTP: 20*log10, clamped below at `floor_db` so digital silence stays finite."""
    return to_db(peak, floor_db)
