"""Peer scorers for the corruption benchmark: FFmpeg's ``blockdetect`` and framewatch's blockiness kernel.

``benchmarks/corruption_vs_blockdetect.py`` compares the corruption CNN against these two on held-out
frames, so each peer here turns a stack of native luma planes (N, H, W) uint8 into one score per frame
(higher = blockier) plus its CPU cost per frame, and ``best_threshold`` / ``prf_at`` turn scores and 0/1
labels into the operating point every peer is judged at.

blockdetect carries state from frame to frame. Its per-column and per-row gradient sums (the first row and
first column of a buffer allocated once, when the filter is configured) are added to and never cleared, so
in one ordinary FFmpeg run the value reported for frame k is computed from the sums over frames 0..k: a
running figure for the stream, not a score of frame k. A clean frame after a blocky one still scores high
and a flat frame repeats its predecessor's score. For held-out frames, which are unrelated pictures in no
particular order, ``blockdetect_scores`` therefore gives every frame a freshly configured filter by default
(``fresh_state=True``): frames go in as PGM images with a 2x2 dummy picture between them, and FFmpeg
reconfigures its filter graph whenever the picture size changes (``-reinit_filter``, on by default). That
stays one process, costs about one graph set-up per frame, and gives exactly the values FFmpeg reports when
run on each frame alone (tests/test_corruption_peers.py checks this). ``fresh_state=False`` is the
ordinary single-pass run over rawvideo, what an FFmpeg user watching a stream would see.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import kernels.spatial as ks  # noqa: E402

# The spatial family's default: this many evenly spaced rows of the native luma plane are analysed
# (engine/scoring.py `_family_spatial`, engine/detectors/blockiness.py `rows`).
ROWS = 54
# Frames per kernel call: the engine scores a tick's frames together; this bounds the float copies
# spatial_stats makes (about 1 MB per 1080p frame) without changing any frame's score.
KERNEL_BATCH = 64

# The engine's default (engine.config torch_threads=1). It matters for the CPU figure: on a busy machine
# torch's default thread pool spends more time synchronising than the 54-row kernel takes (measured ~8 ms
# against ~0.4 ms per 1080p frame on the 2-core development machine), and blockdetect is one thread too.
TORCH_THREADS = 1

_BLOCK_RE = re.compile(r"lavfi\.block=(\S+)")


# --------------------------------------------------------------------------------------------- blockdetect


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Both peers take the same input; a wrong dtype or rank would be silently reinterpreted by FFmpeg."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W) uint8 luma, got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty picture, got shape {frames.shape}")
    return frames


def _pgm_header(picture: np.ndarray) -> bytes:
    h, w = picture.shape
    return b"P5\n%d %d\n255\n" % (w, h)


def _feed(stdin: IO[bytes], frames: np.ndarray, fresh_state: bool) -> None:
    h, w = frames.shape[1:]
    dummy = np.zeros((4, 4) if (h, w) == (2, 2) else (2, 2), dtype=np.uint8)
    dummy_bytes = _pgm_header(dummy) + dummy.tobytes()
    header = _pgm_header(frames[0])
    for frame in frames:
        if fresh_state:
            stdin.write(header)
        stdin.write(np.ascontiguousarray(frame).data)
        if fresh_state:
            # A picture of another size makes FFmpeg rebuild the graph before the next real frame.
            stdin.write(dummy_bytes)


def blockdetect_argv(width: int, height: int, fps: int = 25, fresh_state: bool = True) -> list[str]:
    """The FFmpeg command line, exposed so that a report can record exactly what ran."""
    if fresh_state:
        # image2pipe + pgm: each picture carries its own size, so the 2x2 dummies are possible;
        # -autoscale 0 keeps FFmpeg from scaling the dummies to the first picture's size after the filters.
        source = ["-f", "image2pipe", "-c:v", "pgm", "-framerate", str(fps), "-reinit_filter", "1", "-i", "-"]
        sink = ["-autoscale", "0", "-f", "null", "-"]
    else:
        source = ["-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
        sink = ["-f", "null", "-"]
    # metadata=mode=print logs each frame's lavfi.block at info level; it goes to stderr rather than to
    # metadata's file=, because every graph rebuild reopens (and truncates) that file.
    return ["ffmpeg", "-nostdin", "-hide_banner", "-nostats", "-v", "info", *source,
            "-vf", "blockdetect,metadata=mode=print", *sink]


def blockdetect_scores(frames: np.ndarray, fps: int = 25, fresh_state: bool = True) -> tuple[np.ndarray, float]:
    """FFmpeg ``blockdetect`` (default options) on each frame, as (scores (N,) float64, CPU s per frame).

    One FFmpeg process scores all frames, so start-up is paid once; its CPU time (user + sys of exactly
    that child, from ``os.wait4``) is divided by N and so includes start-up and, with ``fresh_state``, one
    graph rebuild and one 2x2 dummy frame per frame: score enough frames for start-up to vanish.

    ``fresh_state=True`` (the default) scores every frame as if it were alone: see the module docstring
    for why the plain stream run does not. NaN (blockdetect's 0/0 on a flat picture) is returned as 0.0,
    like the engine's blockiness; +inf (no steps inside the blocks but some across their boundaries, e.g.
    a synthetic picture that is flat within each block) is kept: it ranks above every finite score.
    """
    frames = _check_frames(frames)
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("blockdetect_scores needs the ffmpeg CLI on PATH (FFmpeg >= 5.0 has blockdetect)")
    n, h, w = frames.shape
    argv = blockdetect_argv(w, h, fps, fresh_state)
    # stderr goes to an unnamed file: nothing has to be read while we write frames, so FFmpeg can never
    # stall on a full pipe while we block on its full stdin.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        assert proc.stdin is not None
        try:
            _feed(proc.stdin, frames, fresh_state)
        except BrokenPipeError:
            pass  # FFmpeg exited early; its exit status and log below say why
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        err.seek(0)
        log = err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-5:])
        raise RuntimeError(f"ffmpeg blockdetect failed (exit {proc.returncode}):\n{tail}")
    values = np.array([float(v) for v in _BLOCK_RE.findall(log)], dtype=np.float64)
    expected = 2 * n if fresh_state else n
    if values.size != expected:
        raise RuntimeError(f"ffmpeg blockdetect reported {values.size} frame scores, expected {expected} "
                           f"for {n} frames (fresh_state={fresh_state})")
    if fresh_state:
        values = values[0::2]  # the odd ones belong to the dummies
    scores = np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return scores, (usage.ru_utime + usage.ru_stime) / n


# --------------------------------------------------------------------------------------------- blockiness


@torch.inference_mode()
def blockiness_scores(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """framewatch's core blockiness on each frame, as (scores (N,) float64, CPU s per frame).

    Reproduces what the engine feeds the blockiness detector (``_family_spatial`` with its default 54
    rows, no ignore mask): every ``max(1, H // 54)``-th row of the native luma plane, through
    ``kernels.spatial.spatial_stats(rows, stride=1)`` on the CPU. NaN (not produced by the current kernel,
    whose floor keeps flat pictures at 1, but allowed by its contract) is returned as 0.0. CPU time is
    ``time.process_time`` over the kernel calls (all torch threads), row sampling included, so it is the
    cost the engine pays per frame once the frame is decoded. Torch runs on one thread here, as the
    engine configures it by default (the caller's setting is restored afterwards).
    """
    frames = _check_frames(frames)
    n, h, _ = frames.shape
    stride = max(1, h // ROWS)
    out = np.empty(n, dtype=np.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        t0 = time.process_time()
        for start in range(0, n, KERNEL_BATCH):
            rows = torch.from_numpy(np.ascontiguousarray(frames[start:start + KERNEL_BATCH, ::stride]))
            out[start:start + rows.shape[0]] = ks.spatial_stats(rows, stride=1).blockiness.numpy()
        cpu = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    return np.nan_to_num(out, nan=0.0, posinf=np.inf, neginf=-np.inf), cpu / n


# --------------------------------------------------------------------------------------------- metrics


def _check_scored(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN has no place in a `score >= t` rule and a label other than 0/1 is a caller's bug: fail loudly."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.size == 0:
        raise ValueError("no scores")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def _f1(tp: np.ndarray | int, fp: np.ndarray | int, fn: np.ndarray | int) -> np.ndarray:
    # One division of exact integers, so mathematically equal F1s are equal floats and ties break cleanly;
    # 0/0 (no positives labelled and none predicted) counts as 0.
    num = 2 * np.asarray(tp, dtype=np.int64)
    den = num + np.asarray(fp, dtype=np.int64) + np.asarray(fn, dtype=np.int64)
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising F1 of the rule ``score >= t``, and that F1.

    Every peer gets its own best operating point on the same frames, so a comparison of F1s compares the
    scores' power to separate, not how well someone guessed each tool's threshold. Candidates are all
    distinct score values (a threshold between two values predicts what the next one up does); among
    equal F1s the lowest threshold wins, so the answer does not depend on the order of the frames.
    """
    s, y = _check_scored(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp_cum = np.cumsum(y_sorted)
    # The last index of each run of equal scores: thresholding there predicts the whole run.
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = tp_cum[last]
    fp = (last + 1) - tp
    fn = int(y.sum()) - tp
    f1 = _f1(tp, fp, fn)
    best = f1.max()
    # Thresholds run from high to low along `last`, so the lowest one with the best F1 is the last.
    pick = np.flatnonzero(f1 == best)[-1]
    return float(s_sorted[last[pick]]), float(best)


def prf_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Precision, recall, F1 and the confusion counts of ``score >= threshold``.

    Kept beside best_threshold so that a threshold chosen on one split can be reported on another.
    Undefined ratios are 0.0, not 1.0 or NaN: precision when nothing is predicted positive, recall when no
    frame is labelled positive, F1 when both (a peer that flags nothing earns no credit, and the report
    stays valid JSON).
    """
    s, y = _check_scored(scores, labels)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(np.count_nonzero(~pred & ~y))
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": float(_f1(tp, fp, fn)),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }
