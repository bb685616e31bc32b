"""Evaluation of a corruption model on the held-out split: precision, recall, F1 at the model's threshold,
average precision, a PR curve (PNG), and the same per damage kind, per source clip and per codec. Also the
comparison that decides whether a candidate model may replace the current one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data.generate import CORRUPT, Recipe, build, load_split
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
             data_root: str | None = None, device: str = "auto", threshold: float | None = None) -> dict[str, Any]:
    sc, meta = score_split(weights, split, recipe, data_root, device)
    r = report(sc, meta.threshold if threshold is None else threshold)
    precision, recall = r.pop("_curve")
    result = {"model": {"path": str(weights), "version": meta.version, "recipe_hash": meta.recipe_hash},
              "split": split, **r}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["pr_curve_png"] = str(plot_pr({meta.version: (precision, recall, r)}, out / "pr_curve.png",
                                             f"corruption model {meta.version}, {split} split"))
        (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def compare(candidate: str | Path, current: str | Path, split: str = "test", out_dir: str | Path | None = None,
            recipe: Recipe | None = None, data_root: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Both models on the same held-out frames. The candidate is `better_or_equal` only when its F1 is not lower
    and it raises no more false alarms on the clean real clips: promotion refuses anything else."""
    sc_new, m_new = score_split(candidate, split, recipe, data_root, device)
    sc_old, m_old = score_split(current, split, recipe, data_root, device)
    r_new, r_old = report(sc_new, m_new.threshold), report(sc_old, m_old.threshold)
    c_new, c_old = r_new.pop("_curve"), r_old.pop("_curve")
    reasons = []
    if r_new["overall"]["f1"] < r_old["overall"]["f1"]:
        reasons.append(f"F1 {r_new['overall']['f1']:.4f} < current {r_old['overall']['f1']:.4f}")
    if r_new["clean_real_clips"]["false_alarm_frames"] > r_old["clean_real_clips"]["false_alarm_frames"]:
        reasons.append(f"{r_new['clean_real_clips']['false_alarm_frames']} false-alarm frames on clean real clips "
                       f"> current {r_old['clean_real_clips']['false_alarm_frames']}")
    result = {"split": split, "candidate": {"path": str(candidate), "version": m_new.version, **r_new},
              "current": {"path": str(current), "version": m_old.version, **r_old},
              "better_or_equal": not reasons, "reasons": reasons}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["pr_curve_png"] = str(plot_pr({f"candidate {m_new.version}": (*c_new, r_new), f"current {m_old.version}": (*c_old, r_old)},
                                             out / "pr_compare.png", f"candidate vs current, {split} split"))
        (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
