"""True peak: analytic inter-sample peaks, chunking and batching, and agreement with FFmpeg's ebur128."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from media import decoded_audio

from kernels.true_peak import LOOKAHEAD, STATE_LEN, to_dbtp, true_peak

RATE = 48_000
W = 240
CHUNK = 4800  # 100 ms, the engine's chunk and FFmpeg's ebur128 frame
SAMPLES = Path.home() / ".cache" / "framewatch" / "samples"

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")


def _db(v: float | np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(v, 1e-30))


def _peaks(x: np.ndarray | torch.Tensor, chunk: int = CHUNK) -> np.ndarray:
    """Windows of (C, T) or (N, C, T) samples fed `chunk` samples at a time, as the engine does."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    squeeze = x.dim() == 2
    if squeeze:
        x = x[None]
    state = None
    out = []
    for i in range(0, x.shape[-1], chunk):
        p, state = true_peak(x[..., i : i + chunk], state)
        out.append(p)
    p = torch.cat(out, -1).numpy()
    return p[0] if squeeze else p


def _interior(p: np.ndarray) -> np.ndarray:
    """Per-channel max over the windows away from the ends, where a stationary signal is steady."""
    return p[..., 2:-2].max(-1)


# --- Analytic inter-sample peaks (EBU Tech 3341 style) ---------------------------------------------------


def _sine(freq: float, amplitude: float, phase: float = 0.0, seconds: float = 1.0) -> np.ndarray:
    n = np.arange(round(seconds * RATE))
    return (amplitude * np.sin(2 * np.pi * freq * n / RATE + phase))[None]


def test_fs4_sine_at_45_degrees_reads_3db_over_its_sample_peak() -> None:
    # 12 kHz at 45 degrees: every sample sits at +-A/sqrt(2), the crests fall halfway between samples.
    amplitude = math.sqrt(2) * 10 ** (-6 / 20)
    x = _sine(12_000, amplitude, math.pi / 4)
    assert _db(np.abs(x).max()) == pytest.approx(-6.0, abs=1e-4)
    tp = to_dbtp(torch.from_numpy(_interior(_peaks(x)))).item()
    assert tp == pytest.approx(-6.0 + 10 * math.log10(2), abs=0.01)  # -2.99 dBTP


def test_full_scale_fs4_square_is_an_inter_sample_over() -> None:
    # Samples +1, +1, -1, -1 never exceed full scale but the band-limited wave reaches sqrt(2): +3 dBTP.
    x = np.tile([1.0, 1.0, -1.0, -1.0], RATE // 4)[None]
    assert to_dbtp(torch.tensor(_interior(_peaks(x)))).item() == pytest.approx(3.0103, abs=0.01)


def test_fs6_sine_crest_between_samples() -> None:
    # 8 kHz from phase 0: samples at 0, 60, 120 ... degrees peak at sin(60) = 0.866 A; the crest at 90
    # degrees lies at n + 1/2, an oversampled point.
    x = _sine(8000, 0.9)
    assert np.abs(x).max() == pytest.approx(0.9 * math.sin(math.pi / 3), rel=1e-6)
    assert _interior(_peaks(x)).item() == pytest.approx(0.9, rel=1e-3)


@pytest.mark.parametrize("level_db", [-1.0, -20.0, -60.0])
def test_1khz_sine_reads_its_amplitude(level_db: float) -> None:
    x = _sine(997, 10 ** (level_db / 20), phase=0.3)
    tp = to_dbtp(torch.from_numpy(_peaks(x).max(-1))).item()
    assert tp == pytest.approx(level_db, abs=0.05)


def test_silence_reads_the_floor_and_dc_its_level() -> None:
    x = np.zeros((2, 4 * CHUNK), np.float32)
    x[1] = 0.5  # DC
    p = _peaks(x)
    assert (p[0] == 0).all()
    assert to_dbtp(torch.from_numpy(p[0])).eq(-150.0).all()
    assert to_dbtp(torch.tensor(0.0), floor_db=-90.0).item() == -90.0
    # The step from silence rings (Gibbs) in the first window; after it DC reads its own level.
    assert p[1, 0] > 0.53
    np.testing.assert_allclose(p[1, 1:], 0.5, rtol=1e-4)


def test_window_assignment_is_16_samples_late() -> None:
    x = np.zeros((1, 2 * CHUNK), np.float32)
    # The last sample whose value window 5 holds, and the first one window 13 holds.
    for s in (6 * W - LOOKAHEAD - 1, 13 * W - LOOKAHEAD):
        x[0, s] = 0.8
        p = _peaks(x)[0]
        assert p.argmax() == (s + LOOKAHEAD) // W
        assert p.max() == pytest.approx(0.8)
        x[0, s] = 0.0


def test_nan_is_reported_not_hidden() -> None:
    # A NaN sample poisons the oversampled values that read it (input times within -16..+15 of it), including
    # those the next chunk's first window holds, as a corrupt stream should.
    x = torch.zeros(1, 1, CHUNK)
    x[0, 0, CHUNK - 10] = float("nan")
    p, state = true_peak(x)
    assert p[0, 0, :-1].eq(0).all() and p[0, 0, -1].isnan()
    p, _ = true_peak(torch.zeros(1, 1, 2 * W), state)
    assert p[0, 0, 0].isnan() and p[0, 0, 1] == 0


def test_rejects_bad_shapes_and_passes_empty_chunks() -> None:
    for bad in (torch.zeros(1, 250), torch.zeros(1, 1, 250)):
        with pytest.raises(ValueError):
            true_peak(bad)
    state = torch.rand(2, 1, STATE_LEN)
    p, st = true_peak(torch.zeros(2, 1, 0), state)
    assert p.shape == (2, 1, 0) and torch.equal(st, state)


# --- Streaming and batching ------------------------------------------------------------------------------


def _batch(seed: int = 0) -> torch.Tensor:
    """(3, 2, 10 * CHUNK): a different signal in every stream and channel."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(10 * CHUNK) / RATE
    x = torch.randn(3, 2, 10 * CHUNK, generator=g) * torch.tensor([0.05, 0.2, 0.4]).view(3, 1, 1)
    x[0, 1] = 0.7 * torch.sin(2 * math.pi * 12_000 * t + math.pi / 4)
    x[1, 0] = torch.sign(torch.sin(2 * math.pi * 3000 * t)) * 0.9
    x[2, 1, 2 * CHUNK : 3 * CHUNK] = 0.0
    return x


def test_chunked_equals_whole_for_any_chunking() -> None:
    x = _batch()
    whole, state = true_peak(x)
    for sizes in ([CHUNK] * 10, [W, W, 3 * W, CHUNK - 5 * W, 7 * CHUNK, 2 * CHUNK]):
        st = None
        parts = []
        i = 0
        for size in sizes:
            p, st = true_peak(x[..., i : i + size], st)
            parts.append(p)
            i += size
        assert i == x.shape[-1]
        assert (torch.cat(parts, -1) - whole).abs().max().item() < 1e-7
        assert torch.equal(st, state)
    assert state.shape == (3, 2, STATE_LEN) and torch.equal(state, x[..., -STATE_LEN:])


def test_streams_and_channels_are_independent() -> None:
    x = _batch(1)
    together, _ = true_peak(x)
    assert together.shape == (3, 2, 10 * CHUNK // W)
    for n in range(3):
        for c in range(2):
            alone, _ = true_peak(x[n : n + 1, c : c + 1])
            assert torch.equal(alone[0, 0], together[n, c])


def test_none_state_is_silence() -> None:
    x = _batch(2)[..., :CHUNK]
    a, _ = true_peak(x)
    b, _ = true_peak(x, torch.zeros(3, 2, STATE_LEN))
    assert torch.equal(a, b)
    # A stream that resumes after real history differs in its first window only.
    c, _ = true_peak(x, torch.full((3, 2, STATE_LEN), 0.9))
    assert torch.equal(a[..., 1:], c[..., 1:]) and not torch.equal(a[..., 0], c[..., 0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _batch(3)
    cpu, cpu_state = true_peak(x)
    gpu_state = None
    parts = []
    for i in range(0, x.shape[-1], CHUNK):
        gpu, gpu_state = true_peak(x[..., i : i + CHUNK].cuda(), gpu_state)
        parts.append(gpu)
    gpu = torch.cat(parts, -1)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-9)
    assert torch.equal(gpu_state.cpu(), cpu_state)


# --- Agreement with FFmpeg ---------------------------------------------------------------------------------

# FFmpeg prints true peaks in dB to one decimal (FTPK log lines, the summary) and linear to three (metadata).
PRINT_DB = 0.05
PRINT_LIN = 0.0005


@dataclass
class FFmpegPeaks:
    frame_db: np.ndarray  # (K, C): FTPK of each full 100 ms frame, dBFS to 0.1
    running: np.ndarray  # (K, C): lavfi.r128.true_peaks_chN, linear to 0.001 (the max so far in 5.1)
    summary_db: float  # "True peak: Peak:", all channels, dBFS to 0.1
    oversampled: np.ndarray  # (C, 4T): libswresample's 192 kHz signal, the values ebur128 takes |max| of


def _ffmpeg_true_peak(x: np.ndarray, tmp: Path) -> FFmpegPeaks:
    """FFmpeg's ebur128 true peaks for (C, T) float32 samples, given as raw float32 so it reads them exactly."""
    raw = tmp / "in.f32"
    raw.write_bytes(np.ascontiguousarray(x.T, dtype="<f4").tobytes())
    src = ["-f", "f32le", "-ar", str(RATE), "-ac", str(x.shape[0]), "-i", str(raw)]
    meta = tmp / "meta.txt"
    proc = subprocess.run(
        ["ffmpeg", "-nostats", "-hide_banner", *src,
         "-af", f"ebur128=peak=true:metadata=1:framelog=info,ametadata=mode=print:file={meta}",
         "-f", "null", "-"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    err = proc.stderr
    frame_db = [
        [float(v) for v in s.split()] for s in re.findall(r"FTPK:((?:\s+(?:-?[\d.]+|-inf))+) dBFS", err)
    ]
    frames = meta.read_text().split("frame:")[1:]
    running = [[float(v) for v in re.findall(r"true_peaks_ch\d+=([\d.]+)", f)] for f in frames]
    summary = re.search(r"True peak:\s*Peak:\s*(-?[\d.]+|-inf) dBFS", err[err.rindex("Summary:") :])
    # The same resampler as ebur128's: libswresample with its defaults, double in and out.
    over = subprocess.run(
        ["ffmpeg", "-v", "error", *src, "-af", "aformat=sample_fmts=dbl,aresample=192000", "-f", "f64le", "-"],
        capture_output=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return FFmpegPeaks(
        np.array(frame_db).reshape(-1, x.shape[0]),
        np.array(running).reshape(-1, x.shape[0]),
        float(summary.group(1)),
        np.frombuffer(over, "<f8").reshape(-1, x.shape[0]).T,
    )


def _compare_with_ffmpeg(x: np.ndarray, tmp: Path, label: str) -> dict[str, float]:
    """Run (C, T) samples through true_peak (100 ms chunks) and FFmpeg; assert and return the differences."""
    c, t = x.shape
    assert t % W == 0
    ours = _peaks(x)  # (C, W)
    ff = _ffmpeg_true_peak(x, tmp)

    # The file's true peak, against the summary line and against the max of the full-precision oversampled
    # signal over the span ebur128 covers (it never flushes its resampler: the last 16 samples are out).
    ours_max = _db(ours.max())
    ref = np.abs(ff.oversampled[:, : 4 * (t - LOOKAHEAD)])
    diff = {"summary": abs(ours_max - ff.summary_db), "file_max": abs(ours_max - _db(ref.max()))}

    # Our windows against the same spans of FFmpeg's oversampled signal: window w holds the values at
    # times [240 w - 16, 240 w + 224), 4 per sample. Window 0 also holds the 16 samples before the
    # stream, which FFmpeg has no values for, so it is left out.
    ref_w = ref[:, 4 * (W - LOOKAHEAD) :].reshape(c, -1, 4 * W).max(-1)
    ours_w = ours[:, 1:]
    audible = ref_w > 1e-5
    diff["window"] = np.abs(_db(ours_w) - _db(ref_w))[audible].max()

    # FFmpeg's 100 ms frames group the oversampled values exactly as 20 of our windows do.
    # Clips shorter than 100 ms have no full frame, only the summary.
    k = ff.frame_db.shape[0]
    ours_f = ours[:, : 20 * k].reshape(c, k, 20).max(-1).T  # (K, C)
    shown = ff.frame_db > -100
    diff["frame"] = np.abs(_db(ours_f) - ff.frame_db)[shown].max(initial=0.0)
    diff["running_lin"] = np.abs(np.maximum.accumulate(ours_f, 0) - ff.running).max(initial=0.0)

    print(
        f"{label}: true peak {ours_max:.4f} dBTP, ffmpeg summary {ff.summary_db:.1f}, "
        f"oversampled max {_db(ref.max()):.4f}; |diff| file max {diff['file_max']:.2e} dB, "
        f"per 5 ms window {diff['window']:.2e} dB, per 100 ms frame (vs 0.1 dB print) {diff['frame']:.3f} dB, "
        f"running metadata {diff['running_lin']:.1e} linear"
    )
    assert diff["summary"] <= PRINT_DB + 1e-3
    assert diff["file_max"] < 1e-3
    assert diff["window"] < 1e-3
    assert diff["frame"] <= PRINT_DB + 1e-3
    assert diff["running_lin"] <= PRINT_LIN + 1e-6
    return diff


def _fade_in(x: np.ndarray, n: int = 480) -> np.ndarray:
    # FFmpeg mirrors the first samples where a stream starting from silence has zeros: a fade makes the
    # start of a synthetic signal the same for both.
    x = x.copy()
    x[:, :n] *= np.linspace(0, 1, n)
    return x


def _band_limited_noise(
    rng: np.random.Generator, channels: int, seconds: float, lo: float, hi: float
) -> np.ndarray:
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal((channels, n)), axis=-1)
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spec[:, (freqs < lo) | (freqs > hi)] = 0
    sig = np.fft.irfft(spec, n, axis=-1)
    return sig / np.sqrt(np.mean(sig**2, axis=-1, keepdims=True))


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_ffmpeg_band_limited_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    x = _band_limited_noise(rng, 2, 6.0, 100.0, 20_000.0)
    gain = np.repeat([0.05, 0.25, 0.01, 0.2, 0.002, 0.15], RATE)
    x = _fade_in(x * gain * np.array([[1.0], [0.6]]))
    _compare_with_ffmpeg(x.astype(np.float32), tmp_path, "band-limited noise")


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_ffmpeg_clipped_signal(tmp_path: Path) -> None:
    # Loud music-like content hard-clipped at -0.5 dBFS: flat tops with sharp corners, many inter-sample overs.
    rng = np.random.default_rng(21)
    t = np.arange(5 * RATE) / RATE
    x = 3.0 * (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 3310 * t))
    x = np.stack([x, 0.4 * x]) + 0.3 * _band_limited_noise(rng, 2, 5.0, 50.0, 16_000.0)
    lim = 10 ** (-0.5 / 20)
    x = _fade_in(np.clip(x, -lim, lim))
    _compare_with_ffmpeg(x.astype(np.float32), tmp_path, "clipped")
    tp = _peaks(x.astype(np.float32)).max(-1)
    assert (_db(tp) > 0.0).all()  # overs above full scale although no sample reaches -0.5 dBFS


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_ffmpeg_sine_sweep(tmp_path: Path) -> None:
    # A log sweep 20 Hz -> 22 kHz at -1 dBFS: near 22 kHz the 4x points miss the crests (and the interpolator
    # rolls off above 20 kHz), which FFmpeg's meter does alike.
    t = np.arange(8 * RATE) / RATE
    f0, f1, dur = 20.0, 22_000.0, 8.0
    k = math.log(f1 / f0)
    phase = 2 * np.pi * f0 * dur / k * (np.exp(t / dur * k) - 1)
    x = _fade_in(10 ** (-1 / 20) * np.stack([np.sin(phase), np.cos(phase)]))
    _compare_with_ffmpeg(x.astype(np.float32), tmp_path, "sine sweep")


def _sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} missing (run tests/fetch_samples.sh)")
    return path


@pytest.mark.ffmpeg
@pytest.mark.samples
@needs_ffmpeg
@pytest.mark.parametrize("name", ["Megamind.avi", "cup.mp4"])
def test_ffmpeg_real_media(name: str, tmp_path: Path) -> None:
    x, _ = decoded_audio(_sample(name))
    x = x[:, : x.shape[1] // W * W]
    _compare_with_ffmpeg(x, tmp_path, name)


KIVY = ["12908_sweet_trip_mm_clap_hi", "12913_sweet_trip_mm_kick_hi", "12916_sweet_trip_mm_kwik_mod_01",
        "12923_sweet_trip_mm_metal_clave", "12925_sweet_trip_mm_sweep_x"]  # fmt: skip


@pytest.mark.ffmpeg
@pytest.mark.samples
@needs_ffmpeg
@pytest.mark.parametrize("name", KIVY)
def test_ffmpeg_real_44k1_wav(name: str, tmp_path: Path) -> None:
    src = _sample(f"kivy-audio/{name}.wav")
    wav = tmp_path / "48k.wav"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(src), "-ar", str(RATE), "-c:a", "pcm_f32le", str(wav)],
        check=True, timeout=60,
    )  # fmt: skip
    x, _ = decoded_audio(wav)
    x = x[:, : x.shape[1] // W * W]
    _compare_with_ffmpeg(x, tmp_path, name)


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_ffmpeg_frames_split_where_our_windows_do(tmp_path: Path) -> None:
    # Clicks on either side of each 100 ms boundary, 16 samples late: a click read in the wrong frame would
    # leave that frame with only the filter's ringing around it (about 1 dB lower).
    x = np.zeros((1, 10 * CHUNK), np.float32)
    for k in range(1, 10):
        x[0, k * CHUNK - LOOKAHEAD - (k % 2)] = 0.2 + 0.05 * k
    diff = _compare_with_ffmpeg(x, tmp_path, "clicks at frame boundaries")
    assert diff["frame"] < 0.05
