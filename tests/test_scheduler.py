"""The stream scheduler: NVDEC budgets, tiers, reasons, incremental changes, calibration. Pure CPU, seeded."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from engine.scheduler import (
    KNOWN_MODELS,
    Calibration,
    CpuModel,
    GpuModel,
    Plan,
    Scheduler,
    StreamDemand,
    Target,
    Tier,
    apply_calibration,
    cpu_cost,
    engine_cost,
    generic_model,
    load_calibration,
    match_model,
    stream_memory_mb,
)
from engine.scheduler.capacity import DECODE_MS_1080P_H264

H100 = KNOWN_MODELS["h100"]
H200 = KNOWN_MODELS["h200"]
SIZES = [(1280, 720), (1920, 1080), (2560, 1440), (3840, 2160)]
FREEZE = "detector 'freeze' needs every frame"


def mixed_streams(
    n: int,
    seed: int,
    every_frame: float,
    sizes: list[tuple[int, int]] = SIZES,
    rates: tuple[int, ...] = (25, 30, 50, 60),
) -> list[StreamDemand]:
    """H.264/HEVC streams from 720p to 4K; `every_frame` of them have a detector that needs every frame."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        w, h = rng.choice(sizes)
        ne = rng.random() < every_frame
        out.append(
            StreamDemand(
                f"s{k:04d}",
                rng.choice(["h264", "hevc"]),
                w,
                h,
                rng.choice(rates),
                nonref_fraction=rng.choice([0.0, 0.5, 0.66]),
                needs_every_frame=ne,
                every_frame_reason=FREEZE if ne else "",
            )
        )
    return out


def assert_within_budgets(sched: Scheduler, plan: Plan) -> None:
    for g in plan.gpus:
        model = sched.gpus[g.index]
        assert g.load_units <= model.nvdec_engines * (1 - sched.headroom) + 1e-9, g
        assert g.memory_mb <= model.memory_mb * (1 - sched.headroom) + 1e-9, g
        # The per-GPU figures are the sums of what was placed there.
        on = plan.on_gpu(g.index)
        assert g.streams == len(on)
        assert g.load_units == pytest.approx(sum(p.cost for p in on))
        assert g.memory_mb == pytest.approx(sum(p.memory_mb for p in on))
    assert plan.cpu_load_cores <= plan.cpu_budget_cores + 1e-9


# --- GPU models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100"),
        ("NVIDIA H100 PCIe", "NVIDIA H100"),
        ("NVIDIA H200", "NVIDIA H200"),
        ("nvidia h200 nvl", "NVIDIA H200"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
        ("NVIDIA A10", "NVIDIA A10"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("Tesla T4", "NVIDIA T4"),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA L40", None),
        ("NVIDIA A10G", None),
        ("", None),
    ],
)
def test_match_model(device: str, expected: str | None) -> None:
    m = match_model(device)
    assert (m.name if m else None) == expected


def test_match_model_takes_reported_memory() -> None:
    m = match_model("NVIDIA A100-PCIE-40GB", memory_mb=40960)
    assert m is not None and m.memory_mb == 40960 and m.nvdec_engines == 5


def test_table_follows_nvidia_figures() -> None:
    engines = {k: m.nvdec_engines for k, m in KNOWN_MODELS.items()}
    assert engines == {"h100": 7, "h200": 7, "a100": 5, "l4": 4, "l40s": 3, "a10": 2, "t4": 2}
    assert H200.per_engine_fps["h264"] == 640 and H200.per_engine_fps["hevc"] == 1093
    assert H100.per_engine_fps["h264"] == pytest.approx(640 * 1755 / 1545, abs=0.1)
    for key in ("h100", "h200", "a100", "t4"):
        assert not KNOWN_MODELS[key].supports("av1"), key
    for key in ("l4", "l40s", "a10"):
        m = KNOWN_MODELS[key]
        assert m.supports("AV1") and m.engine_fps("av1") == pytest.approx(
            0.9 * m.per_engine_fps["hevc"], abs=0.1
        )
    assert KNOWN_MODELS["h200"].memory_mb == 143771 and KNOWN_MODELS["l4"].memory_mb == 23034


def test_generic_model_is_conservative_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.scheduler"):
        g = generic_model("NVIDIA RTX 6000 Ada Generation", 49140)
    assert g.nvdec_engines == 2 and g.per_engine_fps["h264"] == 640 and not g.supports("av1")
    assert "not in the NVDEC table" in caplog.text


# --- stream cost --------------------------------------------------------------------------------------------


def test_stream_cost_by_tier() -> None:
    s = StreamDemand("a", "avc1", 3840, 2160, 50, gop_seconds=2.0, nonref_fraction=0.5)
    assert s.codec == "h264"
    assert s.decoded_fps(Tier.ALL) == 50
    assert s.decoded_fps(Tier.SKIP_NONREF) == 25
    assert s.decoded_fps(Tier.KEYFRAMES) == 0.5
    assert engine_cost(s, Tier.ALL, H200) == pytest.approx(50 * 4 / 640)
    assert engine_cost(s, Tier.KEYFRAMES, H200) == pytest.approx(0.5 * 4 / 640)
    full = stream_memory_mb(s, Tier.ALL)
    # Measured on an H200: one 1080p session ~79 MiB (26 NV12 frames) plus a queue of summaries (~4 frames).
    assert full == pytest.approx(3840 * 2160 * 1.5 * 30 / 2**20)
    assert stream_memory_mb(s, Tier.SKIP_NONREF) == full
    assert stream_memory_mb(s, Tier.KEYFRAMES) < full / 2
    # HEVC costs 1.5 x H.264 on the CPU; 4K is 4 x 1080p.
    hevc = replace(s, codec="hevc")
    assert (
        cpu_cost(hevc, Tier.ALL) == pytest.approx(1.5 * cpu_cost(s, Tier.ALL)) == pytest.approx(50 * 4 * 1.5)
    )


def test_candidate_tiers() -> None:
    assert StreamDemand("a", "h264", 1920, 1080, 30).candidate_tiers() == (
        Tier.ALL,
        Tier.SKIP_NONREF,
        Tier.KEYFRAMES,
    )
    # Unknown share of non-reference frames: skipping them saves nothing, so the tier is not offered.
    assert StreamDemand("a", "h264", 1920, 1080, 30, nonref_fraction=0).candidate_tiers() == (
        Tier.ALL,
        Tier.KEYFRAMES,
    )
    assert StreamDemand("a", "h264", 1920, 1080, 30, needs_every_frame=True).candidate_tiers() == (Tier.ALL,)
    assert StreamDemand("a", "h264", 1920, 1080, 30, allowed_tiers=("keyframes", "all")).allowed_tiers == (
        Tier.ALL,
        Tier.KEYFRAMES,
    )
    with pytest.raises(ValueError, match="needs every frame"):
        StreamDemand("a", "h264", 1920, 1080, 30, needs_every_frame=True, allowed_tiers=("keyframes",))
    with pytest.raises(ValueError, match="fps"):
        StreamDemand("a", "h264", 1920, 1080, 0)


def test_headroom_budget_is_85_percent_of_engines() -> None:
    sched = Scheduler([H200], headroom=0.15)
    plan = sched.snapshot()
    assert plan.gpus[0].budget_units == pytest.approx(7 * 0.85)
    assert plan.gpus[0].memory_budget_mb == pytest.approx(143771 * 0.85)
    # 1080p30 H.264 at full rate costs 30/640 of an engine: 5.95 units hold 126 of them, not 149 (7 engines).
    streams = [StreamDemand(f"s{i:03d}", "h264", 1920, 1080, 30, needs_every_frame=True) for i in range(150)]
    plan = sched.plan(streams)
    assert plan.summary()["on_gpu"] == int(7 * 0.85 * 640 / 30) == 126
    assert plan.gpus[0].load_fraction <= 1.0


# --- planning -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overloaded() -> tuple[Scheduler, list[StreamDemand], Plan]:
    streams = mixed_streams(1500, seed=7, every_frame=0.45)
    sched = Scheduler([H100] * 8)
    return sched, streams, sched.plan(streams)


def test_1500_streams_on_8_h100_respect_budgets_and_balance(overloaded) -> None:
    sched, streams, plan = overloaded
    assert len(plan.placements) == 1500
    assert_within_budgets(sched, plan)
    assert plan.imbalance() <= 0.05
    assert all(p.reason.strip() for p in plan.placements.values())
    summary = plan.summary()
    assert summary["streams"] == 1500 and summary["on_cpu"] == 0
    assert summary["downgraded"] > 0 and summary["refused"] > 0, summary


def test_downgrades_and_refusals_are_explained(overloaded) -> None:
    _, streams, plan = overloaded
    by_id = {s.id: s for s in streams}
    downgraded = plan.downgraded()
    assert downgraded
    for p in downgraded:
        assert not by_id[p.stream_id].needs_every_frame
        assert re.match(
            rf"gpu \d \(NVIDIA H100\): admitted in {p.tier.value} tier: .+; load [\d.]+% of budget$", p.reason
        ), p.reason
    for p in plan.refused():
        s = by_id[p.stream_id]
        assert p.gpu is None and p.tier is None
        assert (
            p.reason.startswith("refused: needs ")
            and "engine units" in p.reason
            and "largest free" in p.reason
        )
        assert "CPU decode has no spare capacity" in p.reason
        # Only streams that cannot be downgraded are refused while flexible ones are still admitted.
        assert s.needs_every_frame and FREEZE in p.reason, p.reason
    for p in plan.placements.values():
        if p.target is Target.GPU and p.tier is Tier.ALL:
            assert re.match(r"gpu \d \(NVIDIA H100\): fits at full rate; load [\d.]+% of budget$", p.reason)


def test_set_that_fits_runs_everything_at_full_rate() -> None:
    streams = mixed_streams(1500, seed=3, every_frame=0.3, sizes=SIZES[:2], rates=(25, 30))
    sched = Scheduler([H100] * 8)
    plan = sched.plan(streams)
    assert_within_budgets(sched, plan)
    assert all(p.target is Target.GPU and p.tier is Tier.ALL for p in plan.placements.values())
    assert all("fits at full rate" in p.reason for p in plan.placements.values())
    assert plan.imbalance() <= 0.05
    assert max(plan.gpu_load_fraction) < 1.0


def test_plan_is_deterministic() -> None:
    streams = mixed_streams(300, seed=11, every_frame=0.5)
    a = Scheduler([H100] * 4).plan(streams)
    b = Scheduler([H100] * 4).plan(list(reversed(streams)))
    assert a.placements == b.placements
    # Ties go to the lower GPU index.
    two = [StreamDemand(i, "h264", 1920, 1080, 30) for i in ("x", "y")]
    plan = Scheduler([H100, H100]).plan(two)
    assert (plan.placements["x"].gpu, plan.placements["y"].gpu) == (0, 1)


def test_memory_budget_downgrades_with_a_reason() -> None:
    small = GpuModel("Tiny", 7, 1545, {"h264": 640}, memory_mb=4000, codecs=frozenset({"h264"}))
    streams = [StreamDemand(f"s{i}", "h264", 3840, 2160, 25) for i in range(12)]
    sched = Scheduler([small])
    plan = sched.plan(streams)
    assert_within_budgets(sched, plan)
    full = [p for p in plan.placements.values() if p.tier is Tier.ALL]
    # Every stream is admitted at its cheapest tier first; the memory left pays for full-rate upgrades.
    budget = 4000 * 0.85
    per_full, per_cheap = (stream_memory_mb(streams[0], t) for t in (Tier.ALL, Tier.KEYFRAMES))
    upgrades = int((budget - 12 * per_cheap) // (per_full - per_cheap))
    assert 0 < len(full) <= upgrades
    assert len(plan.refused()) == 0
    cheap = plan.downgraded()
    assert cheap and all("MB of memory free" in p.reason or "MB that th" in p.reason for p in cheap)


# --- codecs and the CPU -------------------------------------------------------------------------------------


def test_av1_on_h100_is_refused_without_cpu() -> None:
    av1 = StreamDemand("cam-av1", "av1", 1920, 1080, 30)
    p = Scheduler([H100, H100]).add(av1)
    assert p.target is Target.REFUSED
    assert "AV1" in p.reason and "NVIDIA H100 has no AV1 decoder" in p.reason
    assert "CPU decode has no spare capacity" in p.reason


def test_av1_on_h100_goes_to_cpu_when_it_has_room() -> None:
    sched = Scheduler([H100], cpu_decode_fps=100)
    p = sched.add(StreamDemand("cam-av1", "av1", 1920, 1080, 30))
    assert p.target is Target.CPU and p.tier is Tier.ALL and p.gpu is None
    assert p.cost == pytest.approx(30 * 2.0 * DECODE_MS_1080P_H264 / 1000)  # cores
    assert "AV1 decoder" in p.reason and p.reason.startswith("cpu: decoded on CPU threads at full rate")
    # The next one only fits on the CPU in a cheaper tier; one that needs every frame is refused.
    q = sched.add(StreamDemand("cam2", "av1", 1920, 1080, 30))
    assert q.target is Target.CPU and q.tier is Tier.SKIP_NONREF
    r = sched.add(StreamDemand("cam3", "av1", 1920, 1080, 30, needs_every_frame=True))
    assert r.target is Target.REFUSED and "AV1" in r.reason and "the CPU has" in r.reason
    assert sched.snapshot().cpu_load_cores <= sched.snapshot().cpu_budget_cores + 1e-9


def test_hybrid_cpu_takes_full_rate_before_gpu_downgrades() -> None:
    sched = Scheduler([H200], cpu_decode_fps=200)
    streams = [StreamDemand(f"s{i:03d}", "h264", 1920, 1080, 30, needs_every_frame=True) for i in range(130)]
    plan = sched.plan(streams)
    assert plan.summary()["on_gpu"] == 126 and plan.summary()["on_cpu"] == 4
    cpu = [p for p in plan.placements.values() if p.target is Target.CPU]
    assert all("no GPU had 0.05 engine units free at full rate" in p.reason for p in cpu)


def test_keyframes_tier_admits_2000_1080p30_streams_on_one_h200() -> None:
    streams = [StreamDemand(f"k{i:04d}", "h264", 1920, 1080, 30, gop_seconds=2.0) for i in range(2500)]
    sched = Scheduler([H200])
    plan = sched.plan(streams)
    assert_within_budgets(sched, plan)
    s = plan.summary()
    assert s["refused"] == 0 and s["on_gpu"] == 2500, s
    assert s["tiers"]["keyframes"] >= 2000
    only_kf = [replace(x, allowed_tiers=(Tier.KEYFRAMES,)) for x in streams]
    plan = Scheduler([H200]).plan(only_kf)
    assert plan.summary()["on_gpu"] == 2500 and plan.gpus[0].memory_mb < plan.gpus[0].memory_budget_mb


# --- incremental changes ------------------------------------------------------------------------------------


@pytest.fixture
def fitting() -> tuple[Scheduler, Plan]:
    streams = mixed_streams(400, seed=5, every_frame=0.3, sizes=SIZES[:3], rates=(25, 30))
    sched = Scheduler([H100] * 8)
    return sched, sched.plan(streams)


def test_add_places_on_least_loaded_and_moves_nobody(fitting) -> None:
    sched, before = fitting
    p = sched.add(StreamDemand("new", "hevc", 1920, 1080, 50))
    after = sched.snapshot()
    fracs = before.gpu_load_fraction
    assert p.target is Target.GPU and p.gpu == min(range(8), key=lambda i: (fracs[i], i))
    assert {k: v for k, v in after.placements.items() if k != "new"} == dict(before.placements)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(StreamDemand("new", "h264", 1280, 720, 25))


def test_remove_upgrades_downgraded_stream_in_place() -> None:
    big = [StreamDemand(f"big{i:02d}", "h264", 3840, 2160, 60, needs_every_frame=True) for i in range(36)]
    sched = Scheduler([H100, H100])
    sched.plan(big)
    flex = sched.add(StreamDemand("flex", "h264", 1920, 1080, 30))
    assert flex.tier is Tier.KEYFRAMES and "no GPU had 0.04 engine units free at full rate" in flex.reason
    before = sched.snapshot()
    neighbour = next(p.stream_id for p in before.on_gpu(flex.gpu) if p.stream_id != "flex")
    changes = sched.remove(neighbour)
    after = sched.snapshot()
    assert [c.stream_id for c in changes] == ["flex"]
    up = after.placements["flex"]
    assert up.gpu == flex.gpu and up.tier is Tier.ALL and "upgraded in place" in up.reason
    unchanged = {k: v for k, v in after.placements.items() if k != "flex"}
    assert unchanged == {k: v for k, v in before.placements.items() if k not in ("flex", neighbour)}
    with pytest.raises(KeyError):
        sched.remove(neighbour)


def test_remove_admits_refused_stream() -> None:
    sched = Scheduler([H200])
    streams = [StreamDemand(f"s{i:03d}", "h264", 1920, 1080, 30, needs_every_frame=True) for i in range(127)]
    plan = sched.plan(streams)
    (refused,) = plan.refused()
    changes = sched.remove("s000")
    assert [c.stream_id for c in changes] == [refused.stream_id]
    assert changes[0].target is Target.GPU and "admitted after capacity was freed" in changes[0].reason


def test_fail_gpu_moves_only_its_streams_and_restore_rebalance(fitting) -> None:
    sched, before = fitting
    victims = {p.stream_id for p in before.on_gpu(3)}
    moved = sched.fail_gpu(3)
    after = sched.snapshot()
    assert {p.stream_id for p in moved} == victims
    assert not after.on_gpu(3) and after.gpus[3].load_units == 0 and not after.gpus[3].usable
    assert all(p.reason.startswith("moved off failed gpu 3: ") for p in moved)
    assert all(after.placements[k] == v for k, v in before.placements.items() if k not in victims)
    assert_within_budgets(sched, after)
    assert sched.fail_gpu(3) == []

    # Back in service, nothing moves by itself; rebalance fills it with few moves.
    assert sched.restore_gpu(3) == []
    assert sched.snapshot().imbalance(include_idle=True) > 0.5
    moves = sched.rebalance(max_moves=200)
    final = sched.snapshot()
    assert final.imbalance(include_idle=True) <= 0.05
    assert 0 < len(moves) <= len(victims)
    assert all(m.gpu == 3 for m in moves) and all("moved from gpu" in m.reason for m in moves)
    moved_ids = {m.stream_id for m in moves}
    assert all(final.placements[k] == v for k, v in after.placements.items() if k not in moved_ids)
    assert_within_budgets(sched, final)


def test_rebalance_after_removals_uses_few_moves(fitting) -> None:
    sched, before = fitting
    on0 = sorted(p.stream_id for p in before.on_gpu(0))
    for sid in on0[: 2 * len(on0) // 3]:
        sched.remove(sid)
    skewed = sched.snapshot().imbalance()
    assert skewed > 0.3
    moves = sched.rebalance(max_moves=100)
    assert sched.snapshot().imbalance() <= 0.05
    assert len(moves) <= len(on0) // 2
    # Already balanced: nothing to do.
    assert sched.rebalance() == []


def test_fail_all_gpus_refuses_with_reason() -> None:
    sched = Scheduler([H100])
    sched.plan([StreamDemand("a", "h264", 1920, 1080, 30)])
    (p,) = sched.fail_gpu(0)
    assert p.target is Target.REFUSED and "no GPU is usable (failed: gpu 0)" in p.reason
    (q,) = sched.restore_gpu(0)
    assert q.target is Target.GPU and q.tier is Tier.ALL


def test_concurrent_adds_are_safe() -> None:
    sched = Scheduler([H100] * 4)
    streams = mixed_streams(800, seed=9, every_frame=0.2)
    chunks = [streams[i::8] for i in range(8)]
    threads = [threading.Thread(target=lambda c=c: [sched.add(s) for s in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plan = sched.snapshot()
    assert len(plan.placements) == 800
    assert_within_budgets(sched, plan)


# --- calibration --------------------------------------------------------------------------------------------


def test_calibration_round_trip_and_apply(tmp_path: Path) -> None:
    cal = Calibration(
        gpu_name="NVIDIA H100 80GB HBM3", engines=7, per_engine_fps={"h264": 800.0}, gpu_fps={"h265": 7000.0}
    )
    path = tmp_path / "cal.json"
    cal.save(path)
    loaded = load_calibration(path)
    assert loaded == cal and loaded.source == "framewatch bench" and loaded.framewatch_version
    m = apply_calibration(H100, loaded)
    assert m.per_engine_fps["h264"] == 800 and m.per_engine_fps["hevc"] == pytest.approx(1000)
    assert m.per_engine_fps["vp9"] == H100.per_engine_fps["vp9"]
    assert m.nvdec_engines == 7 and H100.per_engine_fps["h264"] != 800


def test_calibration_reads_the_bench_file(tmp_path: Path) -> None:
    # What `framewatch bench --calibration` writes: whole-GPU 1080p ceilings, no engine count.
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "gpu": "NVIDIA H100 80GB HBM3",
                "gpu_fps_1080p": {"h264": 5600.0, "hevc": 9100.0},
                "decoder_util": {"h264": 97.0, "hevc": None},
                "source": "framewatch bench",
                "date": "2025-01-01T00:00:00Z",
            }
        )
    )
    cal = load_calibration(path)
    assert cal.gpu_name == "NVIDIA H100 80GB HBM3" and cal.engines is None
    m = apply_calibration(H100, cal)
    assert m.per_engine_fps["h264"] == pytest.approx(800) and m.per_engine_fps["hevc"] == pytest.approx(1300)
    assert Scheduler([m]).snapshot().gpus[0].budget_units == pytest.approx(7 * 0.85)


def test_calibration_for_another_gpu_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    cal = Calibration(gpu_name="NVIDIA L4", engines=4, per_engine_fps={"h264": 999.0})
    with caplog.at_level(logging.WARNING, logger="engine.scheduler"):
        assert apply_calibration(H100, cal) is H100
    assert "ignored" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"gpu_name": "NVIDIA H100", "engines": 0, "per_engine_fps": {"h264": 1}}), "engines"),
        (json.dumps({"gpu_name": "NVIDIA H100", "engines": 7}), "no measured rates"),
        (
            json.dumps({"gpu_name": "NVIDIA H100", "engines": 7, "per_engine_fps": {"h264": -5}}),
            "must be > 0",
        ),
    ],
)
def test_bad_calibration_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_calibration(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"calibration file {path}: ")


# --- CPU engines: admission control in cores ------------------------------------------------------------------


def _cpu_stream(i: int, **kw) -> StreamDemand:
    return StreamDemand(f"c{i:02d}", kw.pop("codec", "h264"), kw.pop("width", 1920), kw.pop("height", 1080),
                        kw.pop("fps", 30.0), **kw)


def test_cpu_model_costs_pictures_decoding_and_audio() -> None:
    cpu = CpuModel(cores=2)
    s = _cpu_stream(0, clicks=True)
    # 30 pictures of (9.2 ms decoding + 1.0 ms the rest) and audio with clicks (19 + 58 ms) a second.
    assert cpu.cost(s, Tier.ALL) == pytest.approx((30 * 10.2 + 77) / 1000)
    assert cpu.scoring_cost(s, Tier.ALL) == pytest.approx((30 * 0.8 + 77) / 1000)
    assert cpu.cost(s, Tier.KEYFRAMES) == pytest.approx((0.5 * 10.2 + 77) / 1000)
    hevc = replace(s, codec="hevc", clicks=False, audio=False)
    assert cpu.cost(hevc, Tier.ALL) == pytest.approx(30 * (9.2 * 1.5 + 1.0) / 1000)
    assert cpu.cost(replace(s, paced=False), Tier.ALL) == 0.0  # a file read as fast as it goes: not budgeted
    with pytest.raises(ValueError, match="cores"):
        CpuModel(cores=0)
    with pytest.raises(ValueError, match="cores"):
        CpuModel(cores=float("nan"))


def test_cpu_engine_admits_every_stream_before_decoding_some_in_full() -> None:
    cpu = CpuModel(cores=2)
    sched = Scheduler([], cpu=cpu)
    streams = [_cpu_stream(i, clicks=True) for i in range(10)]
    plan = sched.plan(streams)
    s = plan.summary()
    assert s["refused"] == 0 and s["on_cpu"] == 10 and s["on_gpu"] == 0, s
    full = [p for p in plan.placements.values() if p.tier is Tier.ALL]
    # 0.383 cores each in full, 0.082 in keyframes: two in full, one skipping non-reference frames, the rest
    # keyframes (largest first, ties in id order), which leaves each later stream its cheapest tier.
    assert {p.stream_id: p.tier.value for p in plan.placements.values()} == {
        "c00": "all", "c01": "all", "c02": "skip_nonref", **{f"c{i:02d}": "keyframes" for i in range(3, 10)}}
    assert s["downgraded"] == 8
    assert plan.cpu_budget_cores == pytest.approx(1.7) and plan.cpu_load_cores <= plan.cpu_budget_cores + 1e-9
    assert plan.cpu_scoring_cores <= plan.cpu_scoring_budget_cores + 1e-9
    for p in full:
        assert p.reason.startswith("cpu: fits at full rate; CPU at ") and "of 1.70 cores" in p.reason, p.reason
    low = next(p for p in plan.placements.values() if p.downgraded)
    assert low.reason.startswith(f"cpu: admitted in {low.tier.value} tier: ") and "cores" in low.reason, low.reason


def test_cpu_engine_refuses_what_needs_every_frame_with_the_reason() -> None:
    sched = Scheduler([], cpu=CpuModel(cores=1))
    every = [_cpu_stream(i, needs_every_frame=True, every_frame_reason="detector 'freeze' needs every frame")
             for i in range(4)]
    ps = [sched.add(s) for s in every]
    # 0.306 cores each (no audio analysis asked for here: audio defaults on, clicks off: +19 ms) of 0.85.
    assert [p.target for p in ps] == [Target.CPU, Target.CPU, Target.REFUSED, Target.REFUSED]
    r = ps[2]
    assert r.reason == (
        "refused: the CPU has 0.200 of 0.850 cores free and the stream needs 0.325 at full rate "
        "(all is its cheapest allowed tier: detector 'freeze' needs every frame)"), r.reason
    # Freed capacity admits the first refused stream, without touching the others.
    changes = sched.remove("c00")
    assert [(p.stream_id, p.target) for p in changes] == [("c02", Target.CPU)]
    assert changes[0].reason.startswith("admitted after capacity was freed: cpu: fits at full rate")


def test_cpu_engine_scoring_thread_binds_on_a_big_machine() -> None:
    # 64 cores, one engine process: its scoring thread runs every stream's kernels and fills up first.
    streams = [_cpu_stream(i, clicks=True, needs_every_frame=True) for i in range(20)]
    plan = Scheduler([], cpu=CpuModel(cores=64)).plan(streams)
    on = plan.summary()["on_cpu"]
    assert on == int(0.85 / ((30 * 0.8 + 77) / 1000)) == 8
    assert plan.cpu_load_cores < 0.1 * plan.cpu_budget_cores
    refused = plan.refused()[0]
    assert "the CPU engine's scoring thread has" in refused.reason and "cores free" in refused.reason
    # Four engine processes, four scoring threads.
    plan4 = Scheduler([], cpu=CpuModel(cores=64, scoring_threads=4)).plan(streams)
    assert plan4.summary()["on_cpu"] == 20


def test_cpu_engine_upgrades_in_place_when_capacity_frees() -> None:
    sched = Scheduler([], cpu=CpuModel(cores=1))
    ps = [sched.add(_cpu_stream(i, audio=False)) for i in range(3)]
    assert [p.tier for p in ps] == [Tier.ALL, Tier.ALL, Tier.SKIP_NONREF]
    changes = sched.remove("c00")
    assert [(p.stream_id, p.tier) for p in changes] == [("c02", Tier.ALL)]
    assert changes[0].reason.startswith("cpu: upgraded in place from the skip_nonref tier to full rate")


# --- what a stream turns out to be once open ------------------------------------------------------------------


def test_update_moves_only_the_stream_that_turned_out_dearer() -> None:
    one = replace(H100, name="H100 (one engine)", nvdec_engines=1)
    sched = Scheduler([one, one])
    planned = [StreamDemand(f"s{i}", "h264", 3840, 2160, 30, needs_every_frame=True) for i in range(4)]
    for s in planned:
        assert sched.add(s).target is Target.GPU
    before = {sid: p.gpu for sid, p in sched.snapshot().placements.items()}
    assert sched.update(planned[0]) == []  # nothing new
    # s0 is really 8K60 (1.3 engine units): it fits on no GPU and needs every frame: refused, nobody moves.
    changes = sched.update(replace(planned[0], width=7680, height=4320, fps=60))
    assert [c.stream_id for c in changes] == ["s0"] and changes[0].target is Target.REFUSED
    assert changes[0].reason.startswith(
        "re-planned once open, as 7680x4320 H.264 at 60 fps (planned as 3840x2160 H.264 at 30 fps): refused: ")
    after = sched.snapshot()
    assert {sid: p.gpu for sid, p in after.placements.items() if sid != "s0"} == {k: v for k, v in before.items() if k != "s0"}
    assert all(g.load_units <= g.budget_units + 1e-9 for g in after.gpus)
    with pytest.raises(KeyError):
        sched.update(StreamDemand("nope", "h264", 640, 360, 25))


def test_update_gives_what_a_stream_does_not_need_to_refused_and_downgraded_streams() -> None:
    sched = Scheduler([], cpu=CpuModel(cores=1))
    a, b, c = (_cpu_stream(i, audio=False, needs_every_frame=True) for i in range(3))
    assert [sched.add(s).target for s in (a, b, c)] == [Target.CPU, Target.CPU, Target.REFUSED]
    # a is really 640x360 at 25 fps: it stays where it is (cheaper), and c gets the cores it freed.
    changes = sched.update(replace(a, width=640, height=360, fps=25))
    assert [(p.stream_id, p.target) for p in changes] == [("c00", Target.CPU), ("c02", Target.CPU)]
    assert changes[0].tier is Tier.ALL and changes[0].cost == pytest.approx(25 * (9.2 * 640 * 360 / 1920 / 1080 + 1) / 1000)
    assert changes[1].reason.startswith("admitted after capacity was freed: cpu: fits at full rate")


def test_replace_gives_a_changed_stream_the_first_claim_on_its_capacity() -> None:
    """A stream changed by the operator is placed again before any refused stream may take what it had; what
    it no longer needs goes to them."""
    sched = Scheduler([], cpu=CpuModel(cores=1))
    a, b, c = (_cpu_stream(i, audio=False, needs_every_frame=True) for i in range(3))
    assert [sched.add(s).target for s in (a, b, c)] == [Target.CPU, Target.CPU, Target.REFUSED]
    changes = sched.replace(replace(a, clicks=True))
    assert [(p.stream_id, p.target) for p in changes] == [("c00", Target.CPU)]
    assert sched.placement("c02").target is Target.REFUSED
    # Changed to something cheaper: c gets the cores freed.
    changes = sched.replace(replace(a, width=640, height=360))
    assert [(p.stream_id, p.target) for p in changes] == [("c00", Target.CPU), ("c02", Target.CPU)]
    # A refused stream changed is placed again too (here: still no room).
    assert [p.target for p in sched.replace(replace(c, fps=60))] == [Target.REFUSED]
    with pytest.raises(KeyError):
        sched.replace(_cpu_stream(9))
