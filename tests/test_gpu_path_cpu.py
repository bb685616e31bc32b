"""The GPU path's CPU-side logic, tested without a GPU: density tiers, luma summaries, fallbacks, bench."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from detect_media import synthetic_url
from media import synthetic_luma, write_clip

from engine.alerts import MemorySink
from engine.config import ConfigError, FramewatchConfig, load_config, resolve_detectors, stream_specs
from engine.decode import gpu_frames
from engine.decode.tiers import Tier, TierFilter, is_reference, nal_length_size
from engine.detectors import REGISTRY
from engine.media import LumaSummary, VideoFrame
from engine.runner import Engine, StreamSpec
from engine.scoring import ScoringStep, VideoWork
from engine.sources import SourceOptions
from kernels import luma as kluma
from kernels import luma_summary as ksum
from kernels import spatial as ks

FPS = 25


# -- NAL parsing and tiers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "data", "ref"),
    [
        ("h264", b"\x00\x00\x00\x01\x65\x88", True),  # IDR, nal_ref_idc 3
        ("h264", b"\x00\x00\x00\x01\x41\x9a", True),  # P slice, nal_ref_idc 2
        ("h264", b"\x00\x00\x00\x01\x01\x9e", False),  # B slice, nal_ref_idc 0
        ("h264", b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x01\x9e", False),  # AUD first, then the slice
        ("h264", b"\x00\x00\x00\x02\x01\x9e", False),  # length-prefixed (MP4)
        ("h264", b"\x00\x00\x00\x01\x06\x05", None),  # SEI only: unknown, never dropped
        ("hevc", b"\x00\x00\x00\x01\x00\x01", False),  # TRAIL_N
        ("hevc", b"\x00\x00\x00\x01\x02\x01", True),  # TRAIL_R
        ("hevc", b"\x00\x00\x00\x01\x26\x01", True),  # IDR_W_RADL (19)
        ("hevc", b"\x00\x00\x00\x01\x20\x01", True),  # BLA_W_LP (16): not an _N type
        ("hevc", b"\x00\x00\x00\x01\x10\x01", False),  # RASL_N (8)
        ("vp9", b"\x00\x00\x00\x01\x01", None),
    ],
)
def test_is_reference(codec: str, data: bytes, ref: bool | None) -> None:
    assert is_reference(codec, data) is ref


def test_tier_filter_keeps_unknown_and_keyframes() -> None:
    f = TierFilter(Tier.SKIP_NONREF, "h264")
    assert f.keep(b"\x00\x00\x00\x01\x06\x05", key=False)  # unknown
    assert not f.keep(b"\x00\x00\x00\x01\x01\x9e", key=False)
    assert f.keep(b"\x00\x00\x00\x01\x01\x9e", key=True)  # a keyframe is never dropped
    assert (f.kept, f.dropped) == (2, 1)
    k = TierFilter("keyframes", "h264")
    assert k.keep(b"", key=True) and not k.keep(b"\x00\x00\x00\x01\x41", key=False)


def test_nal_length_size_from_avcc() -> None:
    assert nal_length_size(bytes([1, 0x64, 0, 0x1F, 0xFF, 0xE1]), "h264") == 4
    assert nal_length_size(bytes([1, 0x64, 0, 0x1F, 0xFD, 0xE1]), "h264") == 2
    assert nal_length_size(b"\x00\x00\x00\x01\x67", "h264") == 4


@pytest.fixture(scope="module")
def bframe_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    url = synthetic_url(["black@1:2.5"], size="320x240", fps=FPS, duration=6)
    d = tmp_path_factory.mktemp("tiers")
    return {
        codec: write_clip(d / f"{codec}.mp4", size=(320, 240), fps=FPS, seconds=6, luma_fn=synthetic_luma(url),
                          codec=codec, gop=25, bframes=3, audio=True)
        for codec in ("libx264", "libx265")
    }


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_tier_counts_on_real_bitstreams(bframe_clips: dict[str, Path], codec: str) -> None:
    """The filter reads the encoder's own reference decisions: libavcodec's non-reference skipping drops
    the same pictures, and keyframes are the GOP starts."""
    path = bframe_clips[codec]
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        name = vs.codec_context.name
        filters = {t: TierFilter(t, name, nal_length_size(bytes(vs.codec_context.extradata or b""), name)) for t in Tier}
        for p in c.demux(vs):
            if p.size:
                for f in filters.values():
                    f.keep(memoryview(p), p.is_keyframe)
    assert filters[Tier.ALL].kept == 6 * FPS and filters[Tier.ALL].dropped == 0
    assert filters[Tier.KEYFRAMES].kept == 6  # one GOP of 25 per second
    assert 0.2 * 6 * FPS < filters[Tier.SKIP_NONREF].dropped < 0.7 * 6 * FPS
    # libavcodec agrees about which frames nobody references: decoding with AVDISCARD_NONREF gives the
    # same number of pictures as feeding only the packets the filter keeps.
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        vs.codec_context.skip_frame = "NONREF"
        decoded = sum(1 for _ in c.decode(vs))
    assert decoded == filters[Tier.SKIP_NONREF].kept


def _run(path: Path, tier: str, decoder: str = "pyav", device: str = "cpu") -> tuple[Engine, list]:
    dets = resolve_detectors(FramewatchConfig())
    if tier != "all":
        dets = {n: c for n, c in dets.items() if not REGISTRY[n].NEEDS_EVERY_FRAME}
    sink = MemorySink()
    eng = Engine(sink, device=device)
    eng.add_stream(StreamSpec("s", str(path), dets, SourceOptions(pace="fast", decoder=decoder, tier=tier)))
    eng.run()
    return eng, sink.events


@pytest.mark.parametrize("tier", ["all", "skip_nonref", "keyframes"])
def test_engine_tiers_detect_black_and_report_the_tier(bframe_clips: dict[str, Path], tier: str) -> None:
    eng, events = _run(bframe_clips["libx264"], tier)
    rt = eng.streams["s"]
    expected = {"all": 6 * FPS, "keyframes": 6}
    if tier in expected:
        assert rt.stats.frames_scored == expected[tier]
    else:
        assert rt.stats.frames_scored < 6 * FPS
    assert (rt.counters.packets_skipped > 0) == (tier != "all")
    assert rt.info.tier == tier
    black = [e for e in events if e.type == "black" and e.status.value == "resolved"]
    assert len(black) == 1, events
    # Black is 1.0..3.5 s; a sparse tier sees it at the pictures it decodes, so within its frame spacing.
    spacing = {"all": 1 / FPS, "skip_nonref": 2 / FPS + 1e-6, "keyframes": 1.0}[tier]
    assert abs(black[0].start - 1.0) <= spacing + 1e-6
    assert abs(black[0].end - 88 / FPS) <= spacing + 1e-6  # the last black picture is frame 87
    assert all(e.details["tier"] == tier for e in events)
    assert rt.stats.media_end == pytest.approx(6.0, abs={"all": 0.01, "skip_nonref": 0.2, "keyframes": 1.0}[tier])


def test_config_refuses_every_frame_detectors_in_sparse_tiers() -> None:
    text = "streams:\n  - {id: a, url: x.mp4, tier: keyframes}\n"
    with pytest.raises(ConfigError, match=r"streams\.a: tier keyframes .*glitch.*need every frame"):
        stream_specs(load_config(text=text))
    ok = "streams:\n  - {id: a, url: x.mp4, tier: keyframes, detectors: {glitch: {enabled: false}}}\n"
    assert stream_specs(load_config(text=ok))[0].source.tier == "keyframes"
    prof = "profiles:\n  dense: {tier: skip_nonref, detectors: {glitch: {enabled: false}}}\nstreams:\n  - {id: a, url: x.mp4, profile: dense}\n"
    assert stream_specs(load_config(text=prof))[0].source.tier == "skip_nonref"


def test_engine_api_drops_every_frame_detectors_in_sparse_tiers(bframe_clips: dict[str, Path]) -> None:
    sink = MemorySink()
    eng = Engine(sink)
    rt = eng.add_stream(StreamSpec("s", str(bframe_clips["libx264"]), resolve_detectors(FramewatchConfig()),
                                   SourceOptions(pace="fast", tier="keyframes")))
    assert "glitch" not in {d.NAME for d in rt.detectors}
    eng.run()


# -- fallbacks -------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_requested_without_gpu_falls_back_loudly(bframe_clips: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    eng, events = _run(bframe_clips["libx264"], "all", decoder="nvdec", device="cuda:0")
    rt = eng.streams["s"]
    assert eng.device.type == "cpu" and "no CUDA device" in eng.device_note
    assert rt.info.decoder == "pyav"
    assert rt.counters.decoder_fallbacks == 1
    assert "NVDEC unavailable" in rt.info.decoder_note
    assert any("NVDEC unavailable" in r.getMessage() for r in caplog.records)
    assert any(e.type == "black" for e in events)


def test_auto_decoder_on_cpu_is_not_a_fallback(bframe_clips: dict[str, Path]) -> None:
    eng, _ = _run(bframe_clips["libx264"], "all", decoder="auto", device="cpu")
    rt = eng.streams["s"]
    assert rt.info.decoder == "pyav" and rt.counters.decoder_fallbacks == 0 and rt.info.decoder_note == ""


# -- luma summaries (what GPU frames keep instead of the whole plane) -----------------------------------


def _planes(n: int = 5, h: int = 360, w: int = 640, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(16, 236, (n, h, w), dtype=torch.uint8, generator=g)
    y[1] = 16  # black
    y[2, :, : w // 2] = 16  # half black
    if n > 3:
        y[3] = torch.kron(torch.randint(30, 200, (h // 8, w // 8), generator=g), torch.ones(8, 8)).to(torch.uint8)
    return y


def test_histogram_reference_matches_numpy() -> None:
    y = _planes()
    hist = ksum.histogram_torch(y)
    for i in range(y.shape[0]):
        np.testing.assert_array_equal(hist[i].numpy(), np.bincount(y[i].numpy().ravel(), minlength=256))


def test_summary_gives_the_same_black_fraction_and_spatial_stats() -> None:
    y = _planes()
    small, hist, rows = ksum.luma_summary(y, ksum.row_stride(360))
    for th in (16, 20, 32, 40):
        ref = kluma.black_fraction(y, th)
        from_hist = hist.to(torch.int64).cumsum(1)[:, th].to(torch.float32) / (360 * 640)
        torch.testing.assert_close(from_hist, ref)
    a = ks.spatial_stats(y[:, :: ksum.row_stride(360)], stride=1)
    b = ks.spatial_stats(rows, stride=1)
    torch.testing.assert_close(a.blockiness, b.blockiness)
    torch.testing.assert_close(a.blur, b.blur, equal_nan=True)
    assert small.shape == (5, 180, 320)


def test_nv12_conversion_matches_the_cpu_plane() -> None:
    y = _planes(n=3)
    uv = torch.full((3, 180, 320, 2), 128, dtype=torch.uint8)
    uv[..., 1] = 200  # reddish
    surfaces = [torch.cat([y[i], uv[i].reshape(180, 640)]) for i in range(3)]
    c = gpu_frames.convert_surfaces(surfaces, 360, False)
    assert c.luma is None and c.hist.shape == (3, 256) and c.rows.shape[0] == 3
    torch.testing.assert_close(c.small, ksum.area_small_torch(y))
    kept = gpu_frames.convert_surfaces(surfaces, 360, False, keep_luma=True)
    assert torch.equal(kept.luma, y)
    rgb = gpu_frames.thumbnail_rgb(c.small[0].numpy(), c.chroma[0].numpy())
    assert rgb.shape == (180, 320, 3) and rgb[..., 0].mean() > rgb[..., 2].mean()
    full = gpu_frames.convert_surfaces(surfaces, 360, True)
    assert int(full.small.min()) >= 16 and int(full.small.max()) <= 235


def test_scoring_summaries_equals_scoring_planes() -> None:
    """A frame that kept only its summary scores exactly like the same frame with its whole plane."""
    y = _planes(n=6, seed=4)
    stride = ksum.row_stride(360)
    small, hist, rows = ksum.luma_summary(y, stride)

    def frames(with_plane: bool) -> list[VideoFrame]:
        return [VideoFrame(pts=i / FPS, duration=1 / FPS, luma=y[i] if with_plane else None, small=small[i],
                           summary=None if with_plane else LumaSummary(hist[i], rows[i], stride, 360, 640))
                for i in range(6)]

    reqs = [r for name in ("black", "blockiness", "blur") for r in REGISTRY[name](REGISTRY[name].Config(), _ctx()).requests()]
    step = ScoringStep("cpu")
    a = step.score_video([VideoWork("s", frames(True), None, None, reqs)])[0]
    b = step.score_video([VideoWork("s", frames(False), None, None, reqs)])[0]
    for req in reqs:
        for key, va in a.values[req].items():
            np.testing.assert_allclose(b.values[req][key], va, rtol=1e-6, equal_nan=True, err_msg=f"{req.family}.{key}")



def test_scoring_passes_do_not_change_results() -> None:
    """A tick's frames are scored in passes of bounded size (memory); where the cut falls changes nothing,
    because a stream's frames and their neighbours stay in one pass."""
    names = [n for n in ("black", "freeze", "blockiness", "blur", "glitch", "scene_change") if n in REGISTRY]
    reqs = list(dict.fromkeys(r for n in names for r in REGISTRY[n](REGISTRY[n].Config(), _ctx()).requests()))
    assert {r.family for r in reqs} >= {"black", "spatial", "difference", "glitch"}

    def works() -> list[VideoWork]:
        out = []
        for s in range(7):
            y = _planes(n=9, seed=10 + s)
            y[4] = 16 if s % 2 else y[4]  # a black picture in some streams, a glitch-like jump in the others
            small = ksum.area_small_torch(y)
            fr = [VideoFrame(pts=i / FPS, duration=1 / FPS, luma=y[i], small=small[i]) for i in range(9)]
            # Neighbours on both sides for most streams, none for some: both kinds must survive a cut.
            out.append(VideoWork(f"s{s}", fr[1:8], fr[0] if s % 3 else None, fr[8] if s % 4 else None, reqs))
        return out

    whole = ScoringStep("cpu", pass_frames=10_000).score_video(works())
    for cut in (1, 9, 20):
        step = ScoringStep("cpu", pass_frames=cut)
        passes: list[int] = []
        real = step._score_pass

        def counted(ws, passes=passes, real=real):
            passes.append(len(ws))
            return real(ws)

        step._score_pass = counted  # type: ignore[method-assign]
        cut_up = step.score_video(works())
        assert len(passes) > 1 and sum(passes) == 7, (cut, passes)
        assert [m.stream for m in cut_up] == [m.stream for m in whole]
        for a, b in zip(whole, cut_up, strict=True):
            assert torch.equal(a.small, b.small)
            for req in reqs:
                for key, va in a.values[req].items():
                    np.testing.assert_array_equal(b.values[req][key], va, err_msg=f"{cut} {req.family}.{key}")


def _ctx():
    from engine.detectors.base import StreamContext

    return StreamContext(stream="s", emit=lambda e: None)


# -- bench -----------------------------------------------------------------------------------------------


def test_bench_on_cpu_reports_ceiling_and_end_to_end(tmp_path: Path) -> None:
    from engine import bench

    clip = write_clip(tmp_path / "c.mp4", size=(320, 240), fps=FPS, seconds=2, codec="libx264", gop=25, bframes=2, audio=False)
    # Two worker processes as well: they and the parent meet twice (contexts held, then go) without hanging.
    report = bench.run(["h264"], ["all", "keyframes"], 2, [1, 2], "cpu", tmp_path, 2.0, clips={"h264": clip},
                       output=tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"] == report["results"]
    allr, allr2, key, key2 = report["results"]
    assert (allr["procs"], allr2["procs"], key2["procs"]) == (1, 2, 2)
    assert allr2["frames_e2e"] == allr["frames_e2e"] and key2["frames_e2e"] == key["frames_e2e"] and not allr2["errors"]
    assert allr["gpu_mem_per_stream_mb"] is None and allr["torch_reserved_peak_mb"] is None  # no GPU: no figure
    assert allr["frames_ceiling"] == allr["frames_e2e"] == 2 * 2 * FPS
    assert allr["ceiling_fps"] > 0 and allr["e2e_fps"] > 0 and allr["ratio"] == pytest.approx(allr["e2e_fps"] / allr["ceiling_fps"], abs=1e-3)
    assert key["frames_e2e"] == key["frames_ceiling"] == 2 * 2
    assert not allr["errors"] and not key["errors"]
    assert bench.calibration(report) is None  # no GPU measured
    rows = bench.table(report)
    assert rows[0][0] == "codec" and len(rows) == 5


def test_decode_batch_reaches_the_threaded_nvdec_reader() -> None:
    """`bench --decode-batch` and SourceOptions.decode_batch set the threaded reader's batch (its surface ring)."""
    from engine.sources.nvdec_file import NvdecFileSource

    assert NvdecFileSource("a.mp4", SourceOptions()).batch == 8
    assert NvdecFileSource("a.mp4", SourceOptions(decode_batch=16)).batch == 16
    assert NvdecFileSource("a.mp4", SourceOptions(decode_batch=0)).batch == 1


def test_surfaces_of_coded_height_and_resolution_changes() -> None:
    """NVDEC may hand out 1088-line surfaces for 1080p pictures, and a new sequence header can change the
    size inside a batch: luma is cut at the display height, chroma found after the coded luma plane, and
    each run of one size is converted on its own."""
    from engine.decode.nvdec import frames_from_surfaces

    def surface(h_coded: int, w: int, y: int, v: int) -> torch.Tensor:
        s = torch.full((h_coded * 3 // 2, w), 128, dtype=torch.uint8)
        s[:h_coded] = y
        s[h_coded + 0 : h_coded + h_coded // 2, 1::2] = v  # V samples of the interleaved UV plane
        return s

    batch = [surface(1088, 1920, 40, 200), surface(1088, 1920, 40, 200), surface(720, 1280, 90, 128)]
    frames = frames_from_surfaces(batch, 1080, False, None)
    assert [(s.height, s.width) for _, _, s, _ in frames] == [(1080, 1920), (1080, 1920), (720, 1280)]
    luma, small, summary, rgb = frames[0]
    assert luma is None and int(summary.hist[40]) == 1080 * 1920
    assert int(small.float().mean().round()) == 40
    r, g, b = rgb().reshape(-1, 3).mean(0)
    assert r > g and r > b  # V = 200: red
    assert int(frames[2][2].hist[90]) == 720 * 1280


def test_no_signal_waits_longer_than_a_sparse_tier_spacing() -> None:
    from engine.detectors.base import StreamContext, VideoMetrics
    from engine.detectors.no_signal import NoSignalConfig, NoSignalDetector

    events: list = []
    det = NoSignalDetector(NoSignalConfig(onset=2.0), StreamContext(stream="s", emit=events.append, live=True, tier="keyframes"))
    m = VideoMetrics(stream="s", pts=np.array([0.0, 2.0]), duration=np.array([2.0, 2.0]), values={}, small=None,
                     last=None, prev_small=None)
    det.on_video(m)
    assert det.onset() == pytest.approx(5.0)
    det.ctx.extra["last_arrival"] = 100.0
    det.on_tick(100.0, 4.0)
    det.on_tick(103.0, 4.0)  # 3 s without a keyframe: normal in this tier
    assert not events
    det.on_tick(105.5, 4.0)
    assert [e.type for e in events] == ["no_signal"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_check_on_a_missing_gpu_says_so(bframe_clips: dict[str, Path]) -> None:
    from media import json_lines, run_check

    proc = run_check(bframe_clips["libx264"], "--device", "cuda", "--json")
    assert proc.returncode == 1  # the black picture is found, on the CPU
    report = json_lines(proc.stdout)[0]
    assert report["device"] == "cpu" and "no CUDA device" in report["device_note"]
    assert "warning: device cuda requested but no CUDA device is available" in proc.stderr
    assert [e["type"] for e in report["events"]] == ["black"]


def test_bench_memory_breakdown_separates_contexts_decoders_and_streams() -> None:
    from engine.bench import memory_breakdown

    mb = 2**20
    # 2 processes of 1 GB context each, then 32 streams adding 120 MB each; decoders alone 80 MB a stream.
    out = memory_breakdown(32, 2, base=500 * mb, ready=2548 * mb, peak=2548 * mb + 32 * 120 * mb,
                           ceiling_base=500 * mb, ceiling_peak=500 * mb + 32 * 80 * mb)
    assert out == {"gpu_mem_per_stream_mb": 184.0, "gpu_mem_decoder_per_stream_mb": 80.0,
                   "gpu_mem_context_per_proc_mb": 1024.0, "gpu_mem_marginal_per_stream_mb": 120.0}
    # No NVML (CPU bench): nothing is invented.
    assert set(memory_breakdown(4, 1, None, None, None).values()) == {None}
    # A reading missing in the middle leaves only the figures that do not need it.
    out = memory_breakdown(4, 1, base=0, ready=None, peak=4 * mb)
    assert out["gpu_mem_per_stream_mb"] == 1.0 and out["gpu_mem_marginal_per_stream_mb"] is None


def _clip_in(path: Path, codec: str, pix_fmt: str) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 128, 64, pix_fmt
        if codec == "libx265":
            s.options = {"x265-params": "log-level=error"}
        for i in range(5):
            f = av.VideoFrame.from_ndarray(np.full((64, 128, 3), 40 * i, np.uint8), format="rgb24").reformat(format=pix_fmt)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize(("codec", "pix_fmt", "nvdec_path"), [
    ("libx264", "yuv420p", True), ("libx265", "yuv420p10le", False), ("libx264", "yuv444p", False),
    ("libx264", "yuv422p", False),
])
def test_pictures_nvdec_cannot_read_as_nv12_are_decoded_on_the_cpu_and_said(tmp_path: Path, codec: str, pix_fmt: str,
                                                                           nvdec_path: bool) -> None:
    """NVDEC gives 10-bit pictures as P016 and 4:2:2/4:4:4 in other layouts; read as 8-bit NV12 they would be
    garbage. Such streams take the CPU decoder with the reason given (packet path and threaded file path)."""
    import av

    from engine.decode import video_decoder
    from engine.decode.nvdec import NvdecUnavailable, format_problem
    from engine.sources.nvdec_file import NvdecFileSource

    path = _clip_in(tmp_path / f"{pix_fmt}.mkv", codec, pix_fmt)
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        assert vs.codec_context.pix_fmt == pix_fmt
        problem = format_problem(vs.codec_context)
        assert (problem is None) == nvdec_path
        dec, note = video_decoder(vs, "nvdec", device="cuda:0")
        assert dec.backend == "pyav" and note.startswith("NVDEC unavailable, decoding on the CPU: ")
        if not nvdec_path:
            assert note.endswith(f"NVDEC frames are read as 8-bit 4:2:0 here, this stream is {pix_fmt}")
    if not nvdec_path:
        with pytest.raises(NvdecUnavailable, match=pix_fmt):
            NvdecFileSource(str(path), SourceOptions(device="cuda:0"))._probe()
