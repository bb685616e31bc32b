"""The corruption detector in the engine: kernels around the CNN, frame sampling, and the shipped model on
encoded streams damaged the way networks damage them (faults at known times, known places)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.alerts import MemorySink, ThumbnailWriter
from engine.corruption import CorruptionFamily
from engine.detectors.base import MetricRequest, Region
from engine.detectors.corruption import CorruptionConfig
from engine.media import VideoFrame
from engine.review import ReviewStore
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions
from kernels.corruption import analysis_plane, block_mask, damage_box, frame_scores
from models.data.codec import EncodeSpec, decode_luma, encode_ts, video_pid
from models.data.content import SourceSpec, generated_frames
from models.data.damage import DamageSpec, damage
from models.data.generate import CORRUPT, Recipe, block_mad, label

FPS = 25


def test_analysis_plane_is_the_2x2_mean() -> None:
    y = np.random.default_rng(0).integers(0, 256, (37, 50), dtype=np.uint8)
    ref = np.floor(y[:36, :50].reshape(18, 2, 25, 2).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    out = analysis_plane(torch.from_numpy(y)).numpy()
    assert out.shape == (18, 25)
    # torch rounds halves to even; the mean of four integers is a multiple of 0.25, so only .5 can differ
    assert np.abs(out - ref).max() <= 1 and (np.abs(out - ref) > 0).mean() < 0.2


def test_frame_scores_mask_and_box() -> None:
    logits = torch.full((1, 10, 20), -8.0)
    logits[0, 2:4, 5:8] = 8.0  # six damaged macroblocks
    share = 0.0
    assert float(frame_scores(logits, share)[0]) > 0.99
    keep = block_mask(10, 20, (Region(0.2, 0.1, 0.3, 0.4),))
    assert keep is not None and not keep[2:4, 5:8].any() and keep.sum() < 200
    assert float(frame_scores(logits, share, keep)[0]) < 0.01  # damage inside an ignored region is not counted
    box = damage_box(torch.sigmoid(logits[0]))
    assert box == pytest.approx((5 / 20, 2 / 10, 3 / 20, 2 / 10))


class _Work:
    def __init__(self, stream: str, frames: list[VideoFrame], prev: VideoFrame | None = None) -> None:
        self.stream, self.frames, self.prev = stream, frames, prev


class _Batch:
    def __init__(self, works: list[_Work]) -> None:
        self.works = works
        self.frames = [f for w in works for f in w.frames]


def _frame(pts: float, corrupt: bool = False) -> VideoFrame:
    return VideoFrame(pts=pts, duration=1 / FPS, luma=torch.zeros(32, 32, dtype=torch.uint8),
                      small=torch.zeros(18, 32, dtype=torch.uint8), corrupt=corrupt)


def test_sampling_per_stream_and_concealed_frames_always() -> None:
    fam = CorruptionFamily(torch.device("cpu"))
    a = [_frame(i / FPS, corrupt=(i == 7)) for i in range(50)]
    b = [_frame(i / FPS) for i in range(50)]
    batch = _Batch([_Work("a", a), _Work("b", b)])
    idx = np.arange(100)
    chosen = fam._chosen(batch, idx, 5.0)
    in_a = [j for j in chosen if j < 50]
    in_b = [j - 50 for j in chosen if j >= 50]
    assert in_b == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]  # 5 per second of a 25 fps stream
    assert 7 in in_a and len(in_a) == 11  # the concealed picture is looked at too
    assert fam._chosen(_Batch([_Work("b", [_frame(0.0)])]), np.arange(1), 5.0) == [0]  # pts went back: restart
    assert fam._chosen(batch, idx, 0.0) == list(range(100))


def test_family_scores_like_the_offline_path(damaged_clip) -> None:
    """The engine's batched family (planes made from stacked lumas, the picture before taken across the tick
    boundary) gives the same probabilities as evaluation's path on the same pictures."""
    from models.train import frame_probabilities, pair
    from models.weights import SHIPPED, load

    lumas, _ = decode_luma(damaged_clip["bad"].read_bytes())
    ys = [torch.from_numpy(lumas[k]) for k in sorted(lumas)][:12]
    frames = [VideoFrame(pts=i / FPS, duration=1 / FPS, luma=y, small=torch.zeros(18, 32, dtype=torch.uint8)) for i, y in enumerate(ys)]
    fam = CorruptionFamily(torch.device("cpu"))
    req = MetricRequest("corruption", (("fps", 0), ("threshold", None), ("weights", None), ("previous", True)))
    got = fam(_Batch([_Work("s", frames[5:], prev=frames[4])]), req, np.arange(7))
    model, meta = load(SHIPPED)
    planes = [analysis_plane(y) for y in ys]
    want, _ = frame_probabilities(model, [pair(planes[i], planes[i - 1]) for i in range(5, 12)], torch.device("cpu"), meta.frame_blocks)
    assert np.allclose(got["prob"], want, atol=1e-5)
    assert ((got["decision"] == 1) == (want >= meta.threshold)).all()
    assert all((p is not None) == (d == 1) for p, d in zip(got["plane"], got["decision"], strict=True))


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="threshold"):
        CorruptionConfig(threshold=1.5)
    with pytest.raises(ValueError, match="fps"):
        CorruptionConfig(fps=-1)
    assert CorruptionConfig(fps=0).fps == 0


# --------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def damaged_clip(tmp_path_factory) -> dict:
    """A 640x368 H.264 MPEG-TS (2 s GOP) and a copy that lost a burst of 60 TS packets (11 KB) at 0.84 s, with
    the frames the damage made visibly corrupt (labelled against the clean decode, as the training data is):
    0.84 s to the next key frame at 2.0 s."""
    folder = tmp_path_factory.mktemp("corrupt")
    frames = generated_frames(SourceSpec("det", "generated", "test", seed=901, width=640, height=368, seconds=4.0))
    ts = encode_ts(frames, FPS, EncodeSpec("h264", 1_000_000, 2 * FPS))
    pid = video_pid(ts)
    rng = np.random.default_rng(2)
    bad, touched = damage(ts, pid, DamageSpec("burst", 0.1, (60, 60), protect=0.3), 4.0, rng)
    clean, _ = decode_luma(ts)
    dec, _ = decode_luma(bad)
    keys = sorted(set(clean) & set(dec))
    labels = np.array([label(block_mad(dec[k], clean[k]), Recipe())[0] for k in keys])
    t = (np.array(keys) - keys[0]) / 90_000
    (folder / "clean.ts").write_bytes(ts)
    (folder / "bad.ts").write_bytes(bad)
    corrupt_t = t[labels == CORRUPT]
    assert len(corrupt_t) >= 20 and corrupt_t[-1] < 2.0, corrupt_t  # checked, not assumed: another x264 may put it elsewhere
    return {"clean": folder / "clean.ts", "bad": folder / "bad.ts", "first": float(corrupt_t[0]),
            "last": float(corrupt_t[-1]), "folder": folder}


def _run(path: Path, tmp: Path | None = None, **cfg) -> tuple[list, Engine]:
    sink = MemorySink()
    eng = Engine(sink, thumbnails=ThumbnailWriter(tmp / "thumbs") if tmp else None,
                 review=ReviewStore(tmp / "review") if tmp else None)
    eng.add_stream(StreamSpec("s", str(path), {"corruption": replace(CorruptionConfig(), enabled=True, fps=0, **cfg)}, SourceOptions(pace="fast")))
    eng.run()
    return list(sink.events), eng


def test_a_stream_with_the_corruption_detector_is_not_read_by_the_threaded_nvdec_reader(tmp_path: Path) -> None:
    """The threaded NVDEC file reader gives pictures without key flags or loss evidence: a stream with the
    corruption detector on goes through PyAV's demuxer (packet-level NVDEC on a GPU), the others keep it."""
    from media import write_clip

    clip = write_clip(tmp_path / "c.ts", seconds=0.4, audio=False)
    eng = Engine(MemorySink())
    eng.add_stream(StreamSpec("on", str(clip), {"corruption": replace(CorruptionConfig(), enabled=True)}, SourceOptions()))
    eng.add_stream(StreamSpec("off", str(clip), {"corruption": replace(CorruptionConfig(), enabled=False)}, SourceOptions()))
    assert eng.streams["on"].source.options.threaded is False
    assert eng.streams["off"].source.options.threaded is True


@pytest.fixture(scope="module")
def burst_runs(damaged_clip, tmp_path_factory) -> tuple[list, list, Path]:
    """The shipped model's events on the clean and on the damaged clip, and the folder of the damaged run's
    thumbnails and review store (run once for the tests below)."""
    folder = tmp_path_factory.mktemp("burst")
    clean, _ = _run(damaged_clip["clean"])
    bad, _ = _run(damaged_clip["bad"], folder)
    return clean, bad, folder


def test_shipped_model_finds_the_burst_and_nothing_on_the_clean_stream(damaged_clip, burst_runs) -> None:
    """The engine's decision (the model's rule, hold+evidence): one event from the first damaged picture to the
    healing key frame, within a picture each way (the demuxer's loss flag is read as damage of the packet after
    the flagged one: engine.decode.base.DamageTracker), none on the clean stream."""
    events, bad, tmp_path = burst_runs
    assert events == []
    resolved = [e for e in bad if e.status.value == "resolved"]
    assert [e.type for e in resolved] == ["corruption"], [(e.type, e.start, e.end) for e in resolved]
    e = resolved[0]
    frame = 1 / FPS
    assert abs(e.start - damaged_clip["first"]) <= frame + 1e-6, (e.start, damaged_clip["first"])
    # The damage lasts until the next key frame; the event ends when the picture is whole again.
    assert abs(e.end - (damaged_clip["last"] + frame)) <= frame + 1e-6, (e.end, damaged_clip["last"])
    assert e.value is not None and 0.5 <= e.value <= 1.0  # the model's likeliest picture of the event
    assert e.details["tier"] == "all" and e.details["model"] and e.details["review"] is True
    x, y, w, h = e.details["box"]
    assert 0 <= x < x + w <= 1 and 0 <= y < y + h <= 1
    assert Path(e.thumbnail).is_file()
    rec = ReviewStore(tmp_path / "review").get(e.id, load=True)
    # The review keeps the event's likeliest picture, even when it comes in the tick where the stream heals.
    assert rec.plane.shape[-2:] == (184, 320) and rec.probability == pytest.approx(e.value, abs=1e-3) and rec.verdict is None
    assert (tmp_path / "review" / e.id / "view.png").is_file()


@pytest.mark.xfail(strict=True, reason=(
    "with the CNN alone (rule hold, no transport evidence) the shipped model misses the burst: its damaged pictures "
    "score 0.54-0.88 under its threshold (0.960 since 2026-12-08, 0.893 before) until 1.92 s (0.895), 80 ms before the "
    "healing key frame, too late for the 0.3 s onset. strict: when the model finds it, this marker must go"))
def test_shipped_model_alone_finds_the_burst(damaged_clip) -> None:
    bad, _ = _run(damaged_clip["bad"], rule="hold")
    resolved = [e for e in bad if e.status.value == "resolved"]
    assert [e.type for e in resolved] == ["corruption"], [(e.type, e.start, e.end) for e in resolved]
    frame = 1 / FPS
    assert abs(resolved[0].start - damaged_clip["first"]) <= frame + 1e-6
    assert resolved[0].value >= resolved[0].threshold


def test_an_alert_raised_on_reported_loss_alone_is_reviewed_too(damaged_clip, tmp_path) -> None:
    """A model that flags nothing (threshold above 1) under hold+evidence: the alert comes from the loss the
    demuxer reports, and it still stores the picture the model found likeliest, with the model's probability
    under the threshold, for an operator's verdict."""
    from models.weights import SHIPPED, load, save

    model, meta = load(SHIPPED)
    meta.threshold, meta.decision = 1.01, "hold+evidence"
    weights = save(model, meta, tmp_path / "blind.pt")
    events, _ = _run(damaged_clip["bad"], tmp_path, weights=str(weights))
    resolved = [e for e in events if e.status.value == "resolved"]
    assert [e.type for e in resolved] == ["corruption"], [(e.type, e.start, e.end) for e in resolved]
    e = resolved[0]
    assert e.details["review"] is True and Path(e.thumbnail).is_file()
    rec = ReviewStore(tmp_path / "review").get(e.id, load=True)
    assert rec.plane.shape[-2:] == (184, 320) and rec.probability < 1.01 == rec.threshold
    x, y, w, h = e.details["box"]
    assert 0 <= x < x + w <= 1 and 0 <= y < y + h <= 1


def _ticks(det, probs: list[list[float]], marks: list[list[int]], t: float = 0.0) -> float:
    """Feeds a corruption detector ticks of pictures (25 fps, rule `frame`) with these probabilities; each
    picture over 0.5 comes with an analysis plane filled with its mark."""
    from engine.detectors.base import VideoMetrics

    for ps, ms in zip(probs, marks, strict=True):
        n = len(ps)
        p = np.array(ps)
        over = p >= 0.5
        plane = np.empty(n, dtype=object)
        bmap = np.empty(n, dtype=object)
        for i in np.flatnonzero(over):
            plane[i] = np.full((8, 8), ms[i], np.uint8)
            bmap[i] = np.zeros((2, 2), np.float16)
        box = np.full(n, 0.25)
        values = {"prob": p, "decision": over.astype(float), "threshold": np.full(n, 0.5), "hold": np.zeros(n),
                  "key": np.zeros(n, bool), "evidence": np.zeros(n), "plane": plane, "map": bmap,
                  "box_x": box, "box_y": box, "box_w": box, "box_h": box}
        pts = t + np.arange(n) / FPS
        det.on_video(VideoMetrics(stream="s", pts=pts, duration=np.full(n, 1 / FPS), values={det.request: values},
                                  small=None, last=None, prev_small=None))
        t += n / FPS
    return t


@pytest.mark.parametrize("judged", [False, True])
def test_review_keeps_the_likeliest_picture_of_the_whole_alert(tmp_path, judged) -> None:
    """The alert fires on pictures at 0.90; later in the same fault one scores 0.97: the review record and the
    event's value follow it, unless an operator already gave a verdict on the picture stored."""
    from engine.detectors.base import StreamContext
    from engine.detectors.corruption import CorruptionDetector

    events: list = []
    store = ReviewStore(tmp_path / "review")
    det = CorruptionDetector(CorruptionConfig(enabled=True, rule="frame"), StreamContext(stream="s", emit=events.append, extra={"review": store}))
    t = _ticks(det, [[0.9] * 10], [[1] * 10])
    (opened,) = events
    assert store.get(opened.id).probability == pytest.approx(0.9)
    if judged:
        store.label(opened.id, True)
    det.finish(_ticks(det, [[0.9] * 4 + [0.97] + [0.9] * 5, [0.1] * 20], [[1] * 4 + [2] + [1] * 5, [0] * 20], t))
    resolved = [e for e in events if e.status.value == "resolved"]
    assert len(resolved) == 1 and resolved[0].id == opened.id
    rec = store.get(opened.id, load=True)
    assert resolved[0].value == pytest.approx(0.97)
    want = (0.9, 1) if judged else (0.97, 2)
    assert (rec.probability, int(rec.plane.max())) == (pytest.approx(want[0]), want[1])
    assert rec.verdict is (True if judged else None)


def test_review_takes_the_likeliest_picture_from_the_tick_that_ends_the_alert(tmp_path) -> None:
    """The worst picture of a fault often comes late, in the tick where the stream heals and the alert resolves:
    the review record still follows it (it agrees with the event's value), and a new fault later in the same tick
    is reviewed with its own pictures, not the ended alert's."""
    from engine.detectors.base import StreamContext
    from engine.detectors.corruption import CorruptionDetector

    events: list = []
    store = ReviewStore(tmp_path / "review")
    det = CorruptionDetector(CorruptionConfig(enabled=True, rule="frame"), StreamContext(stream="s", emit=events.append, extra={"review": store}))
    t = _ticks(det, [[0.9] * 10], [[1] * 10])
    det.finish(_ticks(det, [[0.9] * 3 + [0.97] + [0.1] * 20 + [0.95] * 10 + [0.1] * 20],
                      [[1] * 3 + [2] + [0] * 20 + [3] * 10 + [0] * 20], t))
    resolved = [e for e in events if e.status.value == "resolved"]
    assert [e.value for e in resolved] == [pytest.approx(0.97), pytest.approx(0.95)]
    first, second = (store.get(e.id, load=True) for e in resolved)
    assert (first.probability, int(first.plane.max())) == (pytest.approx(0.97), 2)
    assert (second.probability, int(second.plane.max())) == (pytest.approx(0.95), 3)


def test_alert_plumbing_box_thumbnail_review_and_ignore(damaged_clip, tmp_path) -> None:
    """Independent of the model's quality: with a threshold every picture passes, the detector fires once from
    the first picture to the end, with the damage box, the model version, a marked thumbnail and a review
    record; with the whole picture ignored it never fires."""
    events, eng = _run(damaged_clip["clean"], tmp_path, threshold=1e-4)
    resolved = [e for e in events if e.status.value == "resolved"]
    assert [e.type for e in resolved] == ["corruption"]
    e = resolved[0]
    assert e.start == 0.0 and e.end == pytest.approx(4.0, abs=1 / FPS)
    assert e.threshold == pytest.approx(1e-4) and e.severity.value == "major"
    x, y, w, h = e.details["box"]
    assert 0 <= x < x + w <= 1 and 0 <= y < y + h <= 1
    assert e.details["model"] == eng.scoring.families["corruption"].slot(None).loaded.meta.version
    assert e.details["review"] is True and Path(e.thumbnail).is_file()
    rec = ReviewStore(tmp_path / "review").get(e.id, load=True)
    assert rec.plane.shape == (2, 184, 320) and rec.map.shape == (23, 40) and rec.verdict is None
    assert (tmp_path / "review" / e.id / "view.png").is_file()
    events, _ = _run(damaged_clip["clean"], None, threshold=1e-4, ignore=(Region(0, 0, 1, 1),))
    assert events == []


# --------------------------------------------------------------------------------- decisions over time
def test_gop_hold_holds_until_the_key_frame() -> None:
    from engine.detectors.corruption import GopHold

    t = np.arange(12) / FPS
    key = np.zeros(12, bool)
    key[[0, 8]] = True
    prob = np.array([0.1, 0.2, 0.9, 0.3, np.nan, 0.2, 0.1, 0.2, 0.1, 0.2, 0.9, 0.1])
    none = np.zeros(12, bool)
    faulty, level = GopHold().update(t, prob, key, none, 0.5, hold=True, use_evidence=False)
    # from the picture over the threshold to the next key frame, which starts afresh
    assert faulty.tolist() == [False, False] + [True] * 6 + [False, False, True, True]
    assert level[5] == pytest.approx(0.9) and level[8] == pytest.approx(0.1)
    # pictures by themselves, not analysed ones keeping the last decision (sample and hold)
    faulty, _ = GopHold().update(t, prob, key, none, 0.5, hold=False, use_evidence=False)
    assert faulty.tolist() == [False, False, True, False, False, False, False, False, False, False, True, False]
    # loss evidence counts with "hold+evidence" only
    ev = np.zeros(12, bool)
    ev[[1]] = True
    assert GopHold().update(t, prob, key, ev, 0.5, hold=True, use_evidence=True)[0][1]
    assert not GopHold().update(t, prob, key, ev, 0.5, hold=True, use_evidence=False)[0][1]
    # state carries over from one tick to the next, and a stream without key frames is released after max_hold
    g = GopHold(max_hold=0.21)  # the picture over the threshold at 0.08 s holds to 0.29 s
    g.update(t[:3], prob[:3], np.zeros(3, bool), none[:3], 0.5, hold=True, use_evidence=False)
    faulty, _ = g.update(t[3:], prob[3:], np.zeros(9, bool), none[3:], 0.5, hold=True, use_evidence=False)
    assert faulty.tolist() == [True] * 5 + [False, False, True, True]


def test_damage_tracker_marks_pictures_short_of_the_stream_s_fixed_slice_layout() -> None:
    """Once LAYOUT_RUN pictures in a row, a key frame among them, held the same number of slices, a picture
    with fewer lost one: it and what predicts from it until the next key frame are marked. A key frame with
    another count starts learning afresh, unmarked; slices cut by size (key frames hold more) never qualify."""
    from engine.decode.base import LAYOUT_RUN, DamageTracker

    def marked(counts: list[int], gop: int = 50) -> list[int]:
        d = DamageTracker()
        out = []
        for i, n in enumerate(counts):  # no B pictures: each picture leaves the decoder as its packet goes in
            d.note(i, i % gop == 0, False, slices=n)
            out += [i] if d.take(i) else []
        return out

    fixed = [4] * 120
    assert marked(fixed) == []
    lost = list(fixed)
    lost[LAYOUT_RUN + 5] = 3  # a P picture lost a slice once the layout is known: marked to the key frame at 50
    assert marked(lost) == list(range(LAYOUT_RUN + 5, 50))
    early = list(fixed)
    early[LAYOUT_RUN - 5] = 3  # before the layout is known: nothing to compare with
    assert marked(early) == []
    rekeyed = [4] * 50 + [2] * 70  # a new configuration from the key frame at 50, learnt again
    rekeyed[95] = 1
    assert marked(rekeyed) == list(range(95, 100))
    by_size = [9 if i % 50 == 0 else 3 - (i % 7 == 3) for i in range(150)]  # key frames cut into more slices
    assert marked(by_size) == []


def test_damage_tracker_marks_pictures_until_a_whole_key_frame() -> None:
    from engine.decode.base import DamageTracker

    def marks(packets, concealed=()) -> list[bool]:
        d = DamageTracker()
        for pts, key, flagged, rejected in packets:
            d.note(pts, key, flagged, rejected)
            if pts in concealed:
                d.concealed()
        return [d.take(p) for p in sorted(p[0] for p in packets)]

    # decode order: I0 P3 B1 B2 P6 B4 B5 I9 P12 B10 B11 I15; (pts, key, demuxer flag, decoder rejected)
    order = [(0, True), (3, False), (1, False), (2, False), (6, False), (4, False), (5, False), (9, True),
             (12, False), (10, False), (11, False), (15, True)]
    pts = sorted(p for p, _ in order)

    def run(flag=(), reject=(), concealed=()) -> list[int]:
        m = marks([(p, k, p in flag, p in reject) for p, k in order], concealed)
        return [p for p, x in zip(pts, m, strict=True) if x]

    # the demuxer's flag on a packet reports the next one short (its parser emits a picture while fed the next
    # PES): the flag on I0 is P3's loss, so I0 stays clean and the GOP from P3 on is marked
    assert run(flag={0}) == [1, 2, 3, 4, 5, 6]
    # a flag on the packet before a key frame: the key frame came in short and does not heal the stream
    assert run(flag={5}) == [9, 10, 11, 12]
    # a packet the decoder refused is damaged itself
    assert run(reject={3}) == [1, 2, 3, 4, 5, 6]
    # a picture the decoder concealed errors in marks what is decoded after it, to the next whole key frame
    # (the concealed picture itself is marked by its own flag, VideoFrame.damaged; here what follows it in
    # decode order: B4 and B5, until I9)
    assert run(concealed={6}) == [4, 5]


def test_damage_tracker_carries_a_concealed_picture_to_the_pictures_still_in_the_decoder() -> None:
    """The decoder's concealment flag comes with the picture, in display order, after the packets decoded
    behind it: the pictures among them that may predict from it are marked, to the next key frame; a whole key
    frame decoded before the flag arrived keeps its GOP clean."""
    from engine.decode.base import DamageTracker

    # decode order I0 P3 B1 B2 P6 B4 B5 I9 P12 B10 B11 I15, each packet with the pictures it lets out (a reference
    # picture leaves the decoder one packet late, a B picture at once: FFmpeg's has_b_frames = 1)
    steps = [(0, True, []), (3, False, [0]), (1, False, [1]), (2, False, [2]), (6, False, [3]), (4, False, [4]),
             (5, False, [5]), (9, True, [6]), (12, False, [9]), (10, False, [10]), (11, False, [11]),
             (15, True, [12]), (None, False, [15])]

    def run(concealed: set[int], old: bool = False) -> list[int]:
        d = DamageTracker()
        out = []
        for pts, key, leaving in steps:
            if pts is not None:
                d.note(pts, key, False, reference=key or pts % 3 == 0)
            for q in leaving:
                if d.take(q) or q in concealed:  # the concealed picture is marked by its own flag (VideoFrame)
                    out.append(q)
                if q in concealed:
                    d.concealed()
        return sorted(out)

    # P3 concealed, flagged when it leaves after P6 went in: P6 (still inside) and B4, B5 after it are marked;
    # B1 and B2 predict from P3 too but left before the flag came (the decoder's reorder delay)
    assert run({3}) == [3, 4, 5, 6]
    # P6 concealed, flagged after I9 went in whole: the GOP from I9 stays clean
    assert run({6}) == [6]
    assert run({1}) == [1]  # a B picture: nothing predicts from it


def test_h264_errors_the_decoder_only_logs_do_not_mark_a_whole_picture() -> None:
    """A key frame that holds a mangled NAL unit read as a P slice in an IDR NAL unit (box.mp4, a core sample
    clip, opens on an SEI that lost its header byte and reads so): FFmpeg's H.264 decoder refuses that unit with
    a logged error and decodes the picture whole. The error is counted, no picture is marked, and the pictures
    equal the stream's own. (The unit goes at the end of the picture, after its slices: before them, FFmpeg's
    parser would cut it off as a picture of its own.)"""
    import io

    import av

    from engine.decode.base import annex_b_units
    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.codec import decode_pictures, remux_packets

    frames = generated_frames(SourceSpec("sei", "generated", "test", seed=904, width=640, height=368, seconds=2.0))
    ts = encode_ts(frames, FPS, EncodeSpec("h264", 1_000_000, FPS))
    # NAL header 0x05 (an IDR slice), first_mb_in_slice 900 (of 920), slice_type 0 (P), pps 0
    bits = "000000000" + "1110000101" + "1" + "1" + "1" * 11
    bogus = b"\x00\x00\x01\x05" + int(bits, 2).to_bytes(4, "big") + bytes(range(1, 100))
    keys = iter(range(10**6))

    def mutate(b: bytes, key: bool) -> bytes:
        if not (key and next(keys) == 1):
            return b
        assert [b[i] & 0x1F for i in annex_b_units(b)][-1] == 5
        return b + bogus

    bad = remux_packets(ts, mutate)

    def decode(data: bytes) -> tuple[PyAVVideoDecoder, list]:
        with av.open(io.BytesIO(data), format="mpegts") as c:
            st = c.streams.video[0]
            dec = PyAVVideoDecoder(st)
            return dec, [x for p in c.demux(st) for x in dec.decode(p)] + dec.flush()

    (clean_dec, clean), (dec, got) = decode(ts), decode(bad)
    assert clean_dec.errors == 0 and dec.errors >= 1 and len(got) == len(clean) == 2 * FPS
    assert not any(f.damaged or f.corrupt for _, f in got)
    assert all(torch.equal(a.luma, b.luma) for (_, a), (_, b) in zip(clean, got, strict=True))
    assert not any(v[3] for v in decode_pictures(bad)[0].values())


def test_the_real_sample_clips_as_they_are_raise_no_corruption_event(tmp_path: Path) -> None:
    """The issue's target on the six real clips as the core fetched them (not re-encoded): `check` with the
    corruption detector on, model and loss evidence together, raises no corruption event."""
    from detect_media import run_check_cli, sample_or_skip

    clips = [sample_or_skip(n) for n in ("box.mp4", "cup.mp4", "Megamind.avi", "tree.avi", "vtest.avi", "cityCC0.mpg")]
    config = tmp_path / "corruption.yaml"
    config.write_text("detectors:\n  corruption:\n    enabled: true\n")
    rc, reports, stderr = run_check_cli(*clips, "--config", config, timeout=600)
    assert rc in (0, 1) and len(reports) == len(clips), stderr
    events = {Path(r["file"]).name: [(e["start"], e["end"]) for e in r["events"] if e["type"] == "corruption"]
              for r in reports}
    assert events == {c.name: [] for c in clips}
    assert next(r for r in reports if r["file"].endswith("box.mp4"))["video"]["decode_errors"] >= 1  # still counted


def test_damage_tracker_marks_a_non_reference_picture_alone() -> None:
    """Damage of a picture nothing predicts from (a B picture with nal_ref_idc 0) marks that picture and not the
    rest of the GOP; in an HEVC stream with temporal sub-layers the stream-wide mark stays."""
    from engine.decode.base import DamageTracker

    # decode order: I0 P3 B1 B2 P6 B4 B5 I9; B pictures are non-reference
    order = [(0, True), (3, False), (1, False), (2, False), (6, False), (4, False), (5, False), (9, True)]

    def run(flag=(), concealed=(), layered=False) -> list[int]:
        # each picture leaves the decoder right after its packet (no reordering delay): enough for the marks
        d = DamageTracker()
        out = []
        for pts, key in order:
            d.note(pts, key, pts in flag, False, reference=key or pts % 3 == 0, layered=layered)
            if d.take(pts):
                out.append(pts)
            if pts in concealed:
                d.concealed()
        return sorted(out)

    assert run(flag={3}) == [1]  # P3's flag: B1 came in short
    assert run(flag={1}) == [2]
    assert run(flag={2}) == [4, 5, 6]  # P6 came in short: a reference picture marks what is decoded after it
    assert run(concealed={1}) == []  # B1 concealed (marked by its own flag, VideoFrame.damaged): nothing predicts from it
    assert run(concealed={3}) == [1, 2, 4, 5, 6]
    assert run(flag={3}, layered=True) == [1, 2, 4, 5, 6]


def test_decoder_marks_a_damaged_non_reference_picture_alone() -> None:
    """40 garbled bytes in the middle of a non-reference B picture of an H.264 stream (one 2 s GOP): FFmpeg
    conceals that picture, and it alone is marked; the 1.5 s of pictures after it are whole and stay unmarked."""
    import io

    import av

    from engine.decode.base import picture_reference
    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.codec import remux_packets

    frames = generated_frames(SourceSpec("nonref", "generated", "test", seed=901, width=640, height=368, seconds=2.0))
    ts = encode_ts(frames, FPS, EncodeSpec("h264", 1_000_000, 2 * FPS))
    seen = {"packets": 0, "garbled": 0}

    def mutate(b: bytes, key: bool) -> bytes:
        seen["packets"] += 1
        if seen["packets"] > 12 and not seen["garbled"] and not picture_reference(b, "h264")[0]:
            seen["garbled"] = seen["packets"]
            a = bytearray(b)
            a[len(a) // 2: len(a) // 2 + 40] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
            return bytes(a)
        return b

    bad = remux_packets(ts, mutate)
    assert seen["garbled"]
    with av.open(io.BytesIO(bad), format="mpegts") as c:
        dec = PyAVVideoDecoder(c.streams.video[0], threads=1, low_delay=True)
        out = [x for p in c.demux(c.streams.video[0]) for x in dec.decode(p)] + dec.flush()
    marked = [(t, f.corrupt) for t, f in out if f.damaged]
    assert len(out) == 50 and len(marked) == 1 and marked[0][1] and marked[0][0] < 0.6, marked


@pytest.mark.parametrize("threads", [0, 1])
def test_decoder_marks_the_gop_after_an_error_the_hevc_decoder_only_logs(threads) -> None:
    """An HEVC key frame garbled after its first slice header (models.data.damage.damage_key_frame; the TS
    packets are whole, so the transport saw nothing): FFmpeg's HEVC decoder flags no picture (it conceals
    nothing) but logs the error. The pictures decoded from that key frame on are marked damaged, none before,
    in the engine's decoder (one thread: asked for, or by default) and in the data's decode alike."""
    import io

    import av

    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.codec import decode_pictures, remux_packets
    from models.data.damage import damage_key_frame

    frames = generated_frames(SourceSpec("logged", "generated", "test", seed=902, width=640, height=368, seconds=2.0))
    ts = encode_ts(frames, FPS, EncodeSpec("hevc", 1_000_000, FPS))
    rng = np.random.default_rng(5)  # a garble the decoder detects (most CABAC garbage decodes as valid syntax)
    keys = iter(range(10**6))

    def mutate(b: bytes, key: bool) -> bytes:
        return damage_key_frame(b, rng, "hevc") if key and next(keys) == 1 else b

    bad = remux_packets(ts, mutate)
    with av.open(io.BytesIO(bad), format="mpegts") as c:
        order = [(p.pts, bool(p.is_keyframe)) for p in c.demux(c.streams.video[0]) if p.size]  # decode order
    second = [i for i, (_, key) in enumerate(order) if key][1]
    want = {pts for pts, _ in order[second:]}
    with av.open(io.BytesIO(bad), format="mpegts") as c:
        st = c.streams.video[0]
        dec = PyAVVideoDecoder(st, threads=threads)
        got = [x for p in c.demux(st) for x in dec.decode(p)] + dec.flush()
    assert dec.errors >= 1 and not any(f.corrupt for _, f in got) and len(got) == len(order)
    marked = {round(t * 90_000) for t, f in got if f.damaged}
    assert len(want) >= 20 and marked == want, (sorted(marked), sorted(want))
    assert {pts for pts, v in decode_pictures(bad)[0].items() if v[3]} == marked


def _hevc_short_of_a_slice() -> tuple[bytes, bytes, int]:
    """HEVC in four slices per picture, and the same stream with one slice of one reference picture lost
    before the transport (whole TS packets: no demuxer flag), after the layout is learnt: (clean, damaged,
    index of the cut packet)."""
    from engine.decode.base import LAYOUT_RUN, picture_reference, slice_count
    from models.data.codec import remux_packets
    from models.data.damage import drop_slices

    frames = generated_frames(SourceSpec("sliced", "generated", "test", seed=903, width=640, height=368, seconds=3.0))
    ts = encode_ts(frames, FPS, EncodeSpec("hevc", 1_000_000, 2 * FPS, slices=4))
    seen = {"packets": 0, "cut": None}

    def mutate(b: bytes, key: bool) -> bytes:
        seen["packets"] += 1
        if seen["packets"] > LAYOUT_RUN + 4 and seen["cut"] is None and picture_reference(b, "hevc")[0] and not key:
            seen["cut"] = seen["packets"] - 1
            out = drop_slices(b, np.random.default_rng(0), "hevc", fraction=0.0)  # one slice
            assert slice_count(b, "hevc") == 4 and slice_count(out, "hevc") == 3
            return out
        return b

    bad = remux_packets(ts, mutate)
    assert seen["cut"] is not None
    return ts, bad, seen["cut"]


def test_decoder_marks_an_hevc_picture_that_lost_a_slice() -> None:
    """FFmpeg's HEVC decoder neither conceals nor reports the lost slice. The picture has fewer slices than the
    stream's layout: it and the pictures decoded after it until the key frame are marked, in the engine's
    decoder and in the data's decode; the stream as encoded has no mark."""
    import io

    import av

    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.codec import decode_pictures

    ts, bad, g = _hevc_short_of_a_slice()

    def decode(data: bytes) -> tuple[list, set[int]]:
        with av.open(io.BytesIO(data), format="mpegts") as c:
            st = c.streams.video[0]
            order = [(p.pts, bool(p.is_keyframe)) for p in c.demux(st) if p.size]
        with av.open(io.BytesIO(data), format="mpegts") as c:
            st = c.streams.video[0]
            dec = PyAVVideoDecoder(st)
            got = [x for p in c.demux(st) for x in dec.decode(p)] + dec.flush()
        assert dec.errors == 0 and not any(f.corrupt for _, f in got)
        return order, {round(t * 90_000) for t, f in got if f.damaged}

    assert decode(ts)[1] == set()
    order, marked = decode(bad)
    heal = next(i for i in range(g + 1, len(order)) if order[i][1])
    want = {pts for pts, _ in order[g:heal]}
    assert len(want) >= 5 and marked == want, (sorted(marked), sorted(want))
    assert {pts for pts, v in decode_pictures(bad)[0].items() if v[3]} == marked


def test_nvdec_pictures_take_key_flags_and_loss_evidence_from_their_packets() -> None:
    """NVDEC's pictures carry no key flag and NVDEC reports no loss, so NvdecVideoDecoder takes both from the
    packets it is fed, as the CPU decoder does (the corruption detector's hold ends at key frames and counts
    the loss). Without a GPU, NVDEC and the surface conversion are stood in for by the pictures PyAV's decoder
    gives for the same packets: same pts, same order. On the stream short of a slice, the stand-in's pictures
    get the CPU decoder's key flags and marks, picture for picture."""
    import io
    from types import SimpleNamespace

    import av

    from engine.decode.base import DamageTracker
    from engine.decode.nvdec import NvdecVideoDecoder
    from engine.decode.pyav import PyAVVideoDecoder

    _, bad, _ = _hevc_short_of_a_slice()
    with av.open(io.BytesIO(bad), format="mpegts") as c:
        st = c.streams.video[0]
        cpu = PyAVVideoDecoder(st)
        gpu = object.__new__(NvdecVideoDecoder)
        gpu.name, gpu.errors, gpu.fps, gpu.full, gpu.time_base = "hevc", 0, float(FPS), False, st.time_base
        gpu.damage = DamageTracker()
        tb = float(st.time_base)
        want: list[tuple[float | None, bool, bool]] = []

        def surfaces(packet):  # what NVDEC would hand back for this packet: the same pictures, by pts
            got = cpu.decode(packet) if packet is not None else cpu.flush()
            want.extend((t, f.key_frame, f.damaged) for t, f in got)
            return [SimpleNamespace(timestamp=round(t / tb)) for t, _ in got]

        gpu._surfaces = surfaces
        gpu._convert = lambda decoded: [(torch.zeros(1), torch.zeros(1), None, None)] * len(decoded)
        got = [x for p in c.demux(st) if p.size for x in gpu.decode(p)] + gpu.flush()
    assert [(pytest.approx(t), f.key_frame, f.damaged) for t, f in got] == want
    assert sum(k for _, k, _ in want) >= 2 and sum(d for _, _, d in want) >= 5


def test_slices_are_counted_only_in_annex_b_packets(tmp_path: Path) -> None:
    """MP4's packets are length-prefixed, and a NAL length of 256-511 bytes reads as a start code: slices are
    counted only in Annex B streams (MPEG-TS here), so an MP4 can never be taken for one short of a slice."""
    import av
    from media import write_clip

    from engine.decode.base import annex_b
    from engine.decode.pyav import PyAVVideoDecoder

    assert annex_b(b"") and annex_b(b"\x00\x00\x00\x01\x67") and not annex_b(b"\x01\x64\x00\x1f\xff")
    for suffix, want in ((".mp4", False), (".ts", True)):
        path = write_clip(tmp_path / f"c{suffix}", seconds=0.4, audio=False)
        with av.open(str(path)) as c:
            assert PyAVVideoDecoder(c.streams.video[0]).damage.annexb is want, suffix


def test_picture_reference_reads_slice_headers() -> None:
    """H.264 and HEVC B pictures from x264/x265 with two B frames: some are non-reference, key frames never; an
    MPEG-2 B picture is non-reference; bytes without a slice header count as reference."""
    import io

    import av

    from engine.decode.base import picture_reference

    frames = generated_frames(SourceSpec("ref", "generated", "test", seed=5, width=320, height=192, seconds=1.2))
    for codec in ("h264", "hevc"):
        ts = encode_ts(frames, FPS, EncodeSpec(codec, 400_000, 12))
        with av.open(io.BytesIO(ts), format="mpegts") as c:
            st = c.streams.video[0]
            seen = [(bool(p.is_keyframe), picture_reference(memoryview(p), codec)) for p in c.demux(st) if p.size]
        assert all(ref for key, (ref, _) in seen if key), codec
        assert not any(layered for _, (_, layered) in seen), codec
        nonref = sum(not ref for _, (ref, _) in seen)
        assert len(seen) // 6 <= nonref <= len(seen) // 2, (codec, seen)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as out:
        st = out.add_stream("mpeg2video", rate=FPS)
        st.width, st.height, st.pix_fmt = 320, 192, "yuv420p"
        st.codec_context.gop_size, st.codec_context.max_b_frames = 12, 2
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            f.pts = i
            for pk in st.encode(f):
                out.mux(pk)
        for pk in st.encode(None):
            out.mux(pk)
    with av.open(io.BytesIO(buf.getvalue()), format="mpegts") as c:
        st = c.streams.video[0]
        refs = [picture_reference(memoryview(p), "mpeg2video")[0] for p in c.demux(st) if p.size]
    assert refs[0] and refs.count(False) >= len(refs) // 3, refs
    assert picture_reference(b"\x47\x00\x11\x10" * 40, "h264") == (True, False)
    assert picture_reference(b"\x00\x00\x01\x01", "hevc") == (True, False)  # truncated header
    assert picture_reference(b"\x00\x00\x01\x01\x01\x00", "vp9") == (True, False)


def test_decoder_reports_lost_packets(damaged_clip) -> None:
    """The engine's PyAV decoder carries the demuxer's loss flags (TS continuity gaps) to the pictures they may
    damage: none on the clean stream, from the burst to the next key frame on the damaged one."""
    import av

    from engine.decode.pyav import PyAVVideoDecoder

    def flags(path: Path) -> list[tuple[float, bool]]:
        with av.open(str(path)) as c:
            dec = PyAVVideoDecoder(c.streams.video[0], threads=1, low_delay=True)
            out = [x for p in c.demux(c.streams.video[0]) for x in dec.decode(p)] + dec.flush()
        out = [(ts, f) for ts, f in out if ts is not None]
        t0 = min(ts for ts, _ in out)
        return sorted((round(ts - t0, 3), f.damaged) for ts, f in out)

    assert not any(d for _, d in flags(damaged_clip["clean"]))
    bad = flags(damaged_clip["bad"])
    marked = [t for t, d in bad if d]
    assert marked and marked[0] <= damaged_clip["first"] + 1e-6 and max(marked) < 2.0  # the key frame at 2 s heals


def test_decoder_marks_the_gop_of_a_key_frame_that_lost_packets(damaged_clip) -> None:
    """TS packets lost inside the key frame at 2 s: the demuxer flags the packet before it (its parser's one
    picture delay), and the damaged key frame must not clear the mark: every picture from 2 s to the end (no
    key frame after) carries it, none before, and the labels agree that the GOP is corrupt."""
    import av

    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.damage import TS, packets, pids

    ts = damaged_clip["clean"].read_bytes()
    pk = packets(ts)
    vid = np.flatnonzero(pids(pk) == video_pid(ts))
    # key frames start a PES (payload_unit_start) with the adaptation field's random access indicator set
    rai = [i for i in vid if pk[i, 1] & 0x40 and pk[i, 3] & 0x20 and pk[i, 4] > 0 and pk[i, 5] & 0x40]
    assert len(rai) == 2, rai  # 0 s and 2 s
    drop = vid[(vid > rai[1])][:30]  # inside the key frame's PES, its first packet kept
    bad = np.delete(pk, drop, axis=0).tobytes()
    assert len(bad) == len(ts) - 30 * TS
    path = damaged_clip["folder"] / "key_lost.ts"
    path.write_bytes(bad)

    with av.open(str(path)) as c:
        dec = PyAVVideoDecoder(c.streams.video[0], threads=1, low_delay=True)
        out = [x for p in c.demux(c.streams.video[0]) for x in dec.decode(p)] + dec.flush()
    t0 = min(ts_ for ts_, _ in out if ts_ is not None)
    marks = sorted((round(ts_ - t0, 3), f.damaged) for ts_, f in out if ts_ is not None)
    assert [t for t, d in marks if d] == [t for t, _ in marks if t >= 2.0 - 1e-6]

    clean, _ = decode_luma(ts)
    got, _ = decode_luma(bad)
    k0 = min(clean)
    lab = {round((k - k0) / 90_000, 3): label(block_mad(got[k], clean[k]), Recipe())[0] for k in set(clean) & set(got)}
    assert all(v != CORRUPT for t, v in lab.items() if t < 2.0)
    assert sum(v == CORRUPT for t, v in lab.items() if t >= 2.0) >= 10


def test_family_sends_one_picture_with_reported_loss_per_stream_and_tick(damaged_clip) -> None:
    """Pictures over the threshold all go to the host (alert and review evidence); of those under it that the
    transport reported loss on, only the likeliest of each stream per tick: a stream in a long loss must not
    copy every picture off the GPU."""
    lumas, _ = decode_luma(damaged_clip["bad"].read_bytes())
    ys = [torch.from_numpy(lumas[k]) for k in sorted(lumas)][16:28]

    def frames(lossy: bool) -> list[VideoFrame]:
        return [VideoFrame(pts=i / FPS, duration=1 / FPS, luma=y, small=torch.zeros(18, 32, dtype=torch.uint8),
                           damaged=lossy) for i, y in enumerate(ys)]

    fam = CorruptionFamily(torch.device("cpu"))
    req = MetricRequest("corruption", (("fps", 0), ("threshold", 0.999999), ("weights", None), ("previous", True)))
    a, b, c = frames(True), frames(True), frames(False)
    got = fam(_Batch([_Work("a", a[1:], prev=a[0]), _Work("b", b[1:], prev=b[0]), _Work("c", c[1:], prev=c[0])]),
              req, np.arange(33))
    assert not (got["decision"] == 1).any()
    kept = [j for j, p in enumerate(got["plane"]) if p is not None]
    assert kept == [int(np.argmax(got["prob"][:11])), 11 + int(np.argmax(got["prob"][11:22]))], kept
    # A threshold every picture passes: every picture is evidence.
    req = MetricRequest("corruption", (("fps", 0), ("threshold", 1e-6), ("weights", None), ("previous", True)))
    got = fam(_Batch([_Work("a", a[1:], prev=a[0])]), req, np.arange(11))
    assert all(p is not None for p in got["plane"])


def test_family_reads_key_frames_alone(damaged_clip) -> None:
    """A key frame heals a damaged stream with a change along the block grid: the model reads it without the
    picture before."""
    from models.train import frame_probabilities, pair
    from models.weights import SHIPPED, load

    lumas, _ = decode_luma(damaged_clip["bad"].read_bytes())
    ys = [torch.from_numpy(lumas[k]) for k in sorted(lumas)][48:52]
    frames = [VideoFrame(pts=i / FPS, duration=1 / FPS, luma=y, small=torch.zeros(18, 32, dtype=torch.uint8),
                         key_frame=(i == 2)) for i, y in enumerate(ys)]
    fam = CorruptionFamily(torch.device("cpu"))
    req = MetricRequest("corruption", (("fps", 0), ("threshold", None), ("weights", None), ("previous", True)))
    got = fam(_Batch([_Work("s", frames[1:], prev=frames[0])]), req, np.arange(3))
    model, meta = load(SHIPPED)
    p = [analysis_plane(y) for y in ys]
    want, _ = frame_probabilities(model, [pair(p[1], p[0]), pair(p[2], p[2]), pair(p[3], p[2])], torch.device("cpu"), meta.frame_blocks)
    assert np.allclose(got["prob"], want, atol=1e-5)
    assert got["key"].tolist() == [0.0, 1.0, 0.0] and got["evidence"].tolist() == [0.0, 0.0, 0.0]
