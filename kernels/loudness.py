"""ITU-R BS.1770-4 / EBU R128 loudness building blocks: K-weighting, channel weights, LUFS conversion.

The stateful gating (momentary, short-term, integrated, LRA) lives in engine/loudness_meter.py; these
kernels produce its input, the K-weighted channel-weighted power of every 5 ms window, for a whole batch
of streams at once on the CPU or the GPU.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch
import torchaudio.functional as taf
from torch import Tensor

# K-weighting at 48 kHz: BS.1770-4 table 1 (pre-filter, a high shelf modelling the head) and table 2
# (RLB weighting, a high-pass), the same constants FFmpeg's ebur128 filter uses.
PRE_B = (1.53512485958697, -2.69169618940638, 1.19839281085285)
PRE_A = (1.0, -1.69065929318241, 0.73248077421585)
RLB_B = (1.0, -2.0, 1.0)
RLB_A = (1.0, -1.99004745483398, 0.99007225036621)

# BS.1770 adds -0.691 dB so that a 1 kHz sine (where K-weighting gains +0.691 dB) reads its own level.
LUFS_OFFSET = -0.691
LUFS_FLOOR = -200.0

SURROUND_WEIGHT = 1.41

# The RLB poles sit at radius 0.995 next to z = 1, where the recursion amplifies its own rounding about a
# thousandfold: in float32 that leaves only ~75 dB of signal-to-noise (2.5e-4 worst case on 0.3 RMS noise)
# and results that depend on each device's rounding (FMA contraction on a GPU), far beyond the 1e-4 that
# CPU and GPU should agree to. So the filters run in float64 whatever the input dtype; on the CPU that
# cost about 1.3x the float32 time, as the recursion is sequential either way.
FILTER_DTYPE = torch.float64


class KState(NamedTuple):
    """Filter memory carried between chunks, each (N, C, 2) float64 with the older sample first.

    `x` holds the last two raw input samples, `y` the last two pre-filter outputs (which are also the RLB
    filter's input history) and `z` the last two K-weighted outputs.
    """

    x: Tensor
    y: Tensor
    z: Tensor

    @staticmethod
    def zeros(
        n: int, c: int, device: torch.device | str | None = None, dtype: torch.dtype = FILTER_DTYPE
    ) -> KState:
        """The state of a filter that has only seen silence: use it at a stream start."""
        return KState(*(torch.zeros(n, c, 2, device=device, dtype=dtype) for _ in range(3)))

    def select(self, index: Tensor | list[int] | slice) -> KState:
        """The state of a subset of the streams, for when streams join or leave a batch."""
        return KState(self.x[index], self.y[index], self.z[index])


@functools.lru_cache(maxsize=16)
def _all_pole(
    a: tuple[float, float, float], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    # Cached because building a tensor from Python floats on a CUDA device is a blocking host copy per call.
    return (
        torch.tensor(a, device=device, dtype=dtype),
        torch.tensor((1.0, 0.0, 0.0), device=device, dtype=dtype),
    )


def _biquad(x: Tensor, x_hist: Tensor, y_hist: Tensor, b: tuple[float, ...], a: tuple[float, ...]) -> Tensor:
    """One biquad over (N, C, T) that resumes from the previous chunk's last two inputs and outputs.

    lfilter always starts from rest, so the filter is split: the FIR part sees the two previous inputs
    prepended, and the all-pole part gets its initial conditions folded into its first two inputs. The
    folding subtracts a2 before a1, the order of torchaudio's own recursion, so that resuming a chunk is
    bit-identical on the CPU to filtering the concatenated signal.
    """
    t = x.shape[-1]
    xp = torch.cat([x_hist, x], dim=-1)
    v = b[0] * xp[..., 2:] + b[1] * xp[..., 1 : t + 1] + b[2] * xp[..., :t]

    a_coeffs, b_coeffs = _all_pole(a, x.device, x.dtype)
    a1, a2 = a_coeffs[1], a_coeffs[2]
    y1, y2 = y_hist[..., 1], y_hist[..., 0]
    v[..., 0] = v[..., 0] - y2 * a2 - y1 * a1
    if t > 1:
        v[..., 1] = v[..., 1] - y1 * a2
    # One filter row per (stream, channel) makes lfilter's internal FIR pass a depthwise convolution, which
    # is several times faster on the CPU than the single-filter form over a batch of rows.
    rows = v.shape[0] * v.shape[1]
    y = _lfilter(v.reshape(rows, t), a_coeffs.expand(rows, 3), b_coeffs.expand(rows, 3))
    return y.reshape(v.shape)


def _lfilter(v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    if v.device.type != "cuda":
        return taf.lfilter(v, a, b, clamp=False, batching=True)
    # torchaudio launches its CUDA recursion kernel on the legacy default stream whatever stream is current
    # (`iir_cu_kernel<<<blocks, threads>>>`), and torch's other streams do not wait for that one: on the
    # engine's scoring stream the recursion raced the kernels around it (the GPU check read zeros and
    # garbage loudness, and out-of-range click positions tripped a device assert). So the whole call runs
    # on the default stream, ordered both ways with the current one.
    current = torch.cuda.current_stream(v.device)
    default = torch.cuda.default_stream(v.device)
    if current == default:
        return taf.lfilter(v, a, b, clamp=False, batching=True)
    default.wait_stream(current)
    with torch.cuda.stream(default):
        y = taf.lfilter(v, a, b, clamp=False, batching=True)
    current.wait_stream(default)
    y.record_stream(current)  # allocated on the default stream, freed while the current one may use it
    return y


def _tail(hist: Tensor, s: Tensor) -> Tensor:
    # A new tensor, so the state does not keep the whole chunk alive.
    tail = s[..., -2:] if s.shape[-1] >= 2 else torch.cat([hist, s], dim=-1)[..., -2:]
    # After loud audio the recursions decay into subnormal numbers and then circle there forever (a
    # zero-input limit cycle), which keeps every later chunk of digital silence on the slow subnormal
    # path. Flushing the state to zero ends that; normal numbers pass unchanged, so chunking stays exact.
    return torch.where(tail.abs() < torch.finfo(tail.dtype).tiny, 0.0, tail)


def k_weight(x: Tensor, state: KState | None = None) -> tuple[Tensor, KState]:
    """K-weight samples (N, C, T) at 48 kHz; returns (weighted samples, state for the next chunk).

    Pass the returned state with the next chunk of the same streams and the output is that of filtering the
    whole signal at once; `None` starts from silence. Runs on `x`'s device and returns samples in `x`'s
    dtype; the filtering itself and the state are float64 (see FILTER_DTYPE).
    """
    if x.dim() != 3:
        raise ValueError(f"expected samples of shape (N, C, T), got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("empty chunk")
    xw = x.to(FILTER_DTYPE)
    if state is None:
        state = KState.zeros(x.shape[0], x.shape[1], device=x.device)
    hx, hy, hz = (h.to(device=x.device, dtype=FILTER_DTYPE) for h in state)
    y = _biquad(xw, hx, hy, PRE_B, PRE_A)
    z = _biquad(y, hy, hz, RLB_B, RLB_A)
    return z.to(x.dtype), KState(_tail(hx, xw), _tail(hy, y), _tail(hz, z))


# FFmpeg's standard layouts (`ffmpeg -layouts`), the names PyAV reports as `layout.name`.
_LAYOUTS: dict[str, tuple[str, ...]] = {
    "mono": ("FC",),
    "stereo": ("FL", "FR"),
    "2.1": ("FL", "FR", "LFE"),
    "3.0": ("FL", "FR", "FC"),
    "3.0(back)": ("FL", "FR", "BC"),
    "4.0": ("FL", "FR", "FC", "BC"),
    "quad": ("FL", "FR", "BL", "BR"),
    "quad(side)": ("FL", "FR", "SL", "SR"),
    "3.1": ("FL", "FR", "FC", "LFE"),
    "5.0": ("FL", "FR", "FC", "BL", "BR"),
    "5.0(side)": ("FL", "FR", "FC", "SL", "SR"),
    "4.1": ("FL", "FR", "FC", "LFE", "BC"),
    "5.1": ("FL", "FR", "FC", "LFE", "BL", "BR"),
    "5.1(side)": ("FL", "FR", "FC", "LFE", "SL", "SR"),
    "6.0": ("FL", "FR", "FC", "BC", "SL", "SR"),
    "6.0(front)": ("FL", "FR", "FLC", "FRC", "SL", "SR"),
    "hexagonal": ("FL", "FR", "FC", "BL", "BR", "BC"),
    "6.1": ("FL", "FR", "FC", "LFE", "BC", "SL", "SR"),
    "6.1(back)": ("FL", "FR", "FC", "LFE", "BL", "BR", "BC"),
    "6.1(front)": ("FL", "FR", "LFE", "FLC", "FRC", "SL", "SR"),
    "7.0": ("FL", "FR", "FC", "BL", "BR", "SL", "SR"),
    "7.0(front)": ("FL", "FR", "FC", "FLC", "FRC", "SL", "SR"),
    "7.1": ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),
    "7.1(wide)": ("FL", "FR", "FC", "LFE", "BL", "BR", "FLC", "FRC"),
    "7.1(wide-side)": ("FL", "FR", "FC", "LFE", "FLC", "FRC", "SL", "SR"),
    "octagonal": ("FL", "FR", "FC", "BL", "BR", "BC", "SL", "SR"),
    "downmix": ("DL", "DR"),
}

# What FFmpeg guesses for a stream that declares no layout (a plain WAV), by channel count.
_DEFAULT_LAYOUT = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}

_LFE = {"LFE", "LFE2"}
# The channels FFmpeg's ebur128 weights as surrounds (its BACK_MASK).
_SURROUND = {"BL", "BR", "BC", "TBL", "TBC", "TBR", "SL", "SR", "SDL", "SDR"}

_DECOMPOSITION = re.compile(r"[A-Z][A-Z0-9]*(?:\+[A-Z][A-Z0-9]*)+")


def _channel_names(c: int, layout: str | None) -> tuple[str, ...] | None:
    if layout:
        names = _LAYOUTS.get(layout.strip().lower())
        if names is None:
            # Explicit decompositions such as "FL+FR+LFE" or FFmpeg's "3 channels (FL+FR+LFE)".
            m = _DECOMPOSITION.search(layout)
            if m:
                names = tuple(m.group(0).split("+"))
            elif layout.strip().upper() in _LFE | _SURROUND | {"FC", "FL", "FR"}:
                names = (layout.strip().upper(),)
        if names is not None and len(names) == c:
            return names
    default = _DEFAULT_LAYOUT.get(c)
    return _LAYOUTS[default] if default else None


def channel_names(c: int, layout: str | None = None) -> tuple[str, ...]:
    """Names of the C channels (FL, FR, FC, LFE, ...) by the rules of `channel_weights`; channels FFmpeg
    has no default layout for are called c0, c1, ..."""
    names = _channel_names(c, layout)
    return names if names is not None else tuple(f"c{i}" for i in range(c))


def front_pair(names: tuple[str, ...]) -> tuple[int, int] | None:
    """Indices of the front left and right channels (the pair whose phase matters), None without one."""
    for left, right in (("FL", "FR"), ("DL", "DR"), ("FLC", "FRC")):
        if left in names and right in names:
            return names.index(left), names.index(right)
    return None


def channel_weights(
    c: int,
    layout: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """BS.1770 channel weights G_c, shape (C,): 0 for LFE, 1.41 for surrounds, 1.0 for the rest.

    `layout` is an FFmpeg/PyAV layout name ("stereo", "5.1(side)", ...) or a decomposition ("FL+FR+LFE").
    Without a usable layout (unknown, or its channel count is not C) the channels are assumed to be in
    FFmpeg's default layout for C channels, as FFmpeg itself does for a WAV without a channel mask; so a
    bare 6-channel stream is 5.1 with the 4th channel LFE. Counts FFmpeg has no default for get all ones.
    """
    names = _channel_names(c, layout)
    if names is None:
        weights = [1.0] * c
    else:
        weights = [0.0 if n in _LFE else SURROUND_WEIGHT if n in _SURROUND else 1.0 for n in names]
    return torch.tensor(weights, device=device, dtype=dtype)


def weighted_power(ms: Tensor, weights: Tensor) -> Tensor:
    """Channel-weighted power sum_c G_c * ms_c: (N, C, W) mean squares -> (N, W).

    `weights` is (C,) for one layout across the batch or (N, C) for a per-stream layout; keep it on `ms`'s
    device so this is not a host copy per call.
    """
    w = weights.to(device=ms.device, dtype=ms.dtype)
    if w.dim() == 1:
        w = w.expand(ms.shape[0], -1)
    return (ms * w.unsqueeze(-1)).sum(1)


def power_to_lufs(p: Tensor) -> Tensor:
    """-0.691 + 10*log10(p), floored at -200 LUFS (what digital silence reads)."""
    return (LUFS_OFFSET + 10.0 * torch.log10(p)).clamp_min(LUFS_FLOOR)


def lufs_to_power(lufs: float) -> float:
    """Inverse of `power_to_lufs`, for turning LUFS thresholds into power thresholds once."""
    return 10.0 ** ((lufs - LUFS_OFFSET) / 10.0)
