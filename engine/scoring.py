"""The batched scoring step: one pass of kernels per device tick over the frames of every stream.

Frames of all streams are stacked by shape and each metric family runs once per tick on the whole stack
(not once per frame per stream). Families are pluggable: a later model (the corruption CNN) registers a
family that takes the stacked small planes and returns per-frame values, like the built-in ones do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.corruption import CorruptionFamily
from engine.detectors.base import AudioMetrics, MetricRequest, TimestampNote, VideoMetrics
from engine.loudness_meter import LoudnessMeter
from engine.media import AUDIO_RATE, AUDIO_WINDOW, ColorRange, VideoFrame
from kernels import audio as ka
from kernels import clicks as kclick
from kernels import difference as kd
from kernels import loudness as kl
from kernels import luma as kluma
from kernels import spatial as ks
from kernels import sync as ksync
from kernels import true_peak as ktp
from kernels.masks import region_mask


@dataclass
class VideoWork:
    """Frames of one stream to score this tick, with their neighbours for temporal metrics."""

    stream: str
    frames: list[VideoFrame]
    prev: VideoFrame | None  # the frame just before frames[0]
    next: VideoFrame | None  # the frame just after frames[-1] (None at end of input)
    requests: list[MetricRequest]


@dataclass
class AudioWork:
    stream: str
    t0: float
    samples: torch.Tensor  # (C, T), T a multiple of AUDIO_WINDOW
    layout: str
    state: AudioState
    restart: bool = False  # the first audio after a gap: start the filters afresh
    timestamps: list[TimestampNote] = field(default_factory=list)


@dataclass
class AudioState:
    """Per-stream audio analysis memory carried between ticks."""

    kstate: kl.KState | None = None
    clip_carry: torch.Tensor | None = None
    clip_level: float = 0.891
    clip_min_run: int = 3
    meter: LoudnessMeter = field(default_factory=LoudnessMeter)
    channels: int | None = None
    onset_prev: torch.Tensor | None = None  # (1,) last window's log power, for the onset envelope
    true_peak: torch.Tensor | None = None  # (1, C, K) true-peak filter memory
    impulse: torch.Tensor | None = None  # (1, C, K) click detector memory
    clicks: bool = False  # whether the stream's clicks detector wants the click analysis
    # Bounded measurements over the whole stream, for reports and exports.
    max_true_peak: float = float("nan")  # linear
    interval_true_peak: float = float("nan")  # linear, since the last measurement snapshot

    def take_interval_true_peak(self) -> float:
        tp, self.interval_true_peak = self.interval_true_peak, float("nan")
        return tp

    def restart_filters(self) -> None:
        """After a gap: the filters must not join audio across it; the loudness measurement goes on."""
        self.kstate = None
        self.clip_carry = None
        self.onset_prev = None
        self.true_peak = None
        self.impulse = None


# A family computes per-frame values for the frames of many streams at once.
# It gets the batch context and the indices (into the stacked frame list) of the frames that asked for it.
FamilyFn = Callable[["VideoBatch", MetricRequest, np.ndarray], dict[str, np.ndarray]]


class VideoBatch:
    """All frames of one tick: stacked small planes, neighbour indices, lazily stacked native luma."""

    def __init__(self, works: list[VideoWork], device: torch.device) -> None:
        self.works = works
        self.device = device
        self.frames: list[VideoFrame] = [f for w in works for f in w.frames]
        seq: list[torch.Tensor] = []
        prev_idx, cur_idx, next_idx = [], [], []
        has_prev, has_next = [], []
        for w in works:
            base = len(seq)
            if w.prev is not None:
                seq.append(w.prev.small)
            first = len(seq)
            seq.extend(f.small for f in w.frames)
            last = len(seq) - 1
            if w.next is not None:
                seq.append(w.next.small)
            for i in range(len(w.frames)):
                c = first + i
                cur_idx.append(c)
                prev_idx.append(c - 1 if c > base else c)
                has_prev.append(c > base)
                nxt = c + 1 if (c < last or w.next is not None) else c
                next_idx.append(nxt)
                has_next.append(nxt != c)
        self.seq = torch.stack(seq).to(device)
        self.prev_idx = torch.tensor(prev_idx, device=device)
        self.cur_idx = torch.tensor(cur_idx, device=device)
        self.next_idx = torch.tensor(next_idx, device=device)
        self.has_prev = np.array(has_prev, dtype=bool)
        self.has_next = np.array(has_next, dtype=bool)
        self._has_prev_t = torch.from_numpy(self.has_prev).to(device)
        self._has_next_t = torch.from_numpy(self.has_next).to(device)
        self._small_cur: torch.Tensor | None = None
        self._cache: dict[object, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @property
    def small(self) -> torch.Tensor:
        if self._small_cur is None:
            self._small_cur = self.seq.index_select(0, self.cur_idx)
        return self._small_cur

    def small_mask(self, request: MetricRequest) -> torch.Tensor | None:
        if not request.ignore:
            return None
        key = ("small", request.ignore)
        if key not in self._masks:
            h, w = int(self.seq.shape[-2]), int(self.seq.shape[-1])
            self._masks[key] = region_mask(h, w, request.ignore, self.device)
        return self._masks[key]

    def steps(self, request: MetricRequest, level: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
        """MAFD and changed fraction of every element of the stacked sequence against the one before it
        (index 0: 0). A frame's difference to its previous and to its next frame both come from this one
        pass."""
        key = ("steps", request.ignore, level)
        if key not in self._cache:
            zero = torch.zeros(1, device=self.seq.device)
            if self.seq.shape[0] < 2:  # one lone frame (a sparse tier's first keyframe): nothing to compare
                self._cache[key] = (zero, zero)
                return self._cache[key]
            d, c = kd.difference_stats(self.seq[1:], self.seq[:-1], level, self.small_mask(request))
            self._cache[key] = (torch.cat([zero, d]), torch.cat([zero, c]))
        return self._cache[key]

    def diff(self, which: str, request: MetricRequest, idx: np.ndarray) -> torch.Tensor:
        """MAFD between each selected frame and its previous/next neighbour, or previous vs next."""
        sel = torch.from_numpy(idx).to(self.device)
        if which in ("prev", "next"):
            # Without a neighbour the difference is 0 (stream start, end of input), never a step
            # across into another stream's frames.
            at, ok = (self.cur_idx, self._has_prev_t) if which == "prev" else (self.next_idx, self._has_next_t)
            v = self.steps(request)[0].index_select(0, at.index_select(0, sel))
            return torch.where(ok.index_select(0, sel), v, torch.zeros_like(v))
        a = self.seq.index_select(0, self.prev_idx.index_select(0, sel))
        b = self.seq.index_select(0, self.next_idx.index_select(0, sel))
        return kd.mafd(a, b, self.small_mask(request))

    def luma_rows(self, idx: np.ndarray, stride: Callable[[int], int], summaries: bool = True) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Native luma of the selected frames, every stride(height)-th row, stacked per resolution. Frames that
        kept only a summary give its rows (taken with the same stride when the frame was decoded)."""
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i in idx:
            f = self.frames[int(i)]
            use = summaries and f.summary is not None and f.summary.row_stride == stride(f.height)
            if not use and f.luma is None:
                raise ValueError("frame kept only a luma summary with another row stride; decode with keep_luma")
            groups.setdefault((f.height, f.width, use), []).append(int(i))
        out = []
        for (h, _w, use), members in groups.items():
            if use:
                rows = torch.stack([self.frames[i].summary.rows for i in members])
            else:
                step = stride(h)
                rows = torch.stack([self.frames[i].luma[::step] for i in members])
            out.append((np.array(members), rows.to(self.device)))
        return out


def _family_black(batch: VideoBatch, req: MetricRequest, idx: np.ndarray) -> dict[str, np.ndarray]:
    pix_th = float(req.param("pix_th", 0.10))
    pic_th = float(req.param("pic_th", 0.98))
    out = np.zeros(len(idx), dtype=np.float32)
    sel = torch.from_numpy(idx).to(batch.device)
    small = batch.small.index_select(0, sel)
    mask = batch.small_mask(req)
    means = _masked_mean(small, mask).cpu().numpy()
    full = np.array([batch.frames[i].color_range == ColorRange.FULL for i in idx], dtype=bool)
    thresholds = np.array([kluma.black_pixel_threshold(pix_th, bool(f)) for f in full])
    # A picture whose mean is above this cannot have pic_th of its pixels at or below the threshold, so
    # only dark pictures pay for the exact count on the native plane. The small plane is limited range
    # (full-range sources are mapped to it), and the margin covers the scaler's rounding.
    bound = pic_th * thresholds + (1.0 - pic_th) * 255.0
    bound = np.where(full, 16.0 + bound * (219.0 / 255.0), bound) + 3.0
    candidates = np.flatnonzero(means <= bound)
    if not req.ignore:
        # Frames that kept only a summary: the histogram gives the exact count for any threshold.
        summed = [int(j) for j in candidates if batch.frames[int(idx[j])].summary is not None]
        if summed:
            hists = torch.stack([batch.frames[int(idx[j])].summary.hist for j in summed]).to(batch.device)
            th = torch.from_numpy(thresholds[summed].astype(np.int64)).to(batch.device)
            below = hists.to(torch.int64).cumsum(1).gather(1, th.unsqueeze(1)).squeeze(1)
            total = torch.tensor([batch.frames[int(idx[j])].height * batch.frames[int(idx[j])].width for j in summed],
                                 dtype=torch.float64, device=batch.device)
            out[summed] = (below.to(torch.float64) / total).cpu().numpy()
            candidates = np.array([j for j in candidates if batch.frames[int(idx[j])].summary is None], dtype=np.int64)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for j in candidates:
        f = batch.frames[int(idx[j])]
        groups.setdefault((f.height, f.width, int(thresholds[j])), []).append(int(j))
    for (h, w, th), members in groups.items():
        native_mask = region_mask(h, w, req.ignore, batch.device) if req.ignore else None
        if batch.device.type == "cpu":
            # No stacking copy on the CPU: the kernel reads each decoder plane in place.
            for j in members:
                luma = batch.frames[int(idx[j])].luma.unsqueeze(0)
                out[j] = float(kluma.black_fraction(luma, th, native_mask)[0])
            continue
        luma = torch.stack([batch.frames[int(idx[j])].luma for j in members]).to(batch.device)
        out[members] = kluma.black_fraction(luma, th, native_mask).cpu().numpy()
    return {"fraction": out, "mean": means}


def _masked_mean(small: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return kluma.luma_mean(small)
    m = mask.to(torch.float32)
    return (small.to(torch.float32) * m).flatten(1).sum(-1) / m.sum().clamp(min=1)


def _family_spatial(batch: VideoBatch, req: MetricRequest, idx: np.ndarray) -> dict[str, np.ndarray]:
    rows_wanted = int(req.param("rows", 54))
    out = {k: np.zeros(len(idx), dtype=np.float32) for k in ("blockiness", "blur", "activity")}
    pos = {int(i): j for j, i in enumerate(idx)}
    for members, rows in batch.luma_rows(idx, lambda h: max(1, h // rows_wanted), summaries=not req.ignore):
        f = batch.frames[int(members[0])]
        stride = max(1, f.height // rows_wanted)
        mask = region_mask(f.height, f.width, req.ignore, batch.device)[::stride] if req.ignore else None
        stats = ks.spatial_stats(rows, stride=1, mask=mask)
        where = [pos[int(i)] for i in members]
        out["blockiness"][where] = stats.blockiness.cpu().numpy()
        out["blur"][where] = stats.blur.cpu().numpy()
        out["activity"][where] = stats.activity.cpu().numpy()
    return out


def _family_difference(batch: VideoBatch, req: MetricRequest, idx: np.ndarray) -> dict[str, np.ndarray]:
    level = int(req.param("level", 6))
    sel = torch.from_numpy(idx).to(batch.device)
    at = batch.cur_idx.index_select(0, sel)
    ok = batch._has_prev_t.index_select(0, sel)
    mean, changed = (torch.where(ok, v.index_select(0, at), torch.zeros_like(at, dtype=v.dtype)) for v in batch.steps(req, level))
    return {
        "mafd": mean.cpu().numpy(),
        "changed": changed.cpu().numpy(),
        "activity": kd.activity(batch.seq.index_select(0, at)).cpu().numpy(),
    }


def _family_glitch(batch: VideoBatch, req: MetricRequest, idx: np.ndarray) -> dict[str, np.ndarray]:
    """jump = min(d(prev, cur), d(cur, next)); score = jump - d(prev, next), computed only where jump reaches
    the request's min_jump (NaN elsewhere): a frame close to a neighbour cannot be a glitch, and most frames
    are, so the third difference is skipped for them."""
    d_pc = batch.diff("prev", req, idx)
    d_cn = batch.diff("next", req, idx)
    jump = torch.minimum(d_pc, d_cn).cpu().numpy()
    valid = batch.has_prev[idx] & batch.has_next[idx]
    score = np.full(len(idx), np.nan)
    worth = np.flatnonzero(valid & (jump >= float(req.param("min_jump", 0.0))))
    if worth.size:
        score[worth] = jump[worth] - batch.diff("outer", req, idx[worth]).cpu().numpy()
    return {"score": score, "jump": np.where(valid, jump, np.nan)}


class NoveltyFamily:
    """How new each picture is against its stream's recent ones (kernels.sync.novelty_segments), for A/V
    sync, over all streams of a pass at once. Each stream's last pooled pictures are kept here between
    ticks, until the engine forgets the stream (it ended or was removed)."""

    def __init__(self) -> None:
        self._history: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def __call__(self, batch: VideoBatch, req: MetricRequest, idx: np.ndarray) -> dict[str, np.ndarray]:
        depth, pool = int(req.param("depth", 8)), int(req.param("pool", 4))
        key = (depth, pool)
        wanted = set(idx.tolist())
        streams, lengths = [], []
        base = 0
        for w in batch.works:
            if base in wanted:  # a stream's frames ask together
                streams.append(w.stream)
                lengths.append(len(w.frames))
            base += len(w.frames)
        small = batch.small
        if len(idx) < small.shape[0]:  # only some streams asked (most ask: av_sync is on by default)
            small = small.index_select(0, torch.from_numpy(idx).to(batch.device))
        pooled = ksync.pool_planes(small, pool)
        novelty, hist = ksync.novelty_segments(pooled, lengths, [self._history.get((s, key)) for s in streams], depth)
        for stream, h in zip(streams, hist, strict=True):
            self._history[(stream, key)] = h
        return {"novelty": novelty.cpu().numpy()}

    def forget(self, stream: str) -> None:
        for k in [k for k in self._history if k[0] == stream]:
            del self._history[k]


class ScoringStep:
    """Runs the metric families for a tick's video batch and the audio kernels for its audio batch."""

    # Frames (with their neighbours) scored in one pass. The families' temporaries grow with the pass: on
    # the CPU a 32-bit sum over 1,600 small planes alone took 370 MB, and such peaks, freed and taken again
    # in other sizes, left the heap fragmented and growing with stream churn. Passes of a few hundred frames
    # cost the same per frame on a CPU; a GPU wants large ones to fill its cores.
    PASS_FRAMES = {"cpu": 256, "cuda": 4096}

    def __init__(self, device: torch.device | str = "cpu", pass_frames: int | None = None) -> None:
        self.device = torch.device(device)
        self.pass_frames = pass_frames or self.PASS_FRAMES.get(self.device.type, 256)
        # Scoring kernels go on a stream of their own so they overlap the decoders' copy work; results are
        # read back once per family per tick (.cpu()), never per frame.
        self.cuda_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.families: dict[str, FamilyFn] = {
            "black": _family_black,
            "spatial": _family_spatial,
            "difference": _family_difference,
            "glitch": _family_glitch,
            "corruption": CorruptionFamily(self.device),
            "novelty": NoveltyFamily(),
        }

    def forget(self, stream: str) -> None:
        """Drop what families keep of a stream between ticks."""
        for fn in self.families.values():
            forget = getattr(fn, "forget", None)
            if forget is not None:
                forget(stream)

    def add_family(self, name: str, fn: FamilyFn) -> None:
        """The slot for models: a family computing per-frame values over the whole batch."""
        self.families[name] = fn

    def on_stream(self) -> contextlib.AbstractContextManager:
        """The scoring stream as the current CUDA stream (nothing on the CPU)."""
        return torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()

    def _done(self) -> None:
        # Once per tick, not per frame: every kernel that reads this tick's frames has finished before the
        # frames are released, so their memory (allocated by decoder threads on their own streams) cannot be
        # handed out again while a scoring kernel still reads it, and detectors see finished results.
        if self.cuda_stream is not None:
            self.cuda_stream.synchronize()

    def score_video(self, works: list[VideoWork]) -> list[VideoMetrics]:
        with self.on_stream():
            try:
                return self._score_video(works)
            finally:
                self._done()

    def score_audio(self, works: list[AudioWork]) -> list[AudioMetrics]:
        with self.on_stream():
            try:
                return self._score_audio(works)
            finally:
                self._done()

    def _score_video(self, works: list[VideoWork]) -> list[VideoMetrics]:
        """Metrics for each work item with frames, in order, in passes of about pass_frames frames: a stream's
        frames stay in one pass (their neighbours are in it), so the results do not depend on the cut."""
        out: list[VideoMetrics] = []
        part: list[VideoWork] = []
        size = 0
        for w in works:
            if not w.frames:
                continue
            n = len(w.frames) + (w.prev is not None) + (w.next is not None)
            if part and size + n > self.pass_frames:
                out.extend(self._score_pass(part))
                part, size = [], 0
            part.append(w)
            size += n
        if part:
            out.extend(self._score_pass(part))
        return out

    @torch.inference_mode()
    def _score_pass(self, works: list[VideoWork]) -> list[VideoMetrics]:
        batch = VideoBatch(works, self.device)
        # Which frames asked for which request, across all streams.
        asked: dict[MetricRequest, list[int]] = {}
        offsets = []
        pos = 0
        for w in works:
            offsets.append(pos)
            for r in dict.fromkeys(w.requests):
                asked.setdefault(r, []).extend(range(pos, pos + len(w.frames)))
            pos += len(w.frames)
        results: dict[MetricRequest, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        for req, members in asked.items():
            idx = np.asarray(members, dtype=np.int64)
            family = self.families.get(req.family)
            if family is None:
                raise KeyError(f"no metric family {req.family!r}")
            results[req] = (idx, family(batch, req, idx))
        out = []
        small_all = batch.small
        for w, base in zip(works, offsets, strict=True):
            k = len(w.frames)
            values: dict[MetricRequest, dict[str, np.ndarray]] = {}
            for req in w.requests:
                idx, vals = results[req]
                start = int(np.searchsorted(idx, base))
                values[req] = {name: arr[start : start + k] for name, arr in vals.items()}
            last = w.frames[-1]
            out.append(
                VideoMetrics(
                    stream=w.stream,
                    pts=np.array([f.pts for f in w.frames], dtype=np.float64),
                    duration=np.array([f.duration for f in w.frames], dtype=np.float64),
                    values=values,
                    small=small_all[base : base + k],
                    last=last,
                    prev_small=w.prev.small if w.prev is not None else None,
                )
            )
        return out

    @torch.inference_mode()
    def _score_audio(self, works: list[AudioWork]) -> list[AudioMetrics]:
        """Metrics for each work item, in the order given."""
        groups: dict[tuple[int, int, float, int], list[int]] = {}
        for pos, w in enumerate(works):
            key = (int(w.samples.shape[0]), int(w.samples.shape[1]), w.state.clip_level, w.state.clip_min_run)
            groups.setdefault(key, []).append(pos)
        out: list[AudioMetrics | None] = [None] * len(works)
        for (c, _t, level, min_run), positions in groups.items():
            members = [works[p] for p in positions]
            for w in members:
                if w.restart:
                    w.state.restart_filters()
            # A plain copy: the stacked host buffer is a temporary, and audio is a few hundred KB per tick.
            x = torch.stack([w.samples for w in members]).to(self.device)
            for w in members:
                if w.state.channels != c:
                    w.state.channels = c
                    w.state.restart_filters()
            states = [w.state.kstate or kl.KState.zeros(1, c, self.device) for w in members]
            kstate = kl.KState(*(torch.cat([st[p] for st in states]) for p in range(3)))
            carry = torch.stack(
                [
                    w.state.clip_carry if w.state.clip_carry is not None else torch.zeros(c, dtype=torch.int64)
                    for w in members
                ]
            ).to(self.device)
            peak = ka.window_peak(x, AUDIO_WINDOW)
            ms = ka.window_mean_square(x, AUDIO_WINDOW)
            clipped, new_carry = ka.clipped_windows(x, level, min_run, AUDIO_WINDOW, carry)
            y, new_k = kl.k_weight(x, kstate)
            layout = members[0].layout
            weights = kl.channel_weights(c, layout).to(self.device)
            power = kl.weighted_power(ka.window_mean_square(y, AUDIO_WINDOW), weights)
            mean = ka.window_mean(x, AUDIO_WINDOW)
            names = kl.channel_names(c, layout)
            pair = kl.front_pair(names)
            cross = None
            if pair is not None:
                a = torch.full((len(members),), pair[0], dtype=torch.int64, device=self.device)
                b = torch.full((len(members),), pair[1], dtype=torch.int64, device=self.device)
                cross = ka.window_cross(x, a, b, AUDIO_WINDOW)
            nan = torch.full((1,), float("nan"), dtype=power.dtype)
            prev = torch.cat([nan if w.state.onset_prev is None else w.state.onset_prev for w in members])
            onset, new_prev = ksync.audio_onsets(power, prev.to(self.device))
            tp_state = self._stacked([w.state.true_peak for w in members])
            tp, new_tp = ktp.true_peak(x, tp_state, AUDIO_WINDOW)
            # The click analysis is the costliest audio kernel: only streams whose clicks detector is on
            # pay for it.
            clicky = [i for i, w in enumerate(members) if w.state.clicks]
            imp_np = at_np = lvl_np = None
            if clicky:
                sel = torch.tensor(clicky, device=self.device)
                imp_state = self._stacked([members[i].state.impulse for i in clicky])
                imp, imp_at, imp_level, new_imp = kclick.impulse_windows(
                    x.index_select(0, sel), imp_state, AUDIO_WINDOW)
                imp_np, at_np, lvl_np = (t.cpu().numpy() for t in (imp, imp_at, imp_level))
                for j, i in enumerate(clicky):
                    members[i].state.impulse = new_imp[j : j + 1]
            where = {i: j for j, i in enumerate(clicky)}
            arrays = [t.cpu().numpy() for t in (peak, ms, clipped, power, mean, onset, tp)]
            peak_np, ms_np, clip_np, power_np, mean_np, onset_np, tp_np = arrays
            cross_np = cross.cpu().numpy() if cross is not None else None
            for i, w in enumerate(members):
                st = w.state
                st.kstate = new_k.select(slice(i, i + 1))
                st.clip_carry = new_carry[i].cpu()
                st.onset_prev = new_prev[i : i + 1].cpu()
                st.true_peak = new_tp[i : i + 1]
                j = where.get(i)
                if tp_np.shape[-1]:
                    top = float(tp_np[i].max())
                    st.max_true_peak = float(np.fmax(st.max_true_peak, top))
                    st.interval_true_peak = float(np.fmax(st.interval_true_peak, top))
                block = st.meter.feed(power_np[i])
                out[positions[i]] = (
                    AudioMetrics(
                        stream=w.stream,
                        t0=w.t0,
                        window=AUDIO_WINDOW / AUDIO_RATE,
                        peak=peak_np[i],
                        mean_square=ms_np[i],
                        clipped=clip_np[i],
                        momentary=block.momentary,
                        short_term=block.short_term,
                        window_power=power_np[i],
                        layout=layout,
                        channel_names=names,
                        mean=mean_np[i],
                        pair=pair,
                        cross=None if cross_np is None else cross_np[i],
                        onset=onset_np[i],
                        true_peak=tp_np[i],
                        impulse=None if j is None else imp_np[j],
                        impulse_at=None if j is None else at_np[j],
                        impulse_level=None if j is None else lvl_np[j],
                        timestamps=w.timestamps,
                        restart=w.restart,
                    )
                )
        return [m for m in out if m is not None]

    def _stacked(self, states: list[torch.Tensor | None]) -> torch.Tensor | None:
        """One batch state from per-stream states (1, ...); None when every stream starts afresh, zeros for
        a stream that does (its filter has only seen silence)."""
        known = [s for s in states if s is not None]
        if not known:
            return None
        zero = torch.zeros_like(known[0], device=self.device)
        return torch.cat([zero if s is None else s.to(self.device) for s in states])
