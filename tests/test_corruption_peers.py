"""The corruption benchmark's peer scorers (benchmarks/corruption_peers.py): exact values on hand-made
pictures and score arrays, so the benchmark's comparison rests on checked numbers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "corruption_peers.py"
_spec = importlib.util.spec_from_file_location("corruption_peers", _PATH)
assert _spec is not None and _spec.loader is not None
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")

H, W = 64, 96


def smooth() -> np.ndarray:
    """A ramp: every horizontal step is 2, every vertical step 1; no block grid."""
    y, x = np.mgrid[0:H, 0:W]
    return (2 * x + y).astype(np.uint8)


def blocky() -> np.ndarray:
    """The ramp quantised per 8x8 block: flat inside blocks, steps of 16 / 8 across their boundaries."""
    y, x = np.mgrid[0:H, 0:W]
    return (16 * (x // 8) + 8 * (y // 8) + 8).astype(np.uint8)


def textured(picture: np.ndarray, seed: int) -> np.ndarray:
    """Adds fixed small noise, so no step is exactly zero and blockdetect's scores stay finite."""
    noise = np.random.default_rng(seed).integers(-2, 3, picture.shape)
    return np.clip(picture.astype(np.int64) + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- metrics


def test_best_threshold_known_answer() -> None:
    # t=0.8: F1 2/3; t=0.4: 1/2; t=0.35: 4/5; t=0.1: 2/3.
    assert cp.best_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == (0.35, 0.8)


def test_best_threshold_ties_go_to_the_lowest_threshold() -> None:
    # t=4 and t=1 both give F1 2/3 (tp1 fp0 fn1 and tp2 fp2 fn0); t=3: 1/2, t=2: 2/5.
    scores, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 0, 1])
    assert cp.best_threshold(scores, labels) == (1.0, 2 / 3)
    assert cp.best_threshold(scores[::-1], labels[::-1]) == (1.0, 2 / 3)


def test_best_threshold_repeated_scores_are_one_candidate() -> None:
    # The two 0.5s are predicted together: t=0.9: 1/2, t=0.5: 2/3, t=0.2: 6/7.
    scores, labels = np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 1, 1])
    assert cp.best_threshold(scores, labels) == (0.2, 6 / 7)


def test_best_threshold_edge_cases() -> None:
    # No positives: every F1 is 0, so the lowest score.
    assert cp.best_threshold(np.array([0.3, 0.1, 0.2]), np.array([0, 0, 0])) == (0.1, 0.0)
    # +inf (blockdetect on a picture that is flat inside its blocks) is an ordinary, top-ranked score.
    assert cp.best_threshold(np.array([np.inf, 1.0, 0.5]), np.array([1, 0, 0])) == (np.inf, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        cp.best_threshold(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        cp.best_threshold(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="length"):
        cp.best_threshold(np.array([0.1, 0.2]), np.array([0]))


def test_best_threshold_agrees_with_brute_force_prf_at() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(1, 15))
        scores = rng.integers(0, 6, n) / 2.0  # few distinct values: many ties
        labels = rng.integers(0, 2, n)
        candidates = sorted(set(scores.tolist()))
        f1s = [cp.prf_at(scores, labels, t)["f1"] for t in candidates]
        best = max(f1s)
        assert cp.best_threshold(scores, labels) == (candidates[f1s.index(best)], best)


def test_prf_at_counts_and_rates() -> None:
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert cp.prf_at(scores, labels, 0.4) == {"precision": 0.5, "recall": 0.5, "f1": 0.5,
                                              "tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert cp.prf_at(scores, labels, 0.35) == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                               "tp": 2, "fp": 1, "fn": 0, "tn": 1}


def test_prf_at_zero_divisions_are_zero() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # Nothing predicted positive: precision 0/0.
    assert cp.prf_at(scores, np.array([0, 0, 1, 1]), 0.9) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                             "tp": 0, "fp": 0, "fn": 2, "tn": 2}
    # Nothing labelled positive and nothing predicted: every ratio 0/0.
    assert cp.prf_at(scores, np.zeros(4, int), 0.9) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                       "tp": 0, "fp": 0, "fn": 0, "tn": 4}


# --------------------------------------------------------------------------------------------- blockiness


def test_blockiness_exact_on_ramp_and_block_grid() -> None:
    # Ramp: boundary step 2, interior step 2 -> (2 + 0.5) / (2 + 0.5) = 1. Blocks: boundary step 16,
    # interior 0 -> (16 + 0.5) / (0 + 0.5) = 33 (the kernel's floor is 0.5).
    frames = np.stack([smooth(), blocky()] * 40)  # 80 frames: more than one kernel batch
    scores, cpu = cp.blockiness_scores(frames)
    assert scores.dtype == np.float64 and scores.shape == (80,)
    np.testing.assert_array_equal(scores, np.tile([1.0, 33.0], 40))
    assert cpu > 0


def test_blockiness_reads_every_height_over_54th_row() -> None:
    # 1080 lines: the engine reads rows 0, 20, 40, ... Only those carry a block grid here, so the score is
    # the grid's exact 33; any other sampling would mix in the ramp rows (score 1).
    x = np.arange(W)
    picture = np.tile((2 * x + 5).astype(np.uint8), (1080, 1))
    picture[::20] = (16 * (x // 8) + 8).astype(np.uint8)
    scores, _ = cp.blockiness_scores(picture[None])
    assert scores.tolist() == [33.0]


def test_blockiness_textured_block_grid_scores_higher() -> None:
    scores, _ = cp.blockiness_scores(np.stack([textured(smooth(), 1), textured(blocky(), 2)]))
    assert np.isfinite(scores).all()
    assert scores[1] > 2 * scores[0]


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="uint8"):
        cp.blockiness_scores(np.zeros((2, H, W), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        cp.blockdetect_scores(np.zeros((H, W), np.uint8))


def test_blockdetect_without_ffmpeg_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cp.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="ffmpeg CLI"):
        cp.blockdetect_scores(np.stack([smooth()]))


# --------------------------------------------------------------------------------------------- blockdetect


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_blockdetect_textured_block_grid_scores_higher() -> None:
    frames = np.stack([textured(smooth(), 1), textured(blocky(), 2), textured(smooth(), 3)])
    scores, cpu = cp.blockdetect_scores(frames)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert np.isfinite(scores).all()
    assert scores[1] > 2 * max(scores[0], scores[2])
    assert cpu > 0


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_blockdetect_fresh_state_equals_each_frame_alone() -> None:
    # Ramp: 1 (every step alike). Blocks: inf (no step inside a block). Flat: blockdetect's 0/0 NaN -> 0.
    frames = np.stack([smooth(), blocky(), np.full((H, W), 128, np.uint8), smooth()])
    scores, _ = cp.blockdetect_scores(frames)
    np.testing.assert_array_equal(scores, [1.0, np.inf, 0.0, 1.0])
    alone = [cp.blockdetect_scores(f[None])[0][0] for f in frames]
    np.testing.assert_array_equal(scores, alone)


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_blockdetect_stream_run_carries_state() -> None:
    # The ordinary single pass: the first frame agrees, later ones are running figures over the stream.
    frames = np.stack([smooth(), blocky(), smooth()])
    carried, _ = cp.blockdetect_scores(frames, fresh_state=False)
    assert carried.shape == (3,)
    assert carried[0] == 1.0
    if carried[2] == 1.0:
        pytest.skip("this FFmpeg's blockdetect no longer carries state between frames")
    assert carried[2] > 1.0


@pytest.mark.ffmpeg
@needs_ffmpeg
def test_the_cost_only_benchmark_measures_each_method_on_the_held_out_frames(tmp_path) -> None:
    """`corruption_vs_blockdetect.py --cost-only` (the costs on another machine, where the F1 figures would only
    repeat): each method's CPU time on the held-out split's native frames, the ratio, and which CPU gave them."""
    import json
    import types

    from models.data.content import SourceSpec
    from models.data.damage import DamageSpec
    from models.data.generate import Recipe, build, load_split

    spec = importlib.util.spec_from_file_location("corruption_vs_blockdetect", _PATH.parent / "corruption_vs_blockdetect.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = Recipe(sources=(SourceSpec("c-test", "generated", "test", seed=21, width=320, height=192, seconds=1.2),),
               codecs=("h264",), damages=(DamageSpec("burst", 1.0, (10, 30)),), clean_per_codec=3, per_decode=(4, 2),
               synthetic_share=0.0, native_splits=("test",), draws=())
    folder = build(r, tmp_path, workers=1)
    out = tmp_path / "cost.json"
    bench._costs(types.SimpleNamespace(weights=str(bench.SHIPPED), out=str(out)), folder)
    got = json.loads(out.read_text())
    assert got["test_frames"] == sum(len(s.labels) for s in load_split(folder, "test")) > 0
    cnn = got["framewatch_cnn"]["cpu_ms_per_1080p_frame_1_thread"]
    bd = got["ffmpeg_blockdetect"]["cpu_ms_per_1080p_frame"]
    assert cnn > 0 and bd > 0 and got["core_blockiness"]["cpu_ms_per_1080p_frame"] > 0
    assert got["framewatch_cnn"]["cpu_ms_per_1080p_frame_2_threads"] > 0
    assert got["cnn_over_blockdetect"] == pytest.approx(cnn / bd, abs=0.01)
    assert got["machine"]["simd"] and got["machine"]["cores"] >= 1 and got["model"]["tta"] == "rot180"
