"""Corruption detection on held-out packet-loss damage: framewatch's CNN against FFmpeg's blockdetect and the
core blockiness kernel, plus what each costs.

All three score the same held-out frames (the test split of the data recipe: source clips never seen in
training). Each gets its decision threshold from the validation split (the CNN's is stored in its weights; the
peers get their best-F1 threshold there), then is scored on the test split. Costs: CPU ms per 1080p frame on
one thread (the engine's setting), and GPU frames/s for the model where a GPU is present.

    python benchmarks/corruption_vs_blockdetect.py [--weights PATH] [--out benchmarks/results/corruption_vs_blockdetect.json]
    python benchmarks/corruption_vs_blockdetect.py --cost-only   # the costs alone, on another machine (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corruption_peers import best_threshold, blockdetect_scores, blockiness_scores, prf_at  # noqa: E402

from engine.runner import tune_allocator  # noqa: E402
from models.data.generate import CORRUPT, Recipe, build, load_split  # noqa: E402
from models.evaluate import evaluate, f1_interval  # noqa: E402
from models.train import frame_probabilities, shard_inputs  # noqa: E402
from models.weights import SHIPPED, load  # noqa: E402


def _frames(split: str, folder: Path):
    shards = load_split(folder, split, native=True)
    if any(s.native is None for s in shards):
        raise SystemExit(f"split {split} was built without native luma (Recipe.native_splits)")
    return shards


def _peer(fn, shards) -> tuple[np.ndarray, float]:
    """Scores of a peer over every frame of the shards, and its CPU seconds per frame weighted by pixels
    (normalised to 1080p)."""
    scores, cost_px = [], []
    for s in shards:
        sc, per = fn(s.native)
        scores.append(sc)
        cost_px.append((per, s.native.shape[1] * s.native.shape[2], len(sc)))
    total_s = sum(p * n for p, _, n in cost_px)
    total_px = sum(px * n for _, px, n in cost_px)
    per_1080p = total_s / total_px * 1920 * 1080
    return np.concatenate(scores), per_1080p


def _model_cpu_ms(model, threads: int, frames: int = 12, repeats: int = 5) -> float:
    """The median over `repeats` timings of `frames` pictures: one timing of 12 pictures on a shared 2-core VM
    ranged from 107 to 164 ms run to run."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randint(0, 256, (4, model.in_channels, 540, 960), dtype=torch.uint8)
        walls = []
        with torch.inference_mode():
            model(x)  # warm-up
            for _ in range(repeats):
                w0 = time.perf_counter()
                for _ in range(frames // 4):
                    model(x)
                walls.append(time.perf_counter() - w0)
    finally:
        torch.set_num_threads(old)
    return 1000 * float(np.median(walls)) / frames


def _model_cpu_costs(model) -> dict[str, float]:
    return {"cpu_ms_per_1080p_frame_1_thread": round(_model_cpu_ms(model, 1), 2),
            "cpu_ms_per_1080p_frame_2_threads": round(_model_cpu_ms(model, 2), 2)}


def _model_gpu_fps(model, batch: int = 64, seconds: float = 5.0) -> float | None:
    if not torch.cuda.is_available():
        return None
    m = model.cuda().eval()
    x = torch.randint(0, 256, (batch, m.in_channels, 540, 960), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            m(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m(x)
            n += batch
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "simd": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__}


def _costs(args, folder: Path) -> None:
    test = _frames("test", folder)
    model, meta = load(args.weights)
    out: dict = {"machine": _machine(), "model": {"path": args.weights, "version": meta.version, "tta": meta.tta},
                 "test_frames": sum(len(s.labels) for s in test)}
    for name, fn in (("ffmpeg_blockdetect", blockdetect_scores), ("core_blockiness", blockiness_scores)):
        out[name] = {"cpu_ms_per_1080p_frame": round(_peer(fn, test)[1] * 1000, 2)}
    out["framewatch_cnn"] = _model_cpu_costs(model)
    out["cnn_over_blockdetect"] = round(out["framewatch_cnn"]["cpu_ms_per_1080p_frame_1_thread"]
                                        / out["ffmpeg_blockdetect"]["cpu_ms_per_1080p_frame"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'method':24} {'CPU ms/1080p':>13}")
    print(f"{'framewatch CNN':24} {out['framewatch_cnn']['cpu_ms_per_1080p_frame_1_thread']:13.2f} "
          f"({out['framewatch_cnn']['cpu_ms_per_1080p_frame_2_threads']:.2f} with 2 threads)")
    for name in ("ffmpeg_blockdetect", "core_blockiness"):
        print(f"{name:24} {out[name]['cpu_ms_per_1080p_frame']:13.2f}")
    print(f"results: {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(SHIPPED))
    ap.add_argument("--out", default=None, help="JSON results (default: results/corruption_vs_blockdetect.json, "
                    "with --cost-only results/corruption_cost.json)")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the CPU costs (the CNN, blockdetect and the core kernel on the held-out frames): the F1 "
                         "figures depend on the data's bytes, which are the same on every CPU, the costs do not")
    args = ap.parse_args()
    results_dir = Path(__file__).parent / "results"
    args.out = args.out or str(results_dir / ("corruption_cost.json" if args.cost_only else "corruption_vs_blockdetect.json"))
    # The allocator settings every engine process scoring pictures runs with (engine.runner.tune_allocator): without
    # them each large activation is a fresh mmap, and on a 2-core AVX2 VM the page faults took 40-55 % of the model's
    # time (README, Corruption model: measured).
    tune_allocator()
    torch.set_num_threads(1)
    recipe = Recipe()
    folder = build(recipe)
    if args.cost_only:
        _costs(args, folder)
        return
    val, test = _frames("val", folder), _frames("test", folder)
    y_val = np.concatenate([s.labels for s in val]).astype(int)
    y_test = np.concatenate([s.labels for s in test]).astype(int)
    kind = np.concatenate([[s.kind] * len(s.labels) for s in test])
    decode = np.concatenate([[i] * len(s.labels) for i, s in enumerate(test)]).astype(int)  # a shard is one decode
    packet = kind != "synthetic"
    model, meta = load(args.weights)
    # As the engine runs it (tier all): each picture with the one shown before it.
    probs, _ = frame_probabilities(model, shard_inputs(test), torch.device("cpu"), meta.frame_blocks)
    # And with no picture before (a sparse tier, a stream's first picture): the picture alone.
    alone, _ = frame_probabilities(model, [torch.from_numpy(p) for s in test for p in s.planes], torch.device("cpu"), meta.frame_blocks)
    results: dict = {"machine": _machine(),
                     "recipe_hash": recipe.hash, "model": {"path": args.weights, "version": meta.version},
                     "test_frames": int(len(y_test)), "test_corrupt": int((y_test == CORRUPT).sum())}
    # As the engine runs it: every picture of each held-out decode in order, key frames read alone, the model's
    # decision rule (held until the next key frame, loss evidence), scored on the same frames.
    seq = evaluate(args.weights, "test", device="cpu")
    o = seq["overall"]
    # f1_ci95: 95 % bootstrap interval over whole decodes (models.evaluate.f1_interval): the split is a few dozen
    # damage episodes, and a difference between two figures inside it is not a difference.
    fw = {"precision": o["precision"], "recall": o["recall"], "f1": o["f1"], "f1_ci95": o.get("f1_ci95")}
    results["framewatch_cnn"] = {"threshold": meta.threshold, "threshold_from": "validation split (in the weights)",
                                 "rule": seq["rule"], **fw, "all_labelled_pictures": seq["all_labelled"],
                                 "clean_real_clips_whole": seq["clean_real_clips_whole"],
                                 # Per loss rather than per picture: damage episodes met and how soon.
                                 "episodes": seq["episodes"]}
    # The loss evidence alone, no model (what the transport and the decoder report, held to the key frame as
    # the engine carries it): how much of the figure above is the model's.
    from models.data.sequences import sequences
    from models.evaluate import prf

    ev = [(q.damaged[m], q.labels[m], np.full(int(m.sum()), i)) for i, q in enumerate(sequences(recipe, folder, "test"))
          for m in [q.sampled & (q.labels >= 0)]]
    ev_pred, ev_y, ev_g = (np.concatenate(x) for x in zip(*ev, strict=True))
    results["loss_evidence_alone"] = {**prf(ev_pred, ev_y), "f1_ci95": f1_interval(ev_pred, ev_y, ev_g)}
    # Each picture by itself (the shards' frames with the picture before): the frame-by-frame figures of before.
    frame_thr = meta.metrics.get("frame_rule_threshold", meta.threshold)
    results["framewatch_cnn_frame_by_frame"] = {"threshold": frame_thr, **prf_at(probs[packet], (y_test[packet] == CORRUPT).astype(int), frame_thr)}
    results["framewatch_cnn_without_previous_picture"] = prf_at(alone[packet], (y_test[packet] == CORRUPT).astype(int), frame_thr)
    peers = {}
    for name, fn in (("ffmpeg_blockdetect", blockdetect_scores), ("core_blockiness", blockiness_scores)):
        s_val, _ = _peer(fn, val)
        s_test, per = _peer(fn, test)
        thr, f1_val = best_threshold(s_val, (y_val == CORRUPT).astype(int))
        r = prf_at(s_test[packet], (y_test[packet] == CORRUPT).astype(int), thr)
        r["f1_ci95"] = f1_interval(s_test[packet] >= thr, y_test[packet], decode[packet])
        # For reference only: the best any threshold could do on the test split itself (an oracle).
        _, oracle = best_threshold(s_test[packet], (y_test[packet] == CORRUPT).astype(int))
        peers[name] = {"threshold": thr, "threshold_from": "best F1 on the validation split", "val_f1": round(f1_val, 4),
                       **r, "oracle_test_f1": round(oracle, 4), "cpu_ms_per_1080p_frame": round(per * 1000, 2)}
    results.update(peers)
    results["framewatch_cnn"].update(_model_cpu_costs(model))
    gpu = _model_gpu_fps(model)
    results["framewatch_cnn"]["gpu_frames_per_s_1080p"] = round(gpu, 1) if gpu else "not run (no CUDA device)"
    results["target"] = {"f1_at_least": 0.95, "strictly_above_blockdetect": True,
                         "met": bool(fw["f1"] >= 0.95 and fw["f1"] > peers["ffmpeg_blockdetect"]["f1"])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    ci = lambda r: "{:.3f}-{:.3f}".format(*r["f1_ci95"]) if r.get("f1_ci95") else "-"  # noqa: E731
    print(f"{'method':24} {'F1':>7} {'F1 95 %':>12} {'precision':>9} {'recall':>7} {'CPU ms/1080p':>13}")
    print(f"{'framewatch CNN (engine)':24} {fw['f1']:7.4f} {ci(fw):>12} {fw['precision']:9.4f} {fw['recall']:7.4f} "
          f"{results['framewatch_cnn']['cpu_ms_per_1080p_frame_1_thread']:13.2f}")
    for name, r in peers.items():
        print(f"{name:24} {r['f1']:7.4f} {ci(r):>12} {r['precision']:9.4f} {r['recall']:7.4f} {r['cpu_ms_per_1080p_frame']:13.2f}")
    a = results["loss_evidence_alone"]
    print(f"{'  (loss evidence alone)':24} {a['f1']:7.4f} {ci(a):>12} {a['precision']:9.4f} {a['recall']:7.4f}")
    a = results["framewatch_cnn_frame_by_frame"]
    print(f"{'  (frame by frame)':24} {a['f1']:7.4f} {a['precision']:9.4f} {a['recall']:7.4f}")
    a = results["framewatch_cnn_without_previous_picture"]
    print(f"{'  (picture alone)':24} {a['f1']:7.4f} {a['precision']:9.4f} {a['recall']:7.4f}")
    print(f"GPU frames/s (1080p, fp16): {results['framewatch_cnn']['gpu_frames_per_s_1080p']}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
