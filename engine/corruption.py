"""The corruption CNN inside the batched scoring step: one model per weights file and device, shared by every
stream on that device, hot-reloaded when its file changes, scoring the frames of all streams of a tick in one
batch per picture size.

Which frames: every frame when `fps` is 0, else at most `fps` frames per second of each stream, plus every key
frame (where the detector's hold starts afresh) and every frame the decoder or the transport reports damage for
(free evidence; a damaged stream is exactly when to look). On a GPU the default is every frame, on a CPU 5 per
second: concealed loss lasts until the next key frame, so five looks a second see it, at a fifth of the cost of a
25 fps stream.

The model reads each picture with the one shown before it, except at a key frame: there the picture is read alone,
because a key frame that heals damaged pictures changes along the block grid exactly as new damage does.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.corruption import analysis_plane, block_mask, damage_box, frame_scores

log = logging.getLogger("framewatch")

CPU_FPS = 5.0
RELOAD_CHECK_S = 2.0


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: object  # models.weights.ModelMeta
    path: Path
    mtime: float


class ModelSlot:
    """One weights file on one device. `current()` re-reads the file when its modification time changes; a
    file that cannot be used is reported once per change and the model already loaded stays in service."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.path = Path(path)
        self.device = device
        self.loaded: LoadedModel | None = None
        self.error: str | None = None
        self.reloads = 0
        self.reload_errors = 0
        self._seen_mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def current(self, now: float | None = None) -> LoadedModel | None:
        now = time.monotonic() if now is None else now
        if self.loaded is not None and now - self._checked < RELOAD_CHECK_S:
            return self.loaded
        with self._lock:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                mtime = None
            if mtime is not None and mtime == self._seen_mtime:
                return self.loaded
            self._seen_mtime = mtime
            self._load(mtime)
            return self.loaded

    def _load(self, mtime: float | None) -> None:
        from models.weights import WeightsError, load

        try:
            model, meta = load(self.path, self.device)
        except WeightsError as exc:
            self.error = str(exc)
            self.reload_errors += 1
            keep = f"; still using model {self.loaded.meta.version}" if self.loaded is not None else "; corruption is not scored"
            log.error("corruption model: %s%s", exc, keep)
            return
        first = self.loaded is None
        self.loaded = LoadedModel(model, meta, self.path, mtime or 0.0)
        self.error = None
        if not first:
            self.reloads += 1
            log.warning("corruption model reloaded from %s: version %s", self.path, meta.version)


def analysed(pts: float, flagged: bool, last: float | None, fps: float) -> bool:
    """Whether a picture at `pts` is analysed when the last one analysed of its stream was at `last` (None: none
    yet) and `fps` pictures per second are asked for (0: all); `flagged` pictures (key frames, loss or
    concealment reported) always are. pts going backwards (a reconnect, a wrapped clock) starts the count afresh."""
    return fps <= 0 or flagged or last is None or pts < last or pts >= last + 1.0 / fps - 1e-6


def shipped_weights() -> Path:
    from models.weights import SHIPPED

    return SHIPPED


def _stream_of(batch) -> list[str]:
    """The stream of each frame of a batch, by its position in batch.frames."""
    return [w.stream for w in batch.works for _ in w.frames]


class CorruptionFamily:
    """The `corruption` metric family. Per frame: `prob` (NaN for frames not analysed), `decision` (1/0, NaN),
    the damage box (`box_x`, `box_y`, `box_w`, `box_h`, fractions), and for frames at or above the threshold the
    analysis plane and block map (`plane`, `map`, object arrays) for the review store."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.slots: dict[str, ModelSlot] = {}
        self._last: dict[tuple[str, float], float] = {}  # (stream, fps) -> pts of the last frame analysed
        self._warned: set[str] = set()

    def slot(self, weights: str | None) -> ModelSlot:
        key = str(weights or shipped_weights())
        if key not in self.slots:
            self.slots[key] = ModelSlot(key, self.device)
        return self.slots[key]

    def _chosen(self, batch, idx: np.ndarray, fps: float) -> list[int]:
        if fps <= 0:
            return list(range(len(idx)))
        stream_of = _stream_of(batch)
        out = []
        for j, i in enumerate(idx):
            f = batch.frames[int(i)]
            key = (stream_of[int(i)], fps)
            if analysed(f.pts, f.corrupt or f.damaged or f.key_frame, self._last.get(key), fps):
                out.append(j)
                self._last[key] = f.pts
        return out

    def forget(self, stream: str) -> None:
        for key in [k for k in self._last if k[0] == stream]:
            del self._last[key]

    def _inputs(self, batch, idx: np.ndarray, chosen: list[int], previous: bool) -> dict[tuple[int, int], tuple[list[int], torch.Tensor]]:
        """The model's input for the chosen frames, per native picture size: (positions in idx, (n, C, H/2, W/2)
        uint8 on the device). The 2x2 averaging runs once per size on the stacked lumas, not per frame."""
        before: dict[int, object] = {}
        if previous:
            # The picture shown before each one (not in sparse tiers, where the one before is seconds old: the
            # picture itself stands in, as at a stream's start).
            pos = 0
            for w in batch.works:
                p = getattr(w, "prev", None)
                for f in w.frames:
                    before[pos] = p
                    p = f
                    pos += 1
        groups: dict[tuple[int, int], tuple[list[int], list[torch.Tensor]]] = {}
        for j in chosen:
            i = int(idx[j])
            f = batch.frames[i]
            if f.luma is None:
                if "luma" not in self._warned:
                    self._warned.add("luma")
                    log.error("corruption: frames arrive without their luma plane (decode with keep_luma); not scored")
                continue
            lumas = [f.luma]
            if previous:
                b = before.get(i)
                usable = b is not None and b.luma is not None and b.luma.shape == f.luma.shape and not f.key_frame
                lumas.append(b.luma if usable else f.luma)
            js, planes = groups.setdefault(tuple(f.luma.shape), ([], []))
            js.append(j)
            planes.append(torch.stack(lumas) if previous else f.luma.unsqueeze(0))
        return {shape: (js, analysis_plane(torch.stack(planes).to(self.device, non_blocking=True)))
                for shape, (js, planes) in groups.items()}

    @torch.inference_mode()
    def __call__(self, batch, req, idx: np.ndarray) -> dict[str, np.ndarray]:
        n = len(idx)
        nan = np.full(n, np.nan, dtype=np.float64)
        out: dict[str, np.ndarray] = {k: nan.copy() for k in ("prob", "decision", "threshold", "box_x", "box_y", "box_w", "box_h")}
        out["plane"] = np.empty(n, dtype=object)
        out["map"] = np.empty(n, dtype=object)
        # Every frame, analysed or not: key frames (the detector's hold ends there), loss evidence, and the model's
        # decision rule (0 frame, 1 hold, 2 hold+evidence: models.weights.ModelMeta.decision).
        out["key"] = np.array([float(batch.frames[int(i)].key_frame) for i in idx], dtype=np.float64)
        out["evidence"] = np.array([float(batch.frames[int(i)].damaged) for i in idx], dtype=np.float64)
        out["hold"] = np.zeros(n, dtype=np.float64)
        loaded = self.slot(req.param("weights")).current()
        if loaded is None:
            return out
        rule = getattr(loaded.meta, "decision", "frame")
        out["hold"][:] = {"frame": 0.0, "hold": 1.0, "hold+evidence": 2.0}.get(rule, 0.0)
        fps = req.param("fps")
        fps = (0.0 if self.device.type == "cuda" else CPU_FPS) if fps is None else float(fps)
        chosen = self._chosen(batch, idx, fps)
        previous = getattr(loaded.model, "in_channels", 1) == 2 and bool(req.param("previous", True))
        threshold = req.param("threshold")
        threshold = float(loaded.meta.threshold if threshold is None else threshold)
        share = float(loaded.meta.frame_blocks)
        model = loaded.model
        stream_of = _stream_of(batch)
        for js, x in self._inputs(batch, idx, chosen, previous).values():
            if x.shape[1] < model.in_channels:  # a two-channel model where the picture before is not used
                x = x.expand(-1, model.in_channels, -1, -1)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = model(x)
            else:
                logits = model(x)
            logits = logits.float()
            keep = block_mask(logits.shape[-2], logits.shape[-1], req.ignore, self.device)
            probs = frame_scores(logits, share, keep).cpu().numpy()
            sel = np.asarray(js)
            out["prob"][sel] = probs
            out["threshold"][sel] = threshold
            out["decision"][sel] = (probs >= threshold).astype(np.float64)
            # Evidence for the alert and the review store: pictures over the threshold, and of those the transport
            # or the decoder reported loss on, the likeliest per stream and tick (an alert raised on reported
            # loss keeps a picture for an operator's verdict too; a stream in a long loss must not send every
            # picture to the host).
            send = probs >= threshold
            lossy: dict[str, int] = {}
            for h in np.flatnonzero(~send & (out["evidence"][sel] > 0)):
                s = stream_of[int(idx[js[h]])]
                if s not in lossy or probs[h] > probs[lossy[s]]:
                    lossy[s] = int(h)
            send[list(lossy.values())] = True
            hits = np.flatnonzero(send)
            if hits.size:
                maps = torch.sigmoid(logits.index_select(0, torch.from_numpy(hits).to(self.device)))
                if keep is not None:
                    maps = maps * keep
                maps = maps.cpu()
                planes = x.index_select(0, torch.from_numpy(hits).to(self.device)).cpu().numpy()
                for k, h in enumerate(hits):
                    j = js[h]
                    box = damage_box(maps[k])
                    if box is not None:
                        out["box_x"][j], out["box_y"][j], out["box_w"][j], out["box_h"][j] = box
                    out["plane"][j] = planes[k] if previous else planes[k][0]
                    out["map"][j] = maps[k].numpy().astype(np.float16)
        return out

    def status(self) -> dict[str, object]:
        """What `check --json` and metrics report about the models in use."""
        return {key: {"version": getattr(s.loaded.meta, "version", None) if s.loaded else None,
                      "error": s.error, "reloads": s.reloads, "reload_errors": s.reload_errors}
                for key, s in self.slots.items()}

