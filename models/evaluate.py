"""Evaluation of a corruption model on the held-out split: precision, recall, F1 at the model's threshold,
average precision, a PR curve (PNG), and the same per damage kind, per source clip and per codec. Also the
comparison that decides whether a candidate model may replace the current one.

Evaluation runs the model the way the engine does: over every picture of each held-out decode in order
(models.data.sequences), with the engine's input pairing and its decision rule (engine.detectors.corruption.GopHold:
a probability held until the next key frame, loss evidence from the transport), and scores the frames the split's
shards hold (so figures compare with frame-by-frame ones), plus every labelled picture and the clean real clips
whole (false-alarm pictures and events)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.corruption import top_logits
from models.data.generate import AMBIGUOUS, CORRUPT, Recipe, build, load_split
from models.train import frame_probabilities, pick_device, shard_inputs
from models.weights import load


def prf(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 (0.0 where undefined) and the counts."""
    y = labels == CORRUPT
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _boot_f1(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """F1 of each bootstrap draw (rows of decode indices), from per-decode counts."""
    y = labels == CORRUPT
    k = draws.shape[1]
    tp, fp, fn = (np.bincount(groups, m.astype(float), k)[draws].sum(1) for m in (pred & y, pred & ~y, ~pred & y))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(len(draws)), where=denom > 0)


def _draws(groups: np.ndarray, n: int, seed: int) -> np.ndarray | None:
    k = int(groups.max()) + 1 if len(groups) else 0
    return np.random.default_rng(seed).integers(0, k, (n, k)) if k >= 2 else None


def f1_interval(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of F1, resampling whole decodes (`groups`: the decode of each frame) rather than
    frames: a decode's pictures share their damage, content and codec, so frames are not independent draws and
    a frame bootstrap would claim far more certainty than a split of a few dozen damage episodes holds."""
    draws = _draws(groups, n, seed)
    if draws is None:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(_boot_f1(pred, labels, groups, draws), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def f1_difference(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray, groups: np.ndarray, n: int = 2000,
                  seed: int = 0) -> dict[str, float]:
    """F1 of A minus F1 of B on the same frames, with its 95 % paired bootstrap interval (both models on the
    same resampled decodes, so the content both find hard cancels out: far narrower than the two intervals
    side by side) and the share of draws where A is ahead."""
    out = {"difference": round(prf(pred_a, labels)["f1"] - prf(pred_b, labels)["f1"], 4)}
    draws = _draws(groups, n, seed)
    if draws is None:
        return {**out, "ci95": [float("nan"), float("nan")], "a_ahead": float("nan")}
    d = _boot_f1(pred_a, labels, groups, draws) - _boot_f1(pred_b, labels, groups, draws)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {**out, "ci95": [round(float(lo), 4), round(float(hi), 4)], "a_ahead": round(float((d > 0).mean()), 4)}


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(precision, recall, average precision) over every threshold."""
    order = np.argsort(-scores, kind="stable")
    y = (labels[order] == CORRUPT).astype(np.float64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(1.0, y.sum())
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return precision, recall, ap


@dataclass
class Scored:
    probs: np.ndarray
    labels: np.ndarray
    kind: np.ndarray
    source: np.ndarray
    codec: np.ndarray
    sample: np.ndarray  # from a real (sample) clip rather than generated content


def same_inputs(seq, ref) -> np.ndarray:
    """(N,) bool: the pictures of decode `seq` the model reads exactly as it reads the same picture of decode `ref`
    (the same picture, key flag and, unless read alone, picture before). A damaged decode is its clip's clean decode
    up to the first loss and again after the key frame that heals it: about two thirds of the validation split's
    pixels (2026-12-08)."""
    n = len(seq.labels)
    out = np.zeros(n, dtype=bool)
    if ref is None or ref is seq or ref.planes.shape[1:] != seq.planes.shape[1:]:
        return out
    # Compared index by index: a decode that lost pictures still shares those before the loss (after it, the
    # comparison finds what it finds: equal inputs give equal probabilities whatever they mean).
    m = min(n, len(ref.labels))
    if m == 0:
        return out
    eq = (seq.planes[:m] == ref.planes[:m]).reshape(m, -1).all(1) & (np.asarray(seq.key[:m], bool) == np.asarray(ref.key[:m], bool))
    alone = np.asarray(seq.key[:m], bool).copy()
    alone[0] = True
    out[:m] = eq & (alone | np.r_[True, eq[:-1]])
    return out


@torch.inference_mode()
def sequence_probs(model, seq, device: torch.device, frame_blocks: float, fps: float = 0.0, batch: int = 8,
                   reference: tuple[Any, np.ndarray] | None = None) -> np.ndarray:
    """Frame probabilities of one whole decode (models.data.sequences.Sequence) as the engine's corruption family
    gives them: the pictures it analyses at `fps` (engine.corruption.analysed; NaN for the others), each read with
    the picture shown before it, except key frames and the first picture, read alone. `reference`: another decode
    of the same clip and its probabilities (the clean decode), taken over for the pictures read alike (same_inputs)
    instead of computed again."""
    from engine.corruption import analysed

    model.eval()
    n = len(seq.labels)
    pts = np.arange(n) / seq.fps
    chosen, last = [], None
    for i in range(n):
        if analysed(float(pts[i]), bool(seq.key[i] or seq.corrupt[i] or seq.damaged[i]), last, fps):
            chosen.append(i)
            last = float(pts[i])
    probs = np.full(n, np.nan)
    if reference is not None:
        ref_probs = np.full(n, np.nan)
        ref_probs[: min(n, len(reference[1]))] = reference[1][:n]
        known = same_inputs(seq, reference[0]) & ~np.isnan(ref_probs)
        taken = [i for i in chosen if known[i]]
        probs[taken] = ref_probs[taken]
        chosen = [i for i in chosen if not known[i]]
    planes = torch.from_numpy(seq.planes)
    for a in range(0, len(chosen), batch):
        sel = chosen[a: a + batch]
        before = [i if (i == 0 or seq.key[i]) else i - 1 for i in sel]
        x = torch.stack([planes[sel], planes[before]], 1).to(device)
        logits = model(x[:, : model.in_channels]).float()
        probs[sel] = torch.sigmoid(top_logits(logits, frame_blocks)).cpu().numpy()
    return probs


def hold_levels(probs: np.ndarray, seq, rule: str) -> np.ndarray:
    """Per picture, the score whose crossing of a threshold is the detector's decision under `rule`
    (engine.detectors.corruption.GopHold, without its max_hold release, which decoded GOPs here never reach): the
    probability, its highest value since the last key frame, and +inf for loss evidence with "hold+evidence"."""
    out = np.full(len(probs), np.nan)
    level = np.nan
    for i, p in enumerate(probs):
        if rule != "frame" and seq.key[i]:
            level = np.nan
        if not np.isnan(p):
            level = p if rule == "frame" or np.isnan(level) else max(level, p)
        out[i] = level
        if rule == "hold+evidence" and seq.damaged[i]:
            out[i] = np.inf
    return np.nan_to_num(out, nan=-1.0)


def hold_decisions(probs: np.ndarray, seq, rule: str, threshold: float, max_hold: float = 10.0) -> np.ndarray:
    """The detector's per-picture decisions over one decode: engine.detectors.corruption.GopHold itself."""
    from engine.detectors.corruption import GopHold

    faulty, _ = GopHold(max_hold).update(np.arange(len(probs)) / seq.fps, probs, seq.key, seq.damaged, threshold,
                                         hold=rule != "frame", use_evidence=rule == "hold+evidence")
    return faulty


def _events(faulty: np.ndarray, fps: float, onset: float = 0.3, recovery: float = 0.5) -> int:
    """Events the detector's onset/recovery state machine (defaults of CorruptionConfig) raises on decisions."""
    from engine.detectors.base import Hysteresis

    class _Ev:
        def resolved(self, *a, **k):
            return self

    fired = []
    h = Hysteresis(onset, recovery, make_event=lambda start, value: fired.append(start) or _Ev(), emit=lambda e: None)
    t = np.arange(len(faulty)) / fps
    h.update(t, t + 1.0 / fps, faulty)
    h.finish()
    return len(fired)


def episodes(decisions: np.ndarray, labels: np.ndarray) -> list[tuple[int, int | None]]:
    """Damage episodes of one decode and how the detector met them: [(length, latency)], where an episode is a
    run of pictures labelled corrupt or ambiguous (damage fading, drift) holding at least one corrupt picture,
    ended by a clean or unscored picture; its length counts pictures from its first corrupt one, and latency is
    the pictures from that one to the first picture decided faulty in the run (0 when the detector was already
    on; None: missed). Operators count alerts per loss, not per picture: this is how many losses they see."""
    out: list[tuple[int, int | None]] = []
    i, n = 0, len(labels)
    while i < n:
        if labels[i] not in (CORRUPT, AMBIGUOUS):
            i += 1
            continue
        j = i
        while j < n and labels[j] in (CORRUPT, AMBIGUOUS):
            j += 1
        run = slice(i, j)
        bad = np.flatnonzero(labels[run] == CORRUPT)
        if len(bad):
            first = i + int(bad[0])
            hits = np.flatnonzero(decisions[run])
            out.append((j - first, max(0, i + int(hits[0]) - first) if len(hits) else None))
        i = j
    return out


def episode_report(found: list[tuple[str, int, int | None, float]]) -> dict[str, Any]:
    """Summary of (kind, length, latency, fps) episodes: how many, how many the detector met, its latency in
    pictures and in milliseconds (median, 90th percentile, largest), the lengths of those missed, and the counts
    per damage kind."""
    met = [x for x in found if x[2] is not None]
    out: dict[str, Any] = {
        "episodes": len(found), "detected": len(met), "share": round(len(met) / len(found), 4) if found else 0.0,
        "missed_lengths": sorted(x[1] for x in found if x[2] is None),
    }
    for name, values in (("latency_pictures", [float(x[2]) for x in met]),
                         ("latency_ms", [1000.0 * x[2] / x[3] for x in met])):
        if values:
            v = np.array(values)
            out[name] = {"median": round(float(np.median(v)), 1), "p90": round(float(np.percentile(v, 90)), 1),
                         "max": round(float(v.max()), 1)}
    out["per_kind"] = {k: {"episodes": sum(x[0] == k for x in found),
                           "detected": sum(x[0] == k and x[2] is not None for x in found)}
                       for k in sorted({x[0] for x in found})}
    return out


@dataclass
class SequenceScored:
    scored: Scored  # the shards' frames (each decode's sampled pictures): `probs` hold hold_levels
    seqs: list  # every decode of the split
    probs: list[np.ndarray]  # frame probabilities of every picture of every decode (NaN: not analysed)
    rule: str
    groups: np.ndarray  # the decode (index into seqs) of each of `scored`'s frames


def score_sequences(model, meta, split: str, recipe: Recipe, folder: Path, rule: str | None = None,
                    fps: float = 0.0) -> SequenceScored:
    """Every decode of a split run through the engine's decision (sequence_probs, then GopHold under `rule`,
    the model's own by default), scored on the frames the split's shards hold."""
    from engine.runner import tune_allocator
    from models.data.sequences import sequences

    # The engine's allocator settings: without them every whole picture's activations are fresh pages (on a
    # 2-core AVX2 VM page faults were 40-55 % of the model's time).
    tune_allocator()
    rule = rule or getattr(meta, "decision", "frame")
    seqs = sequences(recipe, folder, split)
    if not seqs:
        raise ValueError(f"split {split!r} of data set {recipe.hash} holds no frames")
    device = next(model.parameters()).device
    kinds = {s.name: s.kind for s in recipe.sources}
    # Each clip's clean decode first: the damaged decodes take over its probabilities where they read alike.
    clean = {(q.source, q.codec): i for i, q in enumerate(seqs) if q.kind == "clean"}
    probs: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
    for i in sorted(range(len(seqs)), key=lambda i: seqs[i].kind != "clean"):
        q = seqs[i]
        c = clean.get((q.source, q.codec))
        ref = (seqs[c], probs[c]) if c is not None and c != i else None
        probs[i] = sequence_probs(model, q, device, meta.frame_blocks, fps, reference=ref)
    levels, labels, kind, source, codec, sample, groups = [], [], [], [], [], [], []
    for i, (q, p) in enumerate(zip(seqs, probs, strict=True)):
        m = q.sampled & (q.labels >= 0)
        groups.append(np.full(int(m.sum()), i))
        levels.append(hold_levels(p, q, rule)[m])
        labels.append(q.labels[m])
        for lst, v in ((kind, q.kind), (source, q.source), (codec, q.codec), (sample, kinds.get(q.source) == "sample")):
            lst.append(np.array([v] * int(m.sum())))
    sc = Scored(np.concatenate(levels), np.concatenate(labels), np.concatenate(kind), np.concatenate(source),
                np.concatenate(codec), np.concatenate(sample).astype(bool))
    return SequenceScored(sc, seqs, probs, rule, np.concatenate(groups))


def data_digest(seqs) -> str:
    """A digest of a split's decodes (pictures and labels, in order): two evaluations measured the same data
    exactly when their digests agree, whatever machine built them."""
    h = hashlib.sha256()
    for q in seqs:
        h.update(f"{q.source}/{q.codec}/{q.kind}{f'-{q.draw}' if q.draw else ''}".encode())
        for a in (q.planes, q.labels, q.blocks, q.key, q.corrupt, q.damaged):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def sequence_report(ss: SequenceScored, threshold: float, recipe: Recipe) -> dict[str, Any]:
    """report() of the shards' frames at `threshold`, checked against the detector's own decisions, plus every
    labelled picture of every decode and the clean real clips whole (false-alarm pictures and events)."""
    out = report(ss.scored, threshold)
    kinds = {s.name: s.kind for s in recipe.sources}
    dec_all, lab_all, fa, frames, events, mismatch = [], [], 0, 0, 0, 0
    found: list[tuple[str, int, int | None, float]] = []
    for q, p in zip(ss.seqs, ss.probs, strict=True):
        d = hold_decisions(p, q, ss.rule, threshold)
        if q.kind not in ("clean", "synthetic"):
            found.extend((q.kind, length, latency, q.fps) for length, latency in episodes(d, q.labels))
        m = q.sampled & (q.labels >= 0)
        mismatch += int((d[m] != (hold_levels(p, q, ss.rule)[m] >= threshold)).sum())
        ok = q.labels >= 0
        dec_all.append(d[ok])
        lab_all.append(q.labels[ok])
        if q.kind == "clean" and kinds.get(q.source) == "sample":
            frames += len(d)
            fa += int(d.sum())
            events += _events(d, q.fps)
    if mismatch:
        raise AssertionError(f"{mismatch} pictures decided differently by the detector and by the evaluation's scores")
    out["rule"] = ss.rule
    out["all_labelled"] = prf(np.concatenate(dec_all), np.concatenate(lab_all))
    out["clean_real_clips_whole"] = {"frames": frames, "false_alarm_frames": fa, "events": events}
    out["episodes"] = episode_report(found)
    out["data_digest"] = data_digest(ss.seqs)
    out["overall"]["f1_ci95"] = f1_interval(ss.scored.probs >= threshold, ss.scored.labels, ss.groups)
    return out


def calibrate(model, meta, recipe: Recipe, folder: Path, rules: tuple[str, ...] = ("frame", "hold", "hold+evidence")
              ) -> dict[str, tuple[float, float]]:
    """{rule: (threshold, F1)}: the best-F1 threshold of each decision rule on the validation split's decodes, run
    as the engine runs them (one scoring pass for all rules)."""
    from models.train import best_f1_threshold

    ss = score_sequences(model, meta, "val", recipe, folder, "frame")
    out = {}
    for rule in rules:
        lv = [hold_levels(p, q, rule)[q.sampled & (q.labels >= 0)] for q, p in zip(ss.seqs, ss.probs, strict=True)]
        out[rule] = best_f1_threshold(np.concatenate(lv), ss.scored.labels)
    return out


def score_split(weights: str | Path, split: str = "test", recipe: Recipe | None = None, data_root: str | None = None,
                device: str = "auto") -> tuple[Scored, Any]:
    model, meta = load(weights, pick_device(device))
    r = recipe or Recipe()
    folder = build(r, Path(data_root) if data_root else None)
    shards = load_split(folder, split)
    if not shards:
        raise ValueError(f"split {split!r} of data set {r.hash} holds no frames")
    kinds = {s.name: s.kind for s in r.sources}
    planes = shard_inputs(shards)
    probs, _ = frame_probabilities(model, planes, next(model.parameters()).device, meta.frame_blocks)
    rep = lambda attr: np.concatenate([[getattr(s, attr)] * len(s.labels) for s in shards])  # noqa: E731
    return Scored(
        probs=probs,
        labels=np.concatenate([s.labels for s in shards]),
        kind=rep("kind"),
        source=rep("source"),
        codec=rep("codec"),
        sample=np.concatenate([[kinds.get(s.source) == "sample"] * len(s.labels) for s in shards]),
    ), meta


def report(sc: Scored, threshold: float) -> dict[str, Any]:
    pred = sc.probs >= threshold
    precision, recall, ap = pr_curve(sc.probs, sc.labels)
    out: dict[str, Any] = {
        "threshold": threshold,
        "frames": int(len(sc.labels)),
        "corrupt_frames": int((sc.labels == CORRUPT).sum()),
        "overall": {**prf(pred, sc.labels), "average_precision": round(ap, 4)},
    }
    packet = sc.kind != "synthetic"
    out["packet_loss"] = prf(pred[packet], sc.labels[packet])
    for group, values in (("per_kind", sc.kind), ("per_source", sc.source), ("per_codec", sc.codec)):
        out[group] = {}
        for v in sorted(set(values.tolist())):
            m = values == v
            r = prf(pred[m], sc.labels[m])
            if not (sc.labels[m] == CORRUPT).any():  # clean-only groups: what matters is false alarms
                r = {"frames": int(m.sum()), "false_alarm_frames": r["fp"]}
            out[group][v] = r
    clean_real = (sc.kind == "clean") & sc.sample
    out["clean_real_clips"] = {"frames": int(clean_real.sum()), "false_alarm_frames": int((pred & clean_real).sum())}
    out["_curve"] = (precision, recall)
    return out


def plot_pr(curves: dict[str, tuple[np.ndarray, np.ndarray, dict]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, (precision, recall, r) in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP {r['overall']['average_precision']:.3f}, F1 {r['overall']['f1']:.3f})")
        o = r["overall"]
        ax.plot([o["recall"]], [o["precision"]], "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(weights: str | Path, split: str = "test", out_dir: str | Path | None = None, recipe: Recipe | None = None,
             data_root: str | None = None, device: str = "auto", threshold: float | None = None, rule: str | None = None,
             fps: float = 0.0) -> dict[str, Any]:
    """The model on the held-out decodes, run as the engine runs it (every picture in order, `fps` 0: all analysed,
    the model's decision rule unless `rule` says otherwise), scored on the split's labelled frames."""
    model, meta = load(weights, pick_device(device))
    r = recipe or Recipe()
    folder = build(r, Path(data_root) if data_root else None)
    ss = score_sequences(model, meta, split, r, folder, rule, fps)
    rep = sequence_report(ss, meta.threshold if threshold is None else threshold, r)
    precision, recall = rep.pop("_curve")
    result = {"model": {"path": str(weights), "version": meta.version, "recipe_hash": meta.recipe_hash},
              "split": split, "fps": fps, **rep}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["pr_curve_png"] = str(plot_pr({meta.version: (precision, recall, rep)}, out / "pr_curve.png",
                                             f"corruption model {meta.version} ({ss.rule}), {split} split"))
        (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def compare(candidate: str | Path, current: str | Path, split: str = "test", out_dir: str | Path | None = None,
            recipe: Recipe | None = None, data_root: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Both models on the same held-out decodes, each with its own decision rule and threshold. The candidate is
    `better_or_equal` only when its F1 is not lower and it raises no more false alarms on the clean real clips:
    promotion refuses anything else."""
    r = recipe or Recipe()
    folder = build(r, Path(data_root) if data_root else None)
    reps, metas, curves, preds = [], [], [], []
    for w in (candidate, current):
        model, meta = load(w, pick_device(device))
        ss = score_sequences(model, meta, split, r, folder)
        rep = sequence_report(ss, meta.threshold, r)
        curves.append(rep.pop("_curve"))
        reps.append(rep)
        metas.append(meta)
        preds.append((ss.scored.probs >= meta.threshold, ss.scored.labels, ss.groups))
    (r_new, r_old), (m_new, m_old), (c_new, c_old) = reps, metas, curves
    reasons = []
    if r_new["overall"]["f1"] < r_old["overall"]["f1"]:
        reasons.append(f"F1 {r_new['overall']['f1']:.4f} < current {r_old['overall']['f1']:.4f}")
    fa_new, fa_old = (x["clean_real_clips_whole"]["false_alarm_frames"] for x in (r_new, r_old))
    if fa_new > fa_old:
        reasons.append(f"{fa_new} false-alarm frames on clean real clips > current {fa_old}")
    result = {"split": split, "candidate": {"path": str(candidate), "version": m_new.version, **r_new},
              "current": {"path": str(current), "version": m_old.version, **r_old},
              "better_or_equal": not reasons, "reasons": reasons}
    (pa, labels, groups), (pb, _, _) = preds  # the same frames in the same order for both
    result["f1_difference"] = f1_difference(pa, pb, labels, groups)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["pr_curve_png"] = str(plot_pr({f"candidate {m_new.version}": (*c_new, r_new), f"current {m_old.version}": (*c_old, r_old)},
                                             out / "pr_compare.png", f"candidate vs current, {split} split"))
        (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
