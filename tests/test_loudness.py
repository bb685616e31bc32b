"""K-weighting, channel weights and the R128 meter, against the standards' numbers and FFmpeg's ebur128."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.loudness_meter import HIST_BINS, LoudnessMeter, MeterBlock
from engine.media import AUDIO_CHUNK, AUDIO_RATE, AUDIO_WINDOW
from kernels.audio import window_mean_square
from kernels.loudness import (
    PRE_A,
    PRE_B,
    RLB_A,
    RLB_B,
    KState,
    channel_weights,
    k_weight,
    lufs_to_power,
    power_to_lufs,
    weighted_power,
)

RATE = AUDIO_RATE


def _tone(freq: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return amplitude * np.sin(2 * np.pi * freq * t)


def _dbfs(db: float) -> float:
    return 10 ** (db / 20)


def _measure(
    samples: np.ndarray, layout: str | None = None, chunked: bool = False
) -> tuple[LoudnessMeter, np.ndarray, np.ndarray]:
    """Run (C, T) samples through the kernels and a meter fed 100 ms at a time; return the meter and its
    per-window momentary and short-term values. `chunked` also filters 100 ms at a time, as the engine
    does; otherwise the signal is K-weighted in one call, which is faster and, as tested above, the same.
    """
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
    weights = channel_weights(x.shape[1], layout)
    per_chunk = AUDIO_CHUNK // AUDIO_WINDOW
    if chunked:
        state = None
        powers = []
        for i in range(0, x.shape[-1], AUDIO_CHUNK):
            y, state = k_weight(x[..., i : i + AUDIO_CHUNK], state)
            powers.append(weighted_power(window_mean_square(y), weights)[0])
        power = torch.cat(powers)
    else:
        y, _ = k_weight(x)
        power = weighted_power(window_mean_square(y), weights)[0]
    meter = LoudnessMeter()
    blocks: list[MeterBlock] = [
        meter.feed(power[i : i + per_chunk]) for i in range(0, power.numel(), per_chunk)
    ]
    return (
        meter,
        np.concatenate([b.momentary for b in blocks]),
        np.concatenate([b.short_term for b in blocks]),
    )


# --- K-weighting ---------------------------------------------------------------------------------------


def _reference_biquad(sig: np.ndarray, b: tuple[float, ...], a: tuple[float, ...]) -> np.ndarray:
    """The BS.1770 difference equation, sample by sample, in float64."""
    out = np.empty_like(sig)
    x1 = x2 = y1 = y2 = 0.0
    for n, s in enumerate(sig):
        y = b[0] * s + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        x2, x1, y2, y1 = x1, s, y1, y
        out[n] = y
    return out


def _reference_k_weight(sig: np.ndarray) -> np.ndarray:
    return _reference_biquad(_reference_biquad(sig, PRE_B, PRE_A), RLB_B, RLB_A)


def _noise(n: int, c: int, t: int, seed: int = 0, dc: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, t, generator=g) * 0.3 + dc).clamp(-1, 1)


def test_k_weight_matches_the_difference_equation() -> None:
    x = _noise(1, 2, 12_000, dc=0.1)
    ref = np.stack([_reference_k_weight(x[0, c].double().numpy()) for c in range(2)])

    y64, _ = k_weight(x.double())
    np.testing.assert_allclose(y64[0].numpy(), ref, rtol=0, atol=1e-9)

    # float32 samples in and out, but filtered in float64: only the output rounding remains.
    y32, state = k_weight(x)
    assert y32.dtype == torch.float32 and state.z.dtype == torch.float64
    assert np.abs(y32[0].double().numpy() - ref).max() < 1e-6


def test_k_weight_gain_at_1khz_is_the_bs1770_offset() -> None:
    # BS.1770's -0.691 exists because K-weighting lifts 1 kHz by about +0.69 dB.
    y, _ = k_weight(torch.from_numpy(_tone(1000, 1.0, 1.0)).double()[None, None])
    gain_db = 10 * math.log10(float((y[0, 0, RATE // 2 :] ** 2).mean()) / 0.5)
    assert gain_db == pytest.approx(0.691, abs=0.01)


def _chunked(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state: KState | None = None
    out = []
    i = 0
    for size in sizes:
        y, state = k_weight(x[..., i : i + size], state)
        out.append(y)
        i += size
    assert i == x.shape[-1]
    return torch.cat(out, dim=-1)


def test_k_weight_chunked_equals_whole() -> None:
    x = _noise(3, 2, 10 * AUDIO_CHUNK, seed=1, dc=0.05)
    whole, _ = k_weight(x)
    chunked = _chunked(x, [AUDIO_CHUNK] * 10)
    assert (chunked - whole).abs().max().item() < 1e-5
    # Odd chunk sizes, down to one sample, exercise the state injection's edge cases.
    odd = _chunked(x, [1, 1, 2, 3, 4793, 1, 43_199])
    assert (odd - whole).abs().max().item() < 1e-5


def test_k_weight_state_flushes_subnormals() -> None:
    # 4 s of silence after a burst: long enough for the float64 recursions to decay into subnormals,
    # where without the flush they would circle forever.
    x = torch.zeros(1, 1, 40 * AUDIO_CHUNK)
    x[..., :100] = 0.5
    state = None
    for i in range(0, x.shape[-1], AUDIO_CHUNK):
        _, state = k_weight(x[..., i : i + AUDIO_CHUNK], state)
        assert state is not None
    for h in state:
        assert bool(((h == 0) | (h.abs() >= torch.finfo(h.dtype).tiny)).all())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_k_weight_chunked_on_cuda_matches_cpu() -> None:
    x = _noise(4, 2, 10 * AUDIO_CHUNK, seed=2, dc=0.05)
    cpu = _chunked(x, [AUDIO_CHUNK] * 10)
    gpu = _chunked(x.cuda(), [AUDIO_CHUNK] * 10)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-4
    whole_gpu, _ = k_weight(x.cuda())
    assert (gpu - whole_gpu).abs().max().item() < 1e-4


# --- channel weights and LUFS -----------------------------------------------------------------------------


def test_channel_weights() -> None:
    assert channel_weights(1, "mono").tolist() == [1.0]
    assert channel_weights(2, "stereo").tolist() == [1.0, 1.0]
    assert channel_weights(2, None).tolist() == [1.0, 1.0]
    five_one = [1.0, 1.0, 1.0, 0.0, 1.41, 1.41]
    np.testing.assert_allclose(channel_weights(6, "5.1").numpy(), five_one)
    np.testing.assert_allclose(channel_weights(6, "5.1(side)").numpy(), five_one)
    np.testing.assert_allclose(channel_weights(6, None).numpy(), five_one)  # FFmpeg's guess for 6 channels
    np.testing.assert_allclose(channel_weights(8, "7.1").numpy(), five_one + [1.41, 1.41])
    np.testing.assert_allclose(channel_weights(3, "FL+FR+LFE").numpy(), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(channel_weights(3, "3 channels (FL+FR+BC)").numpy(), [1.0, 1.0, 1.41])
    # A layout that does not fit the channel count falls back to the default for the count.
    assert channel_weights(2, "5.1").tolist() == [1.0, 1.0]
    assert channel_weights(11, None).tolist() == [1.0] * 11


def test_weighted_power_and_lufs() -> None:
    ms = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (N=2, C=2, W=2)
    np.testing.assert_allclose(weighted_power(ms, torch.tensor([1.0, 0.5])).numpy(), [[2.5, 4.0], [1.5, 1.5]])
    per_stream = torch.tensor([[1.0, 0.0], [0.0, 1.41]])
    np.testing.assert_allclose(weighted_power(ms, per_stream).numpy(), [[1.0, 2.0], [1.41, 1.41]], rtol=1e-6)

    lufs = power_to_lufs(torch.tensor([1.0, 0.0, 1e-3]))
    np.testing.assert_allclose(lufs.numpy(), [-0.691, -200.0, -30.691], atol=1e-5)
    assert lufs_to_power(-30.691) == pytest.approx(1e-3)


# --- the meter -------------------------------------------------------------------------------------------


def test_one_channel_full_scale_sine_reads_minus_3_01() -> None:
    sine = _tone(1000, 5.0, 1.0)
    meter, _, _ = _measure(np.stack([sine, np.zeros_like(sine)]))
    assert meter.integrated == pytest.approx(-3.01, abs=0.02)


def test_stereo_sine_amplitude_0_1_reads_minus_20() -> None:
    # Amplitude 0.1 is -20 dBFS peak per channel; two such channels read -20 LUFS (each one is -23.01).
    sine = _tone(1000, 5.0, 0.1)
    meter, momentary, short_term = _measure(np.stack([sine, sine]))
    assert meter.integrated == pytest.approx(-20.0, abs=0.05)
    assert meter.momentary == pytest.approx(-20.0, abs=0.05)
    assert meter.short_term == pytest.approx(-20.0, abs=0.05)
    np.testing.assert_allclose(momentary[80:], -20.0, atol=0.05)


def test_tech3341_stereo_sine_minus_23_dbfs() -> None:
    sine = _tone(1000, 20.0, _dbfs(-23))
    meter, momentary, short_term = _measure(np.stack([sine, sine]))
    assert meter.integrated == pytest.approx(-23.0, abs=0.1)
    assert meter.momentary == pytest.approx(-23.0, abs=0.1)
    assert meter.short_term == pytest.approx(-23.0, abs=0.1)
    assert meter.max_momentary == pytest.approx(-23.0, abs=0.1)
    assert meter.max_short_term == pytest.approx(-23.0, abs=0.1)
    assert meter.loudness_range == pytest.approx(0.0, abs=0.1)
    # FFmpeg's timing: momentary from the window ending at 400 ms, short-term from 3 s.
    assert np.isnan(momentary[:79]).all() and not np.isnan(momentary[79:]).any()
    assert np.isnan(short_term[:599]).all() and not np.isnan(short_term[599:]).any()


def test_tech3341_relative_gate_ignores_quiet_passages() -> None:
    quiet = _tone(1000, 10.0, _dbfs(-36))
    sig = np.concatenate([quiet, _tone(1000, 60.0, _dbfs(-23)), quiet])
    meter, _, _ = _measure(np.stack([sig, sig]))
    assert meter.integrated == pytest.approx(-23.0, abs=0.1)


@pytest.mark.parametrize(
    ("first_db", "second_db", "lra"), [(-20, -30, 10.0), (-20, -15, 5.0), (-40, -20, 20.0)]
)
def test_tech3342_loudness_range(first_db: float, second_db: float, lra: float) -> None:
    sig = np.concatenate([_tone(1000, 20.0, _dbfs(first_db)), _tone(1000, 20.0, _dbfs(second_db))])
    meter, _, _ = _measure(np.stack([sig, sig]))
    assert meter.loudness_range == pytest.approx(lra, abs=1.0)  # Tech 3342's tolerance
    assert meter.loudness_range == pytest.approx(lra, abs=0.1)


def test_meter_is_independent_of_how_it_is_fed() -> None:
    rng = np.random.default_rng(3)
    power = rng.uniform(0.0, 0.02, 1200) * np.repeat(rng.uniform(0.01, 1.0, 60), 20)
    power[500:700] = 0.0
    whole = LoudnessMeter()
    a = whole.feed(power)
    pieces = LoudnessMeter()
    parts: list[MeterBlock] = []
    i = 0
    for size in [1, 7, 20, 13, 599, 1, 559]:
        parts.append(pieces.feed(power[i : i + size]))
        i += size
    assert i == power.size
    assert parts[3].first_window == 28
    np.testing.assert_allclose(np.concatenate([p.momentary for p in parts]), a.momentary, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([p.short_term for p in parts]), a.short_term, atol=1e-9)
    assert pieces.integrated == pytest.approx(whole.integrated, abs=1e-9)
    assert pieces.loudness_range == pytest.approx(whole.loudness_range, abs=1e-9)
    np.testing.assert_allclose(a.end_times()[[0, -1]], [0.005, 6.0])


def test_meter_momentary_matches_a_direct_400ms_mean() -> None:
    rng = np.random.default_rng(4)
    power = rng.uniform(1e-5, 1e-2, 900)
    meter = LoudnessMeter()
    out = np.concatenate([meter.feed(power[i : i + 20]).momentary for i in range(0, 900, 20)])
    direct = -0.691 + 10 * np.log10(np.convolve(power, np.ones(80) / 80, mode="valid"))
    np.testing.assert_allclose(out[79:], direct, atol=1e-9)


def _reference_integrated(power: np.ndarray) -> float:
    """BS.1770-4 gating over an explicit list of 400 ms blocks every 100 ms (no histogram)."""
    blocks = np.array([power[e - 80 : e].mean() for e in range(80, power.size + 1, 20)])
    lufs = -0.691 + 10 * np.log10(np.maximum(blocks, 1e-300))
    kept = blocks[lufs >= -70]
    relative = -0.691 + 10 * np.log10(kept.mean()) - 10
    return float(-0.691 + 10 * np.log10(blocks[lufs >= max(relative, -70)].mean()))


def test_integrated_matches_list_based_gating() -> None:
    rng = np.random.default_rng(5)
    # Levels from -75 to -5 LUFS in 0.5 s steps, so both gates have something to remove.
    power = rng.uniform(0.5, 1.5, 8000) * np.repeat(10 ** (rng.uniform(-7.5, -0.5, 80)), 100)
    meter = LoudnessMeter()
    for i in range(0, power.size, 20):
        meter.feed(power[i : i + 20])
    # The histogram resolves the relative gate to its 0.01 LU bin; the energies themselves are exact.
    assert meter.integrated == pytest.approx(_reference_integrated(power), abs=0.01)


def test_digital_silence_and_gates() -> None:
    meter = LoudnessMeter()
    meter.feed(np.zeros(200))
    assert math.isnan(meter.integrated) and math.isnan(meter.loudness_range)
    assert meter.momentary == -200.0
    meter.feed(np.full(200, 1e-9))  # -90.7 LUFS: below the absolute gate
    assert math.isnan(meter.integrated)
    meter.feed(np.full(200, 0.01))  # -20.7 LUFS
    meter.feed(np.zeros(100))
    # 400 ms of exact zeros after loud audio reads as digital silence, not as cumulative-sum residue.
    assert meter.momentary == -200.0
    fed = np.concatenate([np.zeros(200), np.full(200, 1e-9), np.full(200, 0.01), np.zeros(100)])
    assert meter.integrated == pytest.approx(_reference_integrated(fed), abs=1e-6)
    assert meter.max_momentary == pytest.approx(-20.691, abs=1e-6)
    meter.feed(np.array([np.nan, np.inf, -1.0] + [0.0] * 17))  # garbage reads as silence
    assert meter.integrated == pytest.approx(
        _reference_integrated(np.concatenate([fed, np.zeros(20)])), abs=1e-6
    )


def test_meter_memory_is_bounded_and_reset_forgets() -> None:
    meter = LoudnessMeter()
    for _ in range(50):
        meter.feed(np.full(400, 1e-3))
    assert meter._tail.size == 599
    assert meter._i_hist.count.size == meter._lra_hist.count.size == HIST_BINS
    assert meter.time_s == pytest.approx(100.0)
    meter.reset()
    assert meter.windows_fed == 0 and math.isnan(meter.integrated) and math.isnan(meter.momentary)
    block = meter.feed(torch.full((20,), 1e-3))
    assert block.first_window == 0 and np.isnan(block.momentary).all()


# --- peer agreement with FFmpeg -----------------------------------------------------------------------------


def _write_wav(path: Path, samples: np.ndarray) -> np.ndarray:
    """Write (C, T) samples as 16-bit PCM; return exactly what FFmpeg will decode (s16 / 32768)."""
    q = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(q.shape[0])
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(q.T.tobytes())
    return q.astype(np.float64) / 32768.0


def _ffmpeg_ebur128(path: Path, tmp: Path, peak: bool) -> dict[str, object]:
    meta = tmp / "r128.txt"
    # metadata=1 makes FFmpeg measure in 100 ms frames and report to 3 decimals; framelog=info keeps the
    # usual per-step log lines.
    options = "metadata=1:framelog=info" + (":peak=true" if peak else "")
    proc = subprocess.run(
        [
            "ffmpeg", "-nostats", "-hide_banner", "-i", str(path),
            "-af", f"ebur128={options},ametadata=mode=print:file={meta}",
            "-f", "null", "-",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    err = proc.stderr
    summary = err[err.rindex("Summary:") :]
    # Per-100 ms log lines: t is the time of the last sample of the 100 ms step.
    log_s = {round(float(t) * 10): float(s) for t, s in re.findall(r"t:\s*([\d.]+)\s.*?S:\s*(-?[\d.]+)", err)}
    frames = meta.read_text().split("frame:")[1:]
    meta_values = [dict(re.findall(r"lavfi\.r128\.([\w.]+)=(-?[\d.]+)", f)) for f in frames]
    peak_m = re.search(r"True peak:\s*\n\s*Peak:\s*(-?[\d.]+|-inf) dBFS", summary)
    return {
        "TP": float(peak_m.group(1)) if peak_m else None,
        "I": float(re.search(r"I:\s*(-?[\d.]+) LUFS", summary).group(1)),
        "LRA": float(re.search(r"LRA:\s*(-?[\d.]+) LU", summary).group(1)),
        "log_S": log_s,
        # Block k (1-based) of the metadata ends at k * 100 ms; values to 3 decimals.
        "S": np.array([float(v["S"]) for v in meta_values]),
        "I3": float(meta_values[-1]["I"]),
        "LRA3": float(meta_values[-1]["LRA"]),
    }


def _band_limited_noise(
    rng: np.random.Generator, channels: int, seconds: float, lo: float, hi: float
) -> np.ndarray:
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal((channels, n)), axis=-1)
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spec[:, (freqs < lo) | (freqs > hi)] = 0
    sig = np.fft.irfft(spec, n, axis=-1)
    return sig / np.sqrt(np.mean(sig**2))  # unit RMS


def _compare_with_ffmpeg(
    samples: np.ndarray, tmp_path: Path, peak: bool = True
) -> tuple[LoudnessMeter, dict[str, object]]:
    wav = tmp_path / "signal.wav"
    decoded = _write_wav(wav, samples)
    ff = _ffmpeg_ebur128(wav, tmp_path, peak)
    meter, _, short_term = _measure(decoded, chunked=True)

    print(f"integrated ours {meter.integrated:.3f} ffmpeg {ff['I3']:.3f} (summary {ff['I']})")
    print(f"LRA ours {meter.loudness_range:.2f} ffmpeg {ff['LRA3']:.2f} (summary {ff['LRA']})")
    assert abs(meter.integrated - ff["I"]) < 0.2
    assert abs(meter.integrated - ff["I3"]) < 0.05
    assert abs(meter.loudness_range - ff["LRA"]) < 0.5
    assert abs(meter.loudness_range - ff["LRA3"]) < 0.1

    # Short-term at every 100 ms step once 3 s are in, where FFmpeg is not reading silence (it floors at
    # -120.7 where we floor at -200).
    ffs = ff["S"]
    steps = np.arange(1, ffs.size + 1)
    ours = short_term[steps * 20 - 1]
    valid = (steps >= 30) & (ffs > -100)
    assert valid.sum() > 50
    assert np.abs(ours[valid] - ffs[valid]).max() < 0.02
    # The human-readable log lines, to their one decimal.
    log_s = ff["log_S"]
    for k in range(30, ffs.size + 1, 37):
        if log_s[k] > -100:
            assert abs(short_term[k * 20 - 1] - log_s[k]) < 0.1
    return meter, ff


@pytest.mark.ffmpeg
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
def test_ffmpeg_agreement_band_limited_noise_with_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    noise = _band_limited_noise(rng, 2, 24.0, 200.0, 6000.0)
    gain = np.concatenate([np.full(8 * RATE, 0.03), np.full(10 * RATE, 0.12), np.full(6 * RATE, 0.01)])
    noise *= gain
    noise[1] *= 0.7  # unbalanced channels
    meter, _ = _compare_with_ffmpeg(noise, tmp_path)
    assert meter.loudness_range > 5.0  # the step is in the range


@pytest.mark.ffmpeg
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
def test_ffmpeg_agreement_multitone_with_gaps_5_1(tmp_path: Path) -> None:
    # Six channels without a layout: FFmpeg and channel_weights(6, None) both take it as 5.1, so the loud
    # LFE tone must be ignored and the back channels weighted 1.41.
    seconds = 20.0
    n = round(seconds * RATE)
    front = _tone(440, seconds, 0.05) + _tone(1000, seconds, 0.03) + _tone(3150, seconds, 0.02)
    sig = np.stack(
        [
            front,
            0.8 * front,
            _tone(200, seconds, 0.04),
            _tone(60, seconds, 0.5),  # LFE
            _tone(2000, seconds, 0.03),
            _tone(5000, seconds, 0.02),
        ]
    )
    envelope = np.ones(n)
    for start in (3.0, 8.5, 13.0):  # gaps of digital silence
        envelope[round(start * RATE) : round((start + 1.7) * RATE)] = 0.0
    envelope[round(16.0 * RATE) :] = _dbfs(-12)  # a quieter ending
    # No true-peak pass here: it does not change loudness and costs seconds on six channels.
    _compare_with_ffmpeg(sig * envelope, tmp_path, peak=False)


# -- real audio and the standards' profiles, end to end ---------------------------------------------------


def _real_audio(name: str) -> np.ndarray:
    from detect_media import samples_dir
    from media import decoded_audio

    path = samples_dir() / name
    if not path.exists():
        pytest.skip(f"{name} not fetched (tests/fetch_samples.sh)")
    return decoded_audio(path)[0].astype(np.float64)


def _kivy_beat() -> np.ndarray:
    from test_audio_faults import _beat

    return _beat().astype(np.float64)


REAL_AUDIO = {
    "Megamind.avi": lambda: _real_audio("Megamind.avi"),
    "cup.mp4": lambda: _real_audio("cup.mp4"),
    "box.mp4": lambda: _real_audio("box.mp4"),  # MP3 at 44.1 kHz, resampled to 48 kHz
    "kivy-beat": _kivy_beat,
}


@pytest.mark.ffmpeg
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
@pytest.mark.parametrize("name", list(REAL_AUDIO))
def test_ffmpeg_agreement_on_real_audio(name: str, tmp_path: Path) -> None:
    """Integrated (0.05 LU against FFmpeg's 3-decimal value, 0.1 against its summary), short-term at every
    100 ms step (0.02 LU), loudness range, and, through `framewatch check`, the true peak (0.2 dB against
    the summary, which FFmpeg prints to 0.1 dB)."""
    from media import check_json

    x = REAL_AUDIO[name]()
    if x.shape[1] < 8 * RATE:
        x = np.concatenate([x, x], axis=1)  # short-term needs some seconds past the first 3
    x = x[:, : x.shape[1] // AUDIO_CHUNK * AUDIO_CHUNK]  # whole 100 ms chunks for the kernel-level meter
    meter, ff = _compare_with_ffmpeg(x, tmp_path)
    assert abs(meter.integrated - ff["I"]) <= 0.1
    report = check_json(tmp_path / "signal.wav")
    audio = report["audio"]
    print(f"{name}: true peak framewatch {audio['true_peak_max_dbtp']} dBTP, FFmpeg {ff['TP']}; "
          f"integrated {audio['integrated_lufs']} vs {ff['I']}")
    assert abs(audio["true_peak_max_dbtp"] - ff["TP"]) <= 0.2
    assert abs(audio["integrated_lufs"] - ff["I"]) <= 0.1


@pytest.mark.ffmpeg
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
@pytest.mark.parametrize("dbfs", [-23.0, -33.0, -6.0])
def test_ebu_test_tone_reads_its_level(dbfs: float, tmp_path: Path) -> None:
    """EBU Tech 3341 cases 1 and 2 style: a 1 kHz stereo sine at X dBFS reads X LUFS (within 0.1 LU, as
    FFmpeg does), and its true peak is its amplitude (+3.01 dB over the RMS-referenced level)."""
    tone = _tone(1000, 20, _dbfs(dbfs) * math.sqrt(2) / math.sqrt(2))
    meter, ff = _compare_with_ffmpeg(np.stack([tone, tone]), tmp_path)
    assert abs(meter.integrated - dbfs) <= 0.1 and abs(ff["I"] - dbfs) <= 0.1
    assert abs(ff["TP"] - dbfs) <= 0.2


def test_standard_profiles_judge_the_programme(tmp_path: Path) -> None:
    """-25.5 LUFS programme with a -1.5 dBTP peak: inside ATSC A/85 (-24 +-2, -2 dBTP fails) ... the reports
    say which target, tolerance and ceiling they judged against."""
    from media import check_json, write_clip

    rng = np.random.default_rng(9)
    n = 12 * RATE
    noise = rng.standard_normal((2, n))
    x = noise / np.sqrt((noise**2).mean())
    y, _ = k_weight(torch.from_numpy(x.astype(np.float32))[None])
    level = float(power_to_lufs(weighted_power(window_mean_square(y), channel_weights(2)).mean(-1))[0])
    x *= 10 ** ((-25.5 - level) / 20)
    x = np.clip(x, -0.6, 0.6)  # peaks near -4.4 dBFS
    path = write_clip(tmp_path / "prog.wav", audio_fn=lambda a, b: x[:, a:b].astype(np.float32), seconds=12)
    config = tmp_path / "profiles.yaml"
    config.write_text(
        "profiles:\n"
        "  us:\n    detectors:\n      loudness: {standard: atsc_a85}\n      true_peak: {standard: atsc_a85}\n"
        "  eu:\n    detectors:\n      loudness: {standard: ebu_r128}\n"
    )
    us = check_json(path, "--config", config, "--profile", "us")["audio"]
    eu = check_json(path, "--config", config, "--profile", "eu")["audio"]
    assert us["integrated_lufs"] == pytest.approx(-25.5, abs=0.15)
    assert us["compliance"]["standard"] == "atsc_a85" and us["compliance"]["target_lufs"] == -24.0
    assert us["compliance"]["integrated_ok"] is True and us["compliance"]["compliant"] is True
    assert eu["compliance"]["target_lufs"] == -23.0 and eu["compliance"]["integrated_ok"] is False
    assert eu["compliance"]["true_peak_ok"] is True and eu["compliance"]["compliant"] is False
