"""Corrupted picture: blocks damaged by lost or garbled packets and concealed by the decoder (macroblocking,
displaced or smeared blocks), judged by the corruption CNN (models/). The event carries the model's probability
as its value, the box of the damaged blocks, and the model version; its thumbnail shows the box; the picture and
the model's block map go to the review store for an operator's verdict."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from engine.detectors.base import (
    Detector,
    DetectorConfig,
    MetricRequest,
    VideoMetrics,
    positive,
    register,
    unit_interval,
)
from engine.events import Event, Severity

RULES = ("frame", "hold", "hold+evidence")


class GopHold:
    """The decision over a stream's pictures in order, the same in the engine and in evaluation
    (models.evaluate): packet loss damages a picture and, through prediction, every one after it until the next
    key frame heals the stream, while the damage is most visible where it starts. So with `hold` a picture's
    level is the highest probability of the pictures analysed since the last key frame (the key frame included)
    and with `evidence` a picture the transport or decoder reported damage for (engine.media.VideoFrame.damaged)
    counts as corrupt too. A stream without key frames is not held for ever: a hold whose last picture over the
    threshold is `max_hold` seconds old starts afresh. Without `hold` a picture is decided by its own probability
    and pictures not analysed keep the decision of the last one that was (sample and hold)."""

    def __init__(self, max_hold: float = 10.0) -> None:
        self.max_hold = max_hold
        self.level = float("nan")  # probability held (NaN: nothing analysed since the last key frame)
        self.hit: float | None = None  # pts of the last picture over the threshold in this hold

    def update(self, pts: np.ndarray, prob: np.ndarray, key: np.ndarray, evidence: np.ndarray, threshold: float,
               hold: bool, use_evidence: bool) -> tuple[np.ndarray, np.ndarray]:
        """(faulty (k,) bool, level (k,) float) for pictures at `pts` with probabilities `prob` (NaN: not
        analysed), key-frame flags `key` and loss evidence `evidence`."""
        k = len(pts)
        faulty = np.zeros(k, dtype=bool)
        level = np.full(k, np.nan)
        for i in range(k):
            p = float(prob[i])
            if hold and key[i]:
                self.level, self.hit = float("nan"), None
            if hold and self.hit is not None and pts[i] - self.hit > self.max_hold:
                self.level, self.hit = float("nan"), None
            if not np.isnan(p):
                self.level = p if not hold or np.isnan(self.level) else max(self.level, p)
                if p >= threshold:
                    self.hit = float(pts[i])
            level[i] = self.level
            faulty[i] = (not np.isnan(self.level) and self.level >= threshold) or bool(use_evidence and evidence[i])
        return faulty, level


@dataclass(frozen=True)
class CorruptionConfig(DetectorConfig):
    """threshold: frame probability that counts as corrupt (null: the model's own, chosen on validation data);
    weights: a weights file (null: the shipped model; the file is re-read when it changes); fps: pictures per
    second analysed per stream (0: every one; null: every one on a GPU, 5 on a CPU; pictures the decoder
    reports as concealed are always analysed). Concealed loss lasts until the next key frame, so the default
    onset of 0.3 s catches a damaged GOP while a single odd picture does not alert. rule: how pictures are
    decided (GopHold): null for the model's own rule (the one its threshold was chosen for: ModelMeta.decision),
    or "frame", "hold", "hold+evidence". max_hold: seconds a hold lasts without a picture over the threshold when
    no key frame ends it."""

    enabled: bool = False  # opt-in: about 2.3 blockdetects of CPU per analysed 1080p picture, F1 at its target only narrowly (README)
    onset: float = 0.3
    recovery: float = 0.5
    severity: Severity = Severity.MAJOR
    threshold: float | None = None
    weights: str | None = None
    fps: float | None = None
    rule: str | None = None
    max_hold: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)} or null, not {self.rule!r}")
        if self.weights is not None and not os.path.isfile(self.weights):
            # Said when the config is read, not by a stream that later runs without its model.
            raise ValueError(f"weights file {self.weights} not found")
        positive("max_hold", self.max_hold)
        if self.threshold is not None:
            unit_interval("threshold", self.threshold)
        if self.fps is not None and self.fps != 0:
            positive("fps", self.fps)


@register
class CorruptionDetector(Detector):
    NAME = "corruption"
    VERSION = "1.2"  # 1.2: the value is the likeliest picture's own probability, not the held level
    MEDIA = "video"
    NEEDS_EVERY_FRAME = False
    NEEDS_PACKETS = True
    Config = CorruptionConfig

    def __init__(self, config: CorruptionConfig, ctx) -> None:
        super().__init__(config, ctx)
        self.request = MetricRequest(
            "corruption", (("fps", config.fps), ("threshold", config.threshold), ("weights", config.weights),
                           ("previous", ctx.tier == "all")), config.ignore)
        self._gop = GopHold(config.max_hold)
        self._evidence: dict | None = None  # the most likely corrupt picture of the pending fault
        self._threshold: float | None = config.threshold
        self._reviewed = None  # the open alert's review record (ReviewRecord), while it is open

    def requests(self) -> list[MetricRequest]:
        return [self.request]

    def threshold(self) -> float | None:
        return None if self._threshold is None else round(self._threshold, 4)

    def message(self, value: float | None) -> str:
        return "corrupted picture" if value is None else f"corrupted picture (probability {value:.2f})"

    def on_video(self, m: VideoMetrics) -> None:
        v = m.values[self.request]
        decision = v["decision"]
        seen = ~np.isnan(decision)
        if seen.any():
            self._threshold = float(v["threshold"][np.flatnonzero(seen)[-1]])
        rule = self.config.rule or (RULES[int(v["hold"][-1])] if len(decision) else "frame")
        faulty, _ = self._gop.update(m.pts, v["prob"], v["key"], v["evidence"],
                                     np.inf if self._threshold is None else self._threshold,
                                     hold=rule != "frame", use_evidence=rule == "hold+evidence")
        # The most likely corrupt picture of a fault is its evidence: of those over the threshold, or else of those
        # with reported loss (an alert the transport raised is reviewed like any other). Pictures up to the open
        # alert's end belong to it and may replace its review record before the tick can close it (the worst
        # picture often comes late in a damaged GOP, in the tick where the stream heals); the rest start the
        # evidence of the next fault.
        cut = self._open_until(m.pts, faulty)
        sent = np.flatnonzero(faulty & np.array([p is not None for p in v["plane"]]))
        if self.hyst.active:
            self._take_evidence(v, sent[sent < cut])
            self._review_better_picture()
            self._evidence = None  # what the open alert did not take is not the next fault's
        self._take_evidence(v, sent[sent >= cut])
        # The event's value is the likeliest picture's own probability, not the held level: that may come from
        # a clean picture earlier in the GOP, before the loss the alert is about.
        self.hyst.update(m.pts, m.pts + m.duration, faulty, v["prob"])
        if not self.hyst.active:
            self._reviewed = None
            if self.hyst.pending_start is None:
                self._evidence = None

    def _take_evidence(self, v: dict[str, np.ndarray], hits: np.ndarray) -> None:
        if hits.size:
            j = int(hits[np.argmax(v["prob"][hits])])
            if self._evidence is None or v["prob"][j] > self._evidence["prob"]:
                box = tuple(float(v[k][j]) for k in ("box_x", "box_y", "box_w", "box_h"))
                self._evidence = {"prob": float(v["prob"][j]), "box": None if np.isnan(box).any() else box,
                                  "plane": v["plane"][j], "map": v["map"][j]}

    def _open_until(self, start: np.ndarray, faulty: np.ndarray) -> int:
        """How many of a tick's pictures still belong to the open alert (all of them when none is open: 0): up to
        the first faulty picture after a clear spell of the recovery time, which the hysteresis starts a new
        fault with."""
        op = self.hyst.open
        if op is None:
            return 0
        clear = op.clear_since
        for i in range(len(faulty)):
            if faulty[i]:
                if clear is not None and start[i] - clear >= self.hyst.recovery - 1e-9:
                    return i
                clear = None
            elif clear is None:
                clear = float(start[i])
        return len(faulty)

    def _review_better_picture(self) -> None:
        """An open alert's review record follows the likeliest picture of the whole fault, not only of its onset:
        damage often spreads for a few pictures after the alert fires, and the operator judges the worst."""
        rec, ev, op = self._reviewed, self._evidence, self.hyst.open
        if rec is None or ev is None or op is None or op.event.id != rec.alert_id or ev.get("plane") is None:
            return
        if rec.probability is not None and ev["prob"] <= rec.probability:
            return
        from engine.review import ReviewError

        review = self.ctx.extra.get("review")
        try:
            judged = review is None or review.get(rec.alert_id).verdict is not None
        except ReviewError:  # the record is gone or unreadable: not ours to rewrite
            judged = True
        if judged:  # an operator's verdict is on the picture already stored: that one stays
            self._reviewed = None
            return
        self._reviewed = replace(rec, probability=ev["prob"], box=ev["box"])
        review.add(self._reviewed, ev["plane"], ev.get("map"))
        self._evidence = None

    def _make_event(self, start: float, value: float | None) -> Event:
        ev = self._evidence or {}
        box = ev.get("box")
        event = super()._make_event(start, value)
        details = {**event.details, "box": None if box is None else [round(b, 4) for b in box]}
        model = self.ctx.extra.get("corruption_model")
        if callable(model):
            details["model"] = model(self.config.weights)
        if box is not None and event.thumbnail and self.ctx.extra.get("mark_thumbnail"):
            self.ctx.extra["mark_thumbnail"](event.thumbnail, box)
        review = self.ctx.extra.get("review")
        if review is not None and ev.get("plane") is not None:
            from engine.review import ReviewRecord

            rec = ReviewRecord(alert_id=event.id, stream=event.stream, start=event.start, wallclock=event.wallclock,
                               probability=ev.get("prob"), threshold=self.threshold(), model_version=details.get("model"),
                               box=box)
            if review.add(rec, ev["plane"], ev.get("map")) is not None:
                self._reviewed = rec
            details["review"] = True
        self._evidence = None
        return replace(event, details=details)
