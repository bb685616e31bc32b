#!/usr/bin/env python3
"""Survey media clips: stream facts plus frame-difference statistics, one JSON line per file.

    python benchmarks/survey_clips.py FILE... [--lag 30] [--size 320x180]

For every decoded video frame the luma is area-downscaled to --size with
``frame.reformat(width, height, format='gray', interpolation='AREA')`` (note:
swscale's ``gray`` output is full range, so tv-range Y 16..235 becomes 0..255),
then two per-frame series are built:

* ``diff1``: mean |Y_t - Y_{t-1}|       (consecutive frames)
* ``diffN``: mean |Y_t - Y_{t-lag}|     (frame ``lag`` frames earlier, default 30)

and reported as min / p5 / median / p95 / max (plus mean and the number of
values), in 0..255 units.

``black_frames`` counts frames where more than --black-ratio (0.98) of the
*native* luma plane samples are <= --black-pix (37 on 0..255), i.e. the same
test as ``blackdetect`` with its defaults (pix_th=0.10 on a tv-range clip).
The native plane is used here, not the full-range ``gray`` conversion.

Decoding errors (corrupt packets) are counted, not fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from fractions import Fraction

import av
import numpy as np

PCTS = (0, 5, 50, 95, 100)
PCT_NAMES = ("min", "p5", "median", "p95", "max")


def _num(x):
    """JSON-friendly number (Fractions, numpy scalars, None)."""
    if x is None:
        return None
    if isinstance(x, Fraction):
        return round(float(x), 6)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else round(float(x), 4)
    if isinstance(x, (np.integer, int)):
        return int(x)
    return x


def distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    out = {"n": int(a.size)}
    for name, q in zip(PCT_NAMES, np.percentile(a, PCTS), strict=True):
        out[name] = round(float(q), 4)
    out["mean"] = round(float(a.mean()), 4)
    return out


def native_luma(frame: av.VideoFrame) -> np.ndarray | None:
    """The frame's own 8-bit luma plane (no range conversion), or None for non-YUV/gray formats."""
    fmt = frame.format.name
    if not (fmt.startswith(("yuv", "yuvj", "nv", "gray")) and frame.format.components[0].bits == 8):
        return None
    plane = frame.planes[0]
    buf = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
    return buf[: frame.height, : frame.width]


def stream_time(stream, ts) -> float | None:
    if ts is None or stream.time_base is None:
        return None
    return float(ts * stream.time_base)


def audio_info(container) -> list[dict]:
    out = []
    for s in container.streams.audio:
        cc = s.codec_context
        out.append(
            {
                "index": s.index,
                "codec": cc.name,
                "rate": cc.sample_rate,
                "channels": cc.channels if hasattr(cc, "channels") else cc.layout.nb_channels,
                "layout": cc.layout.name if cc.layout else None,
                "sample_fmt": cc.format.name if cc.format else None,
                "duration_s": _num(stream_time(s, s.duration)),
                "start_time_s": _num(stream_time(s, s.start_time)),
                "frames_header": s.frames or None,
            }
        )
    return out


def decode_audio(path: str, index: int) -> dict:
    """Decode one audio stream fully: samples per channel, decoded duration, peak, decode errors."""
    samples = errors = 0
    first = last_end = None
    peak = 0.0
    rate = None
    with av.open(path) as c:
        s = c.streams[index]
        for packet in c.demux(s):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                errors += 1
                continue
            for fr in frames:
                rate = fr.sample_rate
                if fr.pts is not None:
                    t = float(fr.pts * fr.time_base)
                    first = t if first is None else first
                    last_end = t + fr.samples / fr.sample_rate
                samples += fr.samples
                a = fr.to_ndarray()
                if a.dtype.kind == "f":
                    peak = max(peak, float(np.abs(a).max(initial=0.0)))
                elif a.dtype.kind in "iu":
                    info = np.iinfo(a.dtype)
                    peak = max(peak, float(np.abs(a.astype(np.float64)).max(initial=0.0)) / -info.min)
    return {
        "decoded_samples_per_channel": samples,
        "decoded_duration_s": _num(samples / rate if rate else None),
        "first_pts_s": _num(first),
        "last_end_s": _num(last_end),
        "decode_errors": errors,
        "sample_peak_dbfs": _num(20 * math.log10(peak) if peak > 0 else None),
    }


def survey(
    path: str, lag: int, size: tuple[int, int], black_pix: int, black_ratio: float, series: bool = False
) -> dict:
    w, h = size
    with av.open(path) as container:
        vs = container.streams.video[0] if container.streams.video else None
        res: dict = {
            "file": path,
            "container": container.format.name,
            "container_duration_s": _num(container.duration / 1e6 if container.duration else None),
            "container_start_time_s": _num(
                container.start_time / 1e6 if container.start_time is not None else None
            ),
            "bit_rate": container.bit_rate or None,
            "audio": audio_info(container),
        }
        for a in res["audio"]:
            a.update(decode_audio(path, a["index"]))
        if vs is None:
            res["video"] = None
            return res
        cc = vs.codec_context
        res["video"] = {
            "index": vs.index,
            "codec": cc.name,
            "width": cc.width,
            "height": cc.height,
            "pix_fmt": cc.pix_fmt,
            "color_range": int(cc.color_range) if cc.color_range is not None else None,
            "avg_fps": _num(vs.average_rate),
            "base_fps": _num(vs.base_rate),
            "time_base": str(vs.time_base),
            "duration_s": _num(stream_time(vs, vs.duration)),
            "start_time_s": _num(stream_time(vs, vs.start_time)),
            "frames_header": vs.frames or None,
        }
        vs.thread_type = "AUTO"

        diff1: list[float] = []
        diffn: list[float] = []
        ring: deque[np.ndarray] = deque(maxlen=lag + 1)
        n = black = decode_errors = 0
        exact_dupes = 0
        first_pts = last_pts = None
        all_pts: list[int] = []
        non_monotonic = 0
        frame_fmts: set[str] = set()
        frame_ranges: set[int] = set()

        def handle(frame: av.VideoFrame) -> None:
            nonlocal n, black, exact_dupes, first_pts, last_pts, non_monotonic
            n += 1
            frame_fmts.add(frame.format.name)
            frame_ranges.add(int(frame.color_range))
            if frame.pts is not None:
                if first_pts is None:
                    first_pts = frame.pts
                if last_pts is not None and frame.pts <= last_pts:
                    non_monotonic += 1
                last_pts = frame.pts
                all_pts.append(frame.pts)
            y = native_luma(frame)
            if y is None:
                y = frame.reformat(format="gray").to_ndarray()
            if np.count_nonzero(y <= black_pix) > black_ratio * y.size:
                black += 1
            small = frame.reformat(width=w, height=h, format="gray", interpolation="AREA").to_ndarray()
            small = small.astype(np.int16)
            if ring:
                d = float(np.abs(small - ring[-1]).mean())
                diff1.append(d)
                if d == 0.0:
                    exact_dupes += 1
            if len(ring) == lag + 1:
                diffn.append(float(np.abs(small - ring[0]).mean()))
            ring.append(small)

        for packet in container.demux(vs):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                decode_errors += 1
                continue
            for frame in frames:
                handle(frame)

        res["video"].update(
            {
                "frames_decoded": n,
                "decode_errors": decode_errors,
                "frame_pix_fmts": sorted(frame_fmts),
                "frame_color_ranges": sorted(frame_ranges),
                "first_pts_s": _num(stream_time(vs, first_pts)),
                "last_pts_s": _num(stream_time(vs, last_pts)),
                "non_monotonic_pts": non_monotonic,
                "black_frames": black,
                "exact_duplicate_frames": exact_dupes,
            }
        )
        if len(all_pts) > 1:
            gaps = np.diff(np.sort(np.asarray(all_pts, dtype=np.float64))) * float(vs.time_base)
            res["video"]["pts_gap_s"] = {
                "median": _num(float(np.median(gaps))),
                "max": _num(float(gaps.max())),
                "max_at_s": _num(float(np.sort(all_pts)[int(gaps.argmax())] * vs.time_base)),
            }
        res["diff_size"] = f"{w}x{h}"
        res["diff1"] = distribution(diff1)
        res[f"diff{lag}"] = distribution(diffn)
        if series:
            res["diff1_series"] = [round(v, 4) for v in diff1]
            res[f"diff{lag}_series"] = [round(v, 4) for v in diffn]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument(
        "--lag", type=int, default=30, help="frame distance of the second diff series (default 30)"
    )
    ap.add_argument("--size", default="320x180", help="WxH the luma is area-downscaled to (default 320x180)")
    ap.add_argument("--black-pix", type=int, default=37, help="luma <= this counts as black (default 37)")
    ap.add_argument("--black-ratio", type=float, default=0.98, help="fraction of black pixels (default 0.98)")
    ap.add_argument(
        "--series", action="store_true", help="also output the per-frame diff series (decode order)"
    )
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    av.logging.set_level(av.logging.ERROR)
    rc = 0
    for f in args.files:
        try:
            rec = survey(f, args.lag, (w, h), args.black_pix, args.black_ratio, args.series)
        except (av.error.FFmpegError, OSError) as e:
            rec = {"file": f, "error": f"{type(e).__name__}: {e}"}
            rc = 1
        print(json.dumps(rec), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
