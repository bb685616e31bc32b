"""A/V sync measurement building blocks: onset envelopes on a common time grid and their cross-correlation.

What is heard and what is seen are compared as two event trains on the audio analysis grid (5 ms): the
audio onset envelope (rises of the windows' log power) and the visual change envelope (rises of the
frame-to-frame difference, placed at each frame's presentation time). A sound and the picture change it
belongs to (a flash and its beep, a cut and its sound, a door slam) rise together; the lag at which the
two trains correlate best is the offset between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Power floor for the log: -100 dBFS, below anything audible, so digital silence does not make the onset
# of the quietest noise look like an explosion.
POWER_FLOOR = 1e-10


def audio_onsets(power: Tensor, prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Onset envelope of (N, W) window powers (channels summed): the rise of log10 power from each window to
    the next, negative changes set to 0. `prev` (N,) is the last log power of the previous chunk, NaN (or
    None for all) for a stream that starts here: its first window has no rise. Returns (envelope (N, W),
    new prev (N,))."""
    lp = torch.log10(power.clamp_min(POWER_FLOOR))
    before = lp[:, :1] if prev is None else torch.where(prev.isnan(), lp[:, 0], prev.to(lp)).unsqueeze(1)
    rise = torch.diff(lp, dim=1, prepend=before).clamp_min(0.0)
    return rise, lp[:, -1]


def visual_novelty(small: Tensor, history: Tensor | None = None, depth: int = 8, pool: int = 4) -> tuple[Tensor, Tensor]:
    """How new each picture is: the mean absolute difference (code values) between each of the (K, H, W)
    planes and the most similar of the `depth` pictures before it, on planes averaged `pool` x `pool`.

    A cut or the first frame of a flash is new against everything recent; the frame after a flash returns
    to what was there before and is not, so a flash is one event, however many frames it lasts (up to
    `depth - 1`). `history` (m, H/pool, W/pool) float32 is the previous call's pooled planes (None at a
    stream start: the first picture has nothing to be new against and scores 0). Returns (novelty (K,),
    new history).
    """
    novelty, new = novelty_segments(pool_planes(small, pool), [small.shape[0]], [history], depth)
    return novelty, new[0]


def pool_planes(small: Tensor, pool: int = 4) -> Tensor:
    """(K, H, W) uint8 planes averaged `pool` x `pool` (avg_pool2d's result exactly: integer sums over the
    whole cells, then one division), float32: what novelty compares.

    On a CPU the sums run 16 pictures at a time in 16-bit integers, so the temporaries stay in cache: three
    times faster than avg_pool2d over a float copy of the pass (26 against 83 ms for 256 small planes)."""
    k, h, w = small.shape
    hh, ww = h // pool, w // pool
    if k == 0 or hh == 0 or ww == 0:
        return torch.zeros((k, hh, ww), dtype=torch.float32, device=small.device)
    acc = torch.int16 if pool * pool * 255 < 2**15 else torch.int32
    cells = small[:, : hh * pool, : ww * pool]
    step = 16 if small.device.type == "cpu" else k
    sums = [
        part.reshape(-1, hh * pool, ww, pool).sum(-1, dtype=acc).reshape(-1, hh, pool, ww).sum(2, dtype=acc)
        for part in cells.split(step)
    ]
    return (sums[0] if len(sums) == 1 else torch.cat(sums)).to(torch.float32) / (pool * pool)


def novelty_segments(
    pooled: Tensor, lengths: list[int], histories: list[Tensor | None], depth: int = 8
) -> tuple[Tensor, list[Tensor]]:
    """visual_novelty for many streams at once: `pooled` (K, h, w) holds the pooled pictures of several
    streams one after the other (`lengths` pictures each), `histories` each stream's pooled pictures from
    before (None: a stream start). A picture is compared only with earlier pictures of its own stream.
    Returns (novelty (K,), each stream's new history)."""
    if sum(lengths) != pooled.shape[0] or len(lengths) != len(histories):
        raise ValueError(f"{len(lengths)} streams of {sum(lengths)} pictures for {pooled.shape[0]} pictures and {len(histories)} histories")
    parts: list[Tensor] = []
    cur, low, ends = [], [], []
    pos = at = 0
    for k, hist in zip(lengths, histories, strict=True):
        start = pos
        if hist is not None and hist.shape[0]:
            parts.append(hist.to(pooled))
            pos += hist.shape[0]
        parts.append(pooled[at : at + k])
        cur.extend(range(pos, pos + k))
        low.extend([start] * k)
        pos += k
        at += k
        ends.append((start, pos))
    seq = torch.cat(parts) if len(parts) > 1 else parts[0]
    dev = pooled.device
    # All (picture, earlier picture of the same stream) pairs in one gather: a handful of tensor calls per
    # tick for all streams, instead of a few per stream (the largest per-stream cost of a CPU service).
    idx = torch.tensor(cur, device=dev).unsqueeze(1) - torch.arange(1, depth + 1, device=dev)
    outside = idx < torch.tensor(low, device=dev).unsqueeze(1)
    d = (pooled.unsqueeze(1) - seq[idx.clamp_min(0)]).abs_().flatten(2).mean(2)  # (K, depth)
    best = d.masked_fill_(outside, float("inf")).amin(1)
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)
    return best, [seq[max(a, b - depth) : b].clone() for a, b in ends]


def xcorr_terms(a: Tensor, v: Tensor, max_lag: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sums that make the normalised cross-correlation of a block of audio onsets `a` (N, T) with the
    visual onsets `v` (N, T + 2 * max_lag) around it (max_lag grid steps before and after the block).

    Returns (r, ea, ev): r (N, 2L + 1), where r[:, L + l] = sum_t a[t] * v[t - l] (lag l from -L to L: the
    peak sits at the lag by which the audio comes late); ea (N,) the audio energy; ev (N, 2L + 1) the energy
    of the video samples each lag uses. Each signal is centred on its own mean first. Sums of blocks add
    up, so a long span is the sum of its blocks, and `pearson` turns the sums into a coefficient per lag.
    """
    if a.dim() != 2 or v.dim() != 2 or v.shape[1] != a.shape[1] + 2 * max_lag:
        raise ValueError(f"expected a (N, T) and v (N, T + 2 * {max_lag}), got {tuple(a.shape)} and {tuple(v.shape)}")
    a = a.to(torch.float64)
    v = v.to(torch.float64)
    a = a - a.mean(1, keepdim=True)
    v = v - v.mean(1, keepdim=True)
    t = a.shape[1]
    span = 2 * max_lag + 1
    size = 1 << (v.shape[1] + t).bit_length()  # zero padding: no circular wrap into the lags used
    # c[k] = sum_t a[t] * v[t + k]; video index t + k is the time t - (L - k) of the block, i.e. lag L - k.
    c = torch.fft.irfft(torch.fft.rfft(a, size).conj() * torch.fft.rfft(v, size), size)[:, :span]
    csq = torch.nn.functional.pad(torch.cumsum(v * v, 1), (1, 0))
    e = csq[:, t : t + span] - csq[:, :span]
    return c.flip(1), (a * a).sum(1), e.flip(1)


def pearson(r: Tensor, ea: Tensor, ev: Tensor) -> Tensor:
    """Correlation coefficient per lag from summed `xcorr_terms`; 0 where a signal has no variance."""
    scale = torch.sqrt(ea.unsqueeze(1) * ev)
    return torch.where(scale > 0, r / scale.clamp_min(1e-300), torch.zeros_like(r))


def peak_and_rival(r: Tensor, exclude: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best lag of each row of (N, L) correlations, its value, and the best value more than `exclude` lags
    away from it (the strongest alternative explanation). Returns (index (N,), peak (N,), rival (N,))."""
    idx = r.argmax(1)
    peak = r.gather(1, idx.unsqueeze(1)).squeeze(1)
    lags = torch.arange(r.shape[1], device=r.device).unsqueeze(0)
    far = (lags - idx.unsqueeze(1)).abs() > exclude
    rival = torch.where(far, r, torch.full_like(r, -1.0)).amax(1)
    return idx, peak, rival
