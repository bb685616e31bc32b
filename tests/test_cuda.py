"""GPU path against the CPU reference: NVDEC frames, GPU scoring and events must match the CPU path.

Skipped without a CUDA device (and the NVDEC parts without PyNvVideoCodec). Run on a GPU machine with
`pytest -m cuda` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detect_media import synthetic_url
from media import synthetic_luma, write_clip

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.decode import gpu_frames
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

FPS = 25
FRAME = 1 / FPS
FAULTS = ["black@1:2.5", "freeze@4.2:3", "blocky@8:1.2", "glitch@10.4:0.04"]
SECONDS = 12


def _nvdec_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    from engine.decode.nvdec import available

    return available()[0]


nvdec = pytest.mark.skipif(not _nvdec_ok(), reason="PyNvVideoCodec/NVDEC not usable here")


@pytest.fixture(scope="module")
def faulty_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = synthetic_url(FAULTS, size="640x360", fps=FPS, duration=SECONDS)
    path = tmp_path_factory.mktemp("cuda") / "faulty.mp4"
    return write_clip(path, size=(640, 360), fps=FPS, seconds=SECONDS, luma_fn=synthetic_luma(url), crf=16, gop=25, bframes=3)


@pytest.fixture(scope="module")
def hevc_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = synthetic_url(FAULTS[:2], size="640x360", fps=FPS, duration=8)
    path = tmp_path_factory.mktemp("cuda") / "faulty_hevc.mp4"
    return write_clip(path, size=(640, 360), fps=FPS, seconds=8, luma_fn=synthetic_luma(url), codec="libx265", gop=25, bframes=3)


def _run(path: Path, device: str, decoder: str, tier: str = "all", threaded: bool = True) -> tuple[Engine, list]:
    dets = resolve_detectors(FramewatchConfig())
    if tier != "all":
        from engine.detectors import REGISTRY

        dets = {n: c for n, c in dets.items() if not REGISTRY[n].NEEDS_EVERY_FRAME}
    sink = MemorySink()
    eng = Engine(sink, device=device)
    eng.add_stream(StreamSpec("s", str(path), dets, SourceOptions(pace="fast", decoder=decoder, tier=tier, threaded=threaded)))
    eng.run()
    return eng, [e for e in sink.events if e.status.value == "resolved"]


def _same_events(a: list, b: list) -> None:
    assert sorted(e.type for e in a) == sorted(e.type for e in b), (a, b)
    for x, y in zip(sorted(a, key=lambda e: (e.type, e.start)), sorted(b, key=lambda e: (e.type, e.start)), strict=True):
        assert abs(x.start - y.start) <= FRAME + 1e-6, (x, y)
        assert abs(x.end - y.end) <= FRAME + 1e-6, (x, y)


def test_kernels_and_frame_conversion_match_cpu() -> None:
    g = torch.Generator().manual_seed(3)
    luma = torch.randint(0, 256, (6, 360, 640), dtype=torch.uint8, generator=g)
    uv = torch.randint(0, 256, (6, 180, 320, 2), dtype=torch.uint8, generator=g)
    nv12 = [torch.cat([luma[i], uv[i].reshape(180, 640)]) for i in range(6)]
    cpu = gpu_frames.convert_surfaces(nv12, 360, False, keep_luma=True)
    gpu = gpu_frames.convert_surfaces([s.cuda() for s in nv12], 360, False, keep_luma=True)
    for name in ("luma", "small", "chroma", "hist", "rows"):
        c, d = getattr(cpu, name), getattr(gpu, name)
        assert d.device.type == "cuda"
        assert int((c.to(torch.int16) - d.cpu().to(torch.int16)).abs().max()) <= (1 if name in ("small", "chroma") else 0)


@pytest.mark.parametrize("size", [(1080, 1920), (720, 1280), (360, 640)])
def test_fused_luma_summary_matches_the_torch_reference(size: tuple[int, int]) -> None:
    from kernels import luma_summary as ksum

    g = torch.Generator().manual_seed(5)
    h, w = size
    y = torch.randint(0, 256, (4, h, w), dtype=torch.uint8, generator=g)
    y[1] = 16
    y[2, : h // 2] = 235
    ref_small, ref_hist, ref_rows = ksum.luma_summary(y, ksum.row_stride(h))
    yc = y.cuda()
    assert ksum.fused_available(yc), ksum._cupy_error
    small, hist, rows = ksum.luma_summary_fused(yc, ksum.row_stride(h))
    assert torch.equal(hist.cpu(), ref_hist)
    assert torch.equal(rows.cpu(), ref_rows)
    assert int((small.cpu().to(torch.int16) - ref_small.to(torch.int16)).abs().max()) <= 1
    assert float((small.cpu() != ref_small).float().mean()) < 0.001


def test_scoring_step_cpu_and_cuda_agree(faulty_clip: Path) -> None:
    """Same decoder (PyAV), scoring on the CPU vs on the GPU: same events."""
    _, cpu = _run(faulty_clip, "cpu", "pyav")
    eng, gpu = _run(faulty_clip, "cuda", "pyav")
    assert eng.device.type == "cuda"
    assert {e.type for e in cpu} >= {"black", "freeze", "blockiness", "glitch"}
    _same_events(cpu, gpu)


@nvdec
@pytest.mark.parametrize("threaded", [True, False], ids=["threaded", "packets"])
def test_nvdec_events_match_cpu(faulty_clip: Path, threaded: bool) -> None:
    _, cpu = _run(faulty_clip, "cpu", "pyav")
    eng, gpu = _run(faulty_clip, "cuda", "nvdec", threaded=threaded)
    rt = eng.streams["s"]
    assert rt.info.decoder == ("nvdec-threaded" if threaded else "nvdec"), rt.info
    assert rt.counters.decoder_fallbacks == 0
    assert rt.stats.frames_scored == SECONDS * FPS
    _same_events(cpu, gpu)


@nvdec
def test_nvdec_hevc_events_match_cpu(hevc_clip: Path) -> None:
    _, cpu = _run(hevc_clip, "cpu", "pyav")
    _, gpu = _run(hevc_clip, "cuda", "nvdec", threaded=False)
    assert {e.type for e in cpu} >= {"black", "freeze"}
    _same_events(cpu, gpu)


@nvdec
def test_nvdec_luma_is_bit_exact(faulty_clip: Path) -> None:
    """NVDEC and libavcodec are both conforming H.264 decoders: the same luma, and small planes within 1."""
    import av

    from engine.decode.nvdec import NvdecVideoDecoder
    from engine.decode.pyav import PyAVVideoDecoder

    with av.open(str(faulty_clip)) as a, av.open(str(faulty_clip)) as b:
        cpu_dec = PyAVVideoDecoder(a.streams.video[0])
        gpu_dec = NvdecVideoDecoder(b.streams.video[0], 0, "cuda:0", keep_luma=True)
        cpu_frames = [f for p in a.demux(a.streams.video[0]) for f in (cpu_dec.decode(p) if p.size else cpu_dec.flush())]
        gpu_frames_ = [f for p in b.demux(b.streams.video[0]) for f in (gpu_dec.decode(p) if p.size else gpu_dec.flush())]
    assert len(cpu_frames) == len(gpu_frames_) == SECONDS * FPS
    worst_small = 0
    for (tc, fc), (tg, fg) in zip(cpu_frames, gpu_frames_, strict=True):
        assert tc == pytest.approx(tg, abs=1e-6)
        assert torch.equal(fc.luma, fg.luma.cpu())
        # The summary a GPU frame keeps instead of its plane describes the same plane.
        hist = torch.bincount(fc.luma.reshape(-1), minlength=256).to(torch.int32)
        assert torch.equal(fg.summary.hist.cpu(), hist)
        assert torch.equal(fg.summary.rows.cpu(), fc.luma[:: fg.summary.row_stride])
        worst_small = max(worst_small, int((fc.small.to(torch.int16) - fg.small.cpu().to(torch.int16)).abs().max()))
    assert worst_small <= 1
    rgb = gpu_frames_[10][1].rgb()
    assert rgb.shape == (180, 320, 3) and rgb.dtype == np.uint8


@nvdec
def test_nvdec_pictures_have_the_cpu_decoder_s_key_flags_and_loss_marks() -> None:
    """The real NVDEC session on an HEVC stream short of a slice (tests/test_corruption_detector.py): every
    picture has the key flag and loss mark the CPU decoder gives it (FFmpeg reports nothing for that loss
    either, so the two decoders have the same evidence)."""
    import io

    import av
    from test_corruption_detector import _hevc_short_of_a_slice

    from engine.decode.nvdec import NvdecVideoDecoder
    from engine.decode.pyav import PyAVVideoDecoder

    _, bad, _ = _hevc_short_of_a_slice()
    flags = []
    for make in (lambda st: PyAVVideoDecoder(st), lambda st: NvdecVideoDecoder(st, 0, "cuda:0")):
        with av.open(io.BytesIO(bad), format="mpegts") as c:
            st = c.streams.video[0]
            dec = make(st)
            got = [x for p in c.demux(st) for x in (dec.decode(p) if p.size else dec.flush())]
        flags.append([(round(t * 90_000), f.key_frame, f.damaged) for t, f in got])
    assert flags[0] == flags[1]
    assert sum(d for _, _, d in flags[1]) >= 5


@nvdec
@pytest.mark.parametrize("tier", ["skip_nonref", "keyframes"])
def test_tiers_decode_the_same_frames_on_cpu_and_gpu(faulty_clip: Path, tier: str) -> None:
    ce, cpu = _run(faulty_clip, "cpu", "pyav", tier=tier)
    ge, gpu = _run(faulty_clip, "cuda", "nvdec", tier=tier)
    c, g = ce.streams["s"], ge.streams["s"]
    assert c.stats.frames_scored == g.stats.frames_scored < SECONDS * FPS
    assert c.counters.packets_skipped == g.counters.packets_skipped > 0
    if tier == "keyframes":
        assert g.stats.frames_scored == SECONDS  # GOP of 25 at 25 fps
    assert all(e.details["tier"] == tier for e in gpu)
    _same_events(cpu, gpu)


def test_corruption_model_fp16_on_gpu_matches_the_cpu_reference() -> None:
    """The shipped corruption CNN on CUDA (fp16 autocast, as the scoring step runs it) against fp32 on the CPU:
    frame probabilities within 0.02 and the same decisions away from the threshold."""
    from kernels.corruption import analysis_plane
    from models.data.content import SourceSpec, generated_frames
    from models.train import frame_probabilities, pair
    from models.weights import SHIPPED, load

    frames = generated_frames(SourceSpec("g", "generated", "test", seed=5, width=640, height=368, seconds=0.4))
    lumas = [torch.from_numpy(np.ascontiguousarray(f.mean(axis=2).astype(np.uint8))) for f in frames]
    planes = [analysis_plane(y) for y in lumas]
    # Damage some: blocks copied from elsewhere, as concealment does.
    for p in planes[::2]:
        p[40:80, 64:160] = p[100:140, 200:296].clone()
    inputs = [pair(p, planes[max(0, i - 1)]) for i, p in enumerate(planes)]
    model, meta = load(SHIPPED)
    cpu, _ = frame_probabilities(model, inputs, torch.device("cpu"), meta.frame_blocks)
    gpu_model, _ = load(SHIPPED, "cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        gpu, _ = frame_probabilities(gpu_model, inputs, torch.device("cuda"), meta.frame_blocks)
    assert np.abs(cpu - gpu).max() <= 0.02, (cpu, gpu)
    far = np.abs(cpu - meta.threshold) > 0.05
    assert ((cpu >= meta.threshold) == (gpu >= meta.threshold))[far].all()


def test_audio_scoring_cpu_and_cuda_agree() -> None:
    """Every audio kernel (K-weighting, true peak, clicks, DC, L/R cross, onsets) batched over streams on
    the GPU gives the CPU reference's values, across chunks (filter state carried on the device)."""
    from engine.scoring import AudioState, AudioWork, ScoringStep

    rng = np.random.default_rng(11)
    n, seconds = 3, 1.0
    x = (0.1 * rng.standard_normal((n, 2, round(seconds * 48_000)))).astype(np.float32)
    x[1, 0, 10_000] += 0.5  # a click
    x[2] *= 0.0
    x[2, :, 20_000:] = 0.3  # a DC step out of silence
    results = {}
    for device in ("cpu", "cuda"):
        step = ScoringStep(device)
        states = [AudioState(clicks=True) for _ in range(n)]
        out = []
        for c0 in range(0, x.shape[-1], 4800):
            works = [AudioWork(f"s{i}", c0 / 48_000, torch.from_numpy(x[i, :, c0 : c0 + 4800]), "stereo", states[i])
                     for i in range(n)]
            out.append(step.score_audio(works))
        results[device] = out
    for cpu_tick, gpu_tick in zip(results["cpu"], results["cuda"], strict=True):
        for a, b in zip(cpu_tick, gpu_tick, strict=True):
            for name in ("peak", "mean_square", "clipped", "mean", "cross", "true_peak"):
                np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-7, err_msg=name)
            # Onsets are differences of float32 log10 powers around -2: a rounding step there is 2.4e-7 (the
            # first GPU check saw 1.2e-7 on a rise of 6.5e-4).
            np.testing.assert_allclose(b.onset, a.onset, rtol=1e-5, atol=1e-6, err_msg="onset")
            np.testing.assert_allclose(b.window_power, a.window_power, rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(b.short_term, a.short_term, rtol=0, atol=1e-4)
            clear = a.impulse > 3
            np.testing.assert_array_equal(b.impulse_at[clear], a.impulse_at[clear])
            np.testing.assert_allclose(b.impulse[clear], a.impulse[clear], rtol=1e-3)
