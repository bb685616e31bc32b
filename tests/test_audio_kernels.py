"""Per-window audio kernels: levels, silence to the exact sample, clipping runs across chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.audio import (
    clipped_windows,
    first_loud_offset,
    last_loud_offset,
    power_to_db,
    silent_windows,
    to_db,
    window_mean_square,
    window_peak,
)

W = 240


def _noise(n: int, c: int, t: int, scale: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, t, generator=g) * scale).clamp(-1, 1)


def test_window_peak_and_mean_square_match_numpy() -> None:
    x = _noise(2, 3, 4800, scale=0.1)
    x[1, 2, 250] = -0.95  # a negative peak must count by magnitude
    ref = x.numpy().reshape(2, 3, 20, W)
    peak = window_peak(x)
    ms = window_mean_square(x)
    assert peak.shape == ms.shape == (2, 3, 20)
    np.testing.assert_allclose(peak.numpy(), np.abs(ref).max(-1), rtol=0, atol=0)
    np.testing.assert_allclose(ms.numpy(), (ref.astype(np.float64) ** 2).mean(-1), rtol=1e-5)
    assert peak[1, 2, 1] == pytest.approx(0.95)


def test_window_functions_reject_partial_windows() -> None:
    with pytest.raises(ValueError):
        window_peak(torch.zeros(1, 1, 250))
    with pytest.raises(ValueError):
        window_mean_square(torch.zeros(1, 250))


def test_db_conversions_and_floor() -> None:
    amp = torch.tensor([1.0, 0.1, 0.001, 0.0])
    np.testing.assert_allclose(to_db(amp).numpy(), [0.0, -20.0, -60.0, -150.0], atol=1e-4)
    np.testing.assert_allclose(power_to_db(amp).numpy(), [0.0, -10.0, -30.0, -150.0], atol=1e-4)
    assert to_db(torch.tensor([0.0]), floor_db=-90.0).item() == -90.0


def test_silence_is_placed_on_the_exact_sample() -> None:
    t = 48_000
    start, end = 12_345, 30_001  # first silent sample, first loud sample after the silence
    x = torch.full((1, 1, t), 0.01)
    x[0, 0, 1::2] = -0.01  # loud on both signs
    x[0, 0, start:end] = 0.0005  # below 0.001 (-60 dB) but not zero
    silent = silent_windows(x, 0.001)[0, 0].numpy()

    win = np.arange(t // W)
    expected = (win * W >= start) & ((win + 1) * W <= end)
    np.testing.assert_array_equal(silent, expected)

    last = last_loud_offset(x, 0.001)[0, 0]
    first = first_loud_offset(x, 0.001)[0, 0]
    # The last non-silent window before the silence says where the silence starts ...
    w_before = int(np.flatnonzero(win * W < start)[-1])
    assert w_before * W + int(last[w_before]) + 1 == start
    # ... and the first non-silent window after it where the silence ends.
    w_after = int(np.flatnonzero(~silent & (win * W >= start))[0])
    assert w_after * W + int(first[w_after]) == end
    # Fully silent windows have no loud sample at all.
    w_mid = (start // W) + 2
    assert silent[w_mid] and int(first[w_mid]) == -1 and int(last[w_mid]) == -1


def test_silence_threshold_is_strict_like_silencedetect() -> None:
    x = torch.zeros(3, 1, W)
    x[0, 0, 7] = 0.001  # exactly at the threshold: not silent (s < noise fails)
    x[1, 0, 7] = -0.000999  # just inside: silent
    x[2, 0, 7] = float("nan")  # never silent
    assert silent_windows(x, 0.001)[:, 0, 0].tolist() == [False, True, False]
    assert first_loud_offset(x, 0.001)[:, 0, 0].tolist() == [7, -1, 7]
    assert last_loud_offset(x, 0.001)[:, 0, 0].tolist() == [7, -1, 7]


def test_per_stream_silence_threshold() -> None:
    x = torch.full((2, 2, W), 0.005)
    thr = torch.tensor([0.001, 0.01])  # (N,): one threshold per stream
    assert silent_windows(x, thr)[:, :, 0].tolist() == [[False, False], [True, True]]


def _clip_reference(sig: np.ndarray, level: float, min_run: int) -> np.ndarray:
    """Per-sample flags of a whole 1-D signal: in a run of >= min_run samples with |s| >= level."""
    hot = np.abs(sig) >= level
    out = np.zeros_like(hot)
    i = 0
    while i < hot.size:
        if hot[i]:
            j = i
            while j < hot.size and hot[j]:
                j += 1
            if j - i >= min_run:
                out[i:j] = True
            i = j
        else:
            i += 1
    return out


def _clip_signal(t: int, runs: list[tuple[int, int]]) -> np.ndarray:
    sig = np.full(t, 0.5, dtype=np.float32)
    sig[1::3] = -0.5
    for start, length in runs:
        sig[start : start + length] = 1.0 if start % 2 else -1.0
    return sig


def test_clipped_runs_within_one_chunk() -> None:
    runs = [(100, 2), (300, 3), (470, 20), (1000, 1), (2000, 7)]  # (470, 20) crosses a window edge
    sig = _clip_signal(4800, runs)
    sig[3000] = 0.9989  # below level 0.999: breaks nothing, counts nothing
    sig[3001:3003] = 0.999
    counts, carry = clipped_windows(torch.from_numpy(sig)[None, None])
    ref = _clip_reference(sig, 0.999, 3).reshape(-1, W).sum(-1)
    np.testing.assert_array_equal(counts[0, 0].numpy(), ref)
    assert int(counts.sum()) == 3 + 20 + 7
    assert int(carry[0, 0]) == 0


def test_clipped_runs_across_chunk_boundaries() -> None:
    chunk = 4800
    runs = [
        (chunk - 4, 10),  # already >= 3 before the boundary: counted where the samples are
        (2 * chunk - 1, 2),  # 1 + 1 sample across a boundary: too short, never counted
        (3 * chunk - 1, 5),  # 1 sample before + 4 after: completed in the next chunk
        (4 * chunk - 3, chunk + 10),  # spans a whole chunk
        (6 * chunk - 2, 2),  # 2 samples ending the last chunk: undecided, in the carry
    ]
    sig = _clip_signal(6 * chunk, runs)
    whole = _clip_reference(sig, 0.999, 3).reshape(-1, W).sum(-1)

    x = torch.from_numpy(sig)[None, None]
    whole_counts, _ = clipped_windows(x)
    np.testing.assert_array_equal(whole_counts[0, 0].numpy(), whole)

    carry = None
    parts = []
    for i in range(0, sig.size, chunk):
        counts, carry = clipped_windows(x[..., i : i + chunk], carry=carry)
        parts.append(counts[0, 0].numpy())
    chunked = np.concatenate(parts)
    assert carry is not None and int(carry[0, 0]) == 2

    # Totals are exact; only the single sample of the run completed after the boundary at 3*chunk moves
    # from the last window of chunk 3 to the first window of chunk 4.
    assert chunked.sum() == whole.sum() == 10 + 5 + chunk + 10
    expected = whole.copy()
    w = 3 * chunk // W
    expected[w - 1] -= 1
    expected[w] += 1
    np.testing.assert_array_equal(chunked, expected)


def test_clip_carry_is_per_stream_and_channel() -> None:
    x = torch.zeros(2, 2, 480)
    x[0, 1, -3:] = 1.0  # a complete run ends the chunk: counted now, carried as 3
    x[1, 0, -2:] = -1.0  # two samples: carried, not counted yet
    counts, carry = clipped_windows(x)
    assert carry.tolist() == [[0, 3], [2, 0]]
    assert counts.sum(-1).tolist() == [[0, 3], [0, 0]]

    nxt = torch.zeros(2, 2, 480)
    nxt[:, :, :1] = 1.0  # each run grows by one sample
    counts2, carry2 = clipped_windows(nxt, carry=carry)
    assert carry2.tolist() == [[0, 0], [0, 0]]
    assert counts2[..., 0].tolist() == [[0, 1], [3, 0]]  # stream 1: 2 deferred + 1 now
    assert int(counts2[..., 1].sum()) == 0
