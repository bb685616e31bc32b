"""Audio fault detectors on real audio: each fault injected at a known sample into real programme audio
(Megamind.avi's soundtrack, a beat mixed from the kivy drum samples) and into generated programme-like
audio, found with start and end within 10 ms, and nothing raised on the clean audio.

Real audio comes from the Debian sample media (tests/fetch_samples.sh); those cases skip without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from detect_media import AUDIO_TOL, EngineRun, detector_configs, run_engine, samples_dir
from media import decoded_audio, write_clip

RATE = 48_000
FAULT_TYPES = ("dropout", "channel_silence", "missing_channel", "phase", "dc_offset", "clicks", "silence",
               "clipping", "true_peak")


def _generated() -> np.ndarray:
    """Ten seconds of stereo programme-like audio: band-limited noise with a syllable-rate envelope and a
    tone bed, partly correlated channels, peaks well under -1 dBFS."""
    rng = np.random.default_rng(7)
    n = 10 * RATE
    spec = np.fft.rfft(rng.standard_normal((2, n)), axis=-1)
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[:, (f < 80) | (f > 8000)] = 0
    spec /= np.maximum(f, 80) ** 0.5  # pinkish
    noise = np.fft.irfft(spec, n, axis=-1)
    noise /= np.abs(noise).max()
    t = np.arange(n) / RATE
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t) ** 2
    common = noise[0] * env
    bed = 0.1 * np.sin(2 * np.pi * 220 * t)
    x = np.stack([0.25 * (common + 0.3 * noise[1]) + bed, 0.25 * (common - 0.2 * noise[1]) + bed])
    return x.astype(np.float32)


def _megamind() -> np.ndarray:
    path = samples_dir() / "Megamind.avi"
    if not path.exists():
        pytest.skip("Megamind.avi not fetched (tests/fetch_samples.sh)")
    x, _ = decoded_audio(path)
    return x


def _beat() -> np.ndarray:
    """A one-bar-per-second drum loop from the kivy samples over their sweeps, as a sampler would play it."""
    folder = samples_dir() / "kivy-audio"
    files = sorted(folder.glob("*.wav")) if folder.exists() else []
    if not files:
        pytest.skip("kivy audio samples not fetched (tests/fetch_samples.sh)")
    sounds = {f.stem.split("mm_")[-1]: decoded_audio(f)[0][0] for f in files}
    n = 10 * RATE
    mix = np.zeros(n, np.float64)
    hits = ["kick_lo", "hat_cl", "clap_mid", "hat_cl", "kick_hi", "hat_cl", "clap_hi", "metal_clave"]
    for i, start in enumerate(range(0, n, RATE // 8)):
        s = sounds[hits[i % len(hits)]]
        end = min(n, start + len(s))
        mix[start:end] += 0.3 * s[: end - start]
    sweeps = [sounds[k] for k in ("sweep_x", "sweep_y", "sweep_z")]
    for i, start in enumerate(range(0, n, RATE // 10)):  # a continuous pad under the hits
        s = sweeps[i % 3]
        end = min(n, start + len(s))
        mix[start:end] += 0.08 * s[: end - start] * np.hanning(len(s))[: end - start]
    right = 0.7 * mix + 0.3 * np.roll(mix, 96)  # a little width
    return np.stack([mix, right]).astype(np.float32)


SOURCES: dict[str, Callable[[], np.ndarray]] = {"generated": _generated, "megamind": _megamind, "beat": _beat}


def _run(x: np.ndarray, tmp: Path, name: str, **overrides: dict) -> EngineRun:
    path = write_clip(tmp / f"{name}.wav", audio_fn=lambda a, b: x[:, a:b], seconds=x.shape[1] / RATE,
                      channels=x.shape[0])
    # 16-bit PCM: the engine sees x rounded to 1/32768, which is what every expectation here allows for.
    return run_engine(str(path), detector_configs(**overrides))


def _faults(run: EngineRun) -> list:
    return [e for e in run.events if e.type in FAULT_TYPES]


def _programme_at(x: np.ndarray, after: float, before: float = 0.1, level_db: float = -35.0) -> float:
    """The first 5 ms boundary after `after` seconds where the last `before` seconds were loud programme."""
    w = 240
    n = x.shape[1] // w * w
    p = (x[:, :n].reshape(x.shape[0], -1, w) ** 2).mean(-1).max(0)
    k = round(before * RATE / w)
    for i in range(round(after * RATE / w), p.size):
        if i >= k and 10 * np.log10(p[i - k : i].mean()) > level_db and 10 * np.log10(p[i - 1]) > level_db - 10:
            return i * w / RATE
    raise AssertionError("no loud programme to cut")


def _splice(x: np.ndarray, ch: int, a: int, b: int, new: np.ndarray) -> None:
    """Replace x[ch, a:b] by `new` with 2 ms crossfades at both ends, as a mixer or router switches: a hard
    cut between unrelated signals is itself a click (the clicks detector would rightly report it)."""
    fade = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, 96))
    mix = np.ones(b - a)
    mix[:96], mix[-96:] = fade, fade[::-1]
    x[ch, a:b] = (1 - mix) * x[ch, a:b] + mix * new


def _assert_one(run: EngineRun, kind: str, start: float, end: float, tol: float = AUDIO_TOL) -> None:
    faults = _faults(run)
    assert [e.type for e in faults] == [kind], run.table()
    e = faults[0]
    assert abs(e.start - start) <= tol and abs(e.end - end) <= tol, (e.start, e.end, start, end)


@pytest.fixture(scope="module", params=list(SOURCES))
def programme(request: pytest.FixtureRequest) -> tuple[str, np.ndarray]:
    return request.param, SOURCES[request.param]()


def test_clean_audio_raises_nothing(programme, tmp_path: Path) -> None:
    name, x = programme
    run = _run(x, tmp_path, name)
    assert not _faults(run), run.table()


def test_dropout(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    t0 = _programme_at(x, 3.0) + 0.0021  # off the 5 ms grid
    a, b = round(t0 * RATE), round((t0 + 0.05) * RATE)
    x[:, a:b] = 0.0
    _assert_one(_run(x, tmp_path, name), "dropout", a / RATE, b / RATE)


def test_short_gap_is_not_a_dropout(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    t0 = _programme_at(x, 3.0)
    x[:, round(t0 * RATE) : round((t0 + 0.01) * RATE)] = 0.0  # 10 ms: under the 20 ms minimum
    assert not [e for e in _faults(_run(x, tmp_path, name)) if e.type == "dropout"]


@pytest.mark.parametrize("kind", ["channel_silence", "missing_channel"])
def test_dead_right_channel(programme, kind: str, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    a, b = round(3.0025 * RATE), round(6.5 * RATE)
    rng = np.random.default_rng(1)
    # A silent channel still hisses (-75 dBFS); a missing one is exact digital zero.
    hiss = 10 ** (-75 / 20) * rng.standard_normal(b - a) if kind == "channel_silence" else np.zeros(b - a)
    _splice(x, 1, a, b, hiss)
    run = _run(x, tmp_path, name)
    _assert_one(run, kind, a / RATE, b / RATE)
    assert _faults(run)[0].details["channel"] == "FR"


def test_missing_channels_by_count(tmp_path: Path) -> None:
    x = _generated()
    run = _run(x, tmp_path, "count", missing_channel={"channels": 6})
    faults = _faults(run)
    assert [e.type for e in faults] == ["missing_channel"], run.table()
    assert faults[0].value == 2 and faults[0].start == 0.0 and abs(faults[0].end - 10.0) < AUDIO_TOL


def test_phase_inversion(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    # Both edges where there is sound: inside a near-silent stretch no one can tell where the flip was.
    a, b = round((_programme_at(x, 3.0) + 0.0025) * RATE), round(_programme_at(x, 7.0) * RATE)
    _splice(x, 1, a, b, -x[1, a:b])
    run = _run(x, tmp_path, name)
    _assert_one(run, "phase", a / RATE, b / RATE)
    assert run.events[-1].value < -0.5


def test_dc_offset(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    a, b = round(3.0025 * RATE), round(7.0 * RATE)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, 96))  # 2 ms: a converter drifting, not a click
    dc = np.zeros(x.shape[1], np.float32)
    dc[a:b] = 0.03
    dc[a : a + 96] *= ramp
    dc[b - 96 : b] *= ramp[::-1]
    x[0] += dc
    run = _run(x, tmp_path, name)
    _assert_one(run, "dc_offset", a / RATE, b / RATE)


def test_clipping_carries_true_peak(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    a, b = round(4.0 * RATE), round(5.0 * RATE)
    x[:, a:b] = np.clip(x[:, a:b] * 300.0, -0.999, 0.999)
    run = _run(x, tmp_path, name)
    clips = [e for e in run.events if e.type == "clipping"]
    assert len(clips) == 1, run.table()
    assert clips[0].details["true_peak_dbtp"] > -0.1
    # A 50 dB jump in level is a step the click detector hears too, where it happens.
    assert {e.type for e in _faults(run)} <= {"clipping", "true_peak", "loudness", "clicks"}


def _quiet_slope_at(x: np.ndarray, near: float, amplitude: float) -> int:
    """A sample near `near` seconds where a click of `amplitude` can be heard: 16 times the RMS of the
    signal's sample-to-sample slope over the surrounding 10 ms (inside a drum hit a click is masked)."""
    slope = np.abs(np.diff(x, axis=1)).max(0)
    for k in range(round(near * RATE), x.shape[1] - RATE, 48):
        seg = slope[k - 240 : k + 240]
        if np.sqrt((seg**2).mean()) * 16 < amplitude:
            return k
    raise AssertionError("no place to hear a click")


def test_clicks_on_their_sample(programme, tmp_path: Path) -> None:
    name, x = programme
    x = x.copy()
    size = 0.2
    at = [_quiet_slope_at(x, 3.1, size)]
    at.append(_quiet_slope_at(x, at[0] / RATE + 0.3, size))
    at.append(_quiet_slope_at(x, 6.0, size))
    for k, sign in zip(at, (1, -1, 1), strict=True):
        x[0, k] += sign * size
    run = _run(x, tmp_path, name)
    clicks = [e for e in _faults(run) if e.type == "clicks"]
    assert [e.type for e in _faults(run)] == ["clicks", "clicks"], run.table()
    # Two clicks 0.3 s apart are one event (recovery 1 s), on their exact samples; the third is another.
    first, second = clicks
    assert first.start == pytest.approx(at[0] / RATE, abs=1.5 / RATE)
    assert first.end == pytest.approx(at[1] / RATE + 1 / RATE, abs=1.5 / RATE)
    assert first.details["clicks"] == 2 and first.details["channels"] == ["FL"]
    assert second.start == pytest.approx(at[2] / RATE, abs=1.5 / RATE) and second.details["clicks"] == 1
