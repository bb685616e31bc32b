"""The corruption CNN: training improves it, weights files load or fail clearly, a running engine swaps models
safely, and the label -> retrain -> evaluate -> promote loop works end to end on a tiny data set."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from media import run_cli

from engine.corruption import ModelSlot
from engine.review import ReviewRecord, ReviewStore
from models.data.content import SourceSpec
from models.data.damage import DamageSpec
from models.data.generate import Recipe, build, load_split
from models.data.sequences import EVIDENCE
from models.evaluate import (
    episode_report,
    episodes,
    f1_difference,
    f1_interval,
    same_inputs,
    score_sequences,
    sequence_probs,
)
from models.net import CorruptionNet, parameters_count, widen
from models.train import (
    Item,
    TrainConfig,
    _crop,
    best_f1_threshold,
    dataset_loss,
    items_from_shards,
    mine_hard_negatives,
    native_bf16,
    one_cycle,
    train,
)
from models.weights import SHIPPED, ModelMeta, WeightsError, load, record_metrics, save

TINY = Recipe(
    sources=(SourceSpec("t-train", "generated", "train", seed=11, width=320, height=192, seconds=2.0),
             SourceSpec("t-val", "generated", "val", seed=12, width=320, height=192, seconds=2.0),
             SourceSpec("t-test", "generated", "test", seed=13, width=320, height=192, seconds=2.0)),
    codecs=("h264",), damages=(DamageSpec("burst", 1.0, (10, 30)), DamageSpec("garble", 1.0, (2, 5))),
    clean_per_codec=6, per_decode=(10, 5), synthetic_share=0.0, native_splits=(), draws=(),
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    folder = build(TINY, root, workers=1)
    return root, folder


def test_model_is_small_and_maps_macroblocks() -> None:
    m = CorruptionNet().eval()
    assert parameters_count(m) <= 1_000_000
    with torch.inference_mode():
        out = m(torch.zeros(2, 2, 540, 960, dtype=torch.uint8))
        one = CorruptionNet(in_channels=1).eval()(torch.zeros(2, 540, 960, dtype=torch.uint8))
    assert out.shape == one.shape == (2, 68, 120)  # one logit per 16x16 macroblock of a 1080p picture (1088 coded rows)


def test_test_time_views_average_the_turned_picture_s_map_turned_back() -> None:
    """The 180-degree view: the map is the mean of the picture's logits and of the turned picture's logits turned
    back, so turning the picture turns the map exactly (on whole macroblocks); a picture that is not whole
    macroblocks is padded first, so the turn keeps the codec's grid in place. Training sees one view only."""
    torch.manual_seed(0)
    m = CorruptionNet(width=16).eval()
    for b in m.modules():  # running statistics away from 0/1, so a wrong turn cannot cancel out
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (3, 2, 64, 96), dtype=torch.uint8)
    with torch.inference_mode():
        plain = m(x)
        m.tta = "rot180"
        both = m(x)
        assert torch.allclose(both, (plain + m._logits(_normalised(x).flip(-2, -1)).flip(-2, -1)) / 2, atol=1e-5)
        assert torch.allclose(m(x.flip(-2, -1)), both.flip(-2, -1), atol=1e-5)
        assert not torch.allclose(both, plain, atol=1e-3)
        odd = x[..., :60, :90]  # 7.5 x 11.25 macroblocks: padded to 8 x 12, turned, cut back
        padded = torch.nn.functional.pad(_normalised(odd), (0, 6, 0, 4), mode="replicate")
        want = (m._logits(padded) + m._logits(padded.flip(-2, -1)).flip(-2, -1))[:, :8, :12] / 2
        assert torch.allclose(m(odd), want, atol=1e-5)
        m.tta = "mirror+rot180"
        three = m(x)
        assert torch.allclose(three, (plain + m._logits(_normalised(x).flip(-1)).flip(-1)
                                      + m._logits(_normalised(x).flip(-2, -1)).flip(-2, -1)) / 3, atol=1e-5)
    m.train()
    with torch.no_grad():
        m.tta = "rot180"
        assert m(x).shape == (3, 8, 12)  # one view in training mode (its batch statistics are its own)
    with pytest.raises(ValueError, match="tta must be one of none, mirror, rot180, mirror\\+rot180, not 'sideways'"):
        CorruptionNet(tta="sideways")


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.cat([(x[:, :1] - 128.0) / 64.0, (x[:, :1] - x[:, 1:2]) / 32.0], 1)


def test_one_epoch_improves_the_loss(tiny) -> None:
    """On the labelled shards alone: with every clean picture of the clean decodes added as negatives
    (clean_sequences, the default), a tiny set is mostly negatives and one epoch's loss on the shards swings
    either way (seen: 2.0947 -> 2.0949 in one run, 2.09 -> 1.98 in another). The loss is taken with batch
    statistics, as in training: the running ones after a few dozen steps are mostly momentum. Damage moved off
    the grid and taught as clean (`offgrid`, on by default) is left out: one epoch on a tiny set cannot tell the
    phases apart yet, and with it the loss swung either way (after/before 0.82-1.35 over six seeds, against
    0.68-0.84 without).

    How much one epoch gains depends on the seed and on the tiny set, which x264 does not encode bit-exactly
    run to run: after/before was 0.60-0.88 over four seeds on one build and 0.955 for seed 0 on another (a
    clean-clone CI run, which then failed a 0.95 bound). So two seeds each must gain, and by 5 % on average."""
    root, folder = tiny
    items = items_from_shards(load_split(folder, "train"))
    ratios = []
    for seed in (0, 1):
        cfg = TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                          clean_sequences=False, seed=seed, offgrid=0.0)
        torch.manual_seed(cfg.seed)
        before = dataset_loss(CorruptionNet(width=cfg.width), items, cfg.crop, batch_stats=True)
        res = train(cfg)
        after = dataset_loss(res.model, items, cfg.crop, batch_stats=True)
        assert after < before, (seed, before, after)
        ratios.append(after / before)
        assert res.meta.recipe_hash == TINY.hash and 0.0 < res.meta.threshold < 1.0
        assert res.meta.train_config["epochs"] == 1
    assert sum(ratios) / len(ratios) < 0.95, ratios


def test_best_threshold_is_a_model_threshold_even_when_evidence_alone_scores_best() -> None:
    """Transport evidence levels (float max after hold_levels) fire whatever the threshold; a cut among them is
    no threshold (a one-epoch model once got 1.8e308 and CI failed on it). The cut is taken among probabilities."""
    ev = np.finfo(np.float64).max
    levels = np.array([ev, ev, 0.9, 0.8, 0.2, -1.0])
    labels = np.array([1, 1, 0, 0, 1, 0])
    assert best_f1_threshold(levels, labels) == pytest.approx((0.2, 0.75))
    assert best_f1_threshold(np.array([0.95, 0.9, 0.8, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx((0.9, 1.0))
    assert best_f1_threshold(np.array([ev, ev]), np.array([1, 0]))[0] == ev  # nothing else to cut at


def test_damage_episodes_count_losses_and_the_pictures_to_the_first_decision() -> None:
    """Labels 1 corrupt, -1 ambiguous, 0 clean, -2 unscored: an episode runs over corrupt and ambiguous pictures
    (from its first corrupt one), a clean or unscored picture ends it, one of ambiguous pictures alone is none."""
    labels = np.array([0, 1, 1, -1, 1, 0, -1, -1, 0, -1, 1, 1, -2, 1])
    dec = np.zeros(len(labels), bool)
    dec[[3, 13]] = True  # the first episode met 2 pictures in, the second missed, the third met at once
    assert episodes(dec, labels) == [(4, 2), (2, None), (1, 0)]
    dec[9] = True  # an ambiguous picture before the first corrupt one: met, no latency
    assert episodes(dec, labels)[1] == (2, 0)
    rep = episode_report([("burst", 4, 2, 25.0), ("bitflip", 2, None, 25.0), ("burst", 1, 0, 10.0)])
    assert rep["episodes"] == 3 and rep["detected"] == 2 and rep["share"] == pytest.approx(0.6667)
    assert rep["missed_lengths"] == [2]
    assert rep["latency_pictures"] == {"median": 1.0, "p90": 1.8, "max": 2.0}
    assert rep["latency_ms"]["max"] == 80.0
    assert rep["per_kind"] == {"bitflip": {"episodes": 1, "detected": 0}, "burst": {"episodes": 2, "detected": 2}}


def test_widening_keeps_what_the_model_computes_and_trains_from_there(tiny, tmp_path) -> None:
    torch.manual_seed(3)
    m = CorruptionNet(width=16).eval()
    for mod in m.modules():  # running statistics away from 0/1, so a BatchNorm copied wrongly shows
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    x = torch.randint(0, 256, (2, 2, 72, 104), dtype=torch.uint8)
    with torch.inference_mode():
        ref = m(x)
        for width in (16, 17, 40):
            w = widen(m, width, noise=0.0).eval()
            assert w.stem[0].out_channels == width // 2 and w.s3[0][2].out_channels == width * 2
            assert torch.allclose(w(x), ref, atol=1e-4), width
        noisy = widen(m, 40, noise=0.01).eval()
        assert 0 < float((noisy(x) - ref).abs().max()) < 0.1 * float(ref.abs().max())
    with pytest.raises(ValueError, match="at least the model's 16"):
        widen(m, 8)
    odd = CorruptionNet(width=15).eval()
    with torch.inference_mode():
        assert torch.allclose(widen(odd, 21, noise=0.0).eval()(x), odd(x), atol=1e-4)
    root, _ = tiny
    parent = tmp_path / "parent.pt"
    save(m, ModelMeta(version="p", created="", recipe_hash=TINY.hash, width=16, threshold=0.5), parent)
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            init=str(parent), width=24))
    assert res.meta.width == 24 and res.meta.parent == "p" and res.model.s2[0].body[0].in_channels == 24
    out = save(res.model, res.meta, tmp_path / "wide.pt")
    assert load(out)[1].width == 24  # the widened model loads as any other


def test_training_respects_its_time_cap(tiny) -> None:
    root, _ = tiny
    t0 = time.monotonic()
    res = train(TrainConfig(epochs=500, batch=8, minutes=0.6, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1))
    assert res.meta.train_config["stopped_early"] and 3 <= res.meta.train_config["epochs_run"] < 500
    assert time.monotonic() - t0 < 0.6 * 60 + 10
    # The cap shortens the one-cycle schedule, it does not replace it: the run still reaches its peak rate after
    # the first epoch (where the cap makes its first estimate, in the warm-up) and anneals to the end. Up to
    # 2026-12-08 it decayed from the warm-up's rate, a tenth of the peak for the default config.
    rates = [h["lr"] for h in res.history]
    assert max(rates[1:]) > 0.95 * 4e-3 and rates[-1] < max(rates) / 10, rates
    assert res.meta.train_config["peak_lr"] == max(rates)


def test_a_shortened_schedule_warms_up_to_its_peak_and_anneals_to_the_new_end() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = one_cycle(opt, 4e-3, 44 * 10, 0.15)
    for _ in range(10):
        opt.step()
        sched.step()
    reached = opt.param_groups[0]["lr"]
    assert reached < 4e-3 / 5  # early in the warm-up
    sched = one_cycle(opt, 4e-3, 10 + 20 * 10, 0.15, done=10)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(20 * 10 - 1):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    top = int(np.argmax(rates))
    assert rates[0] >= reached and rates[top] == pytest.approx(4e-3, rel=1e-3)
    assert all(a <= b for a, b in zip(rates[:top], rates[1: top + 1], strict=True))
    assert all(a >= b for a, b in zip(rates[top:-1], rates[top + 1:], strict=True)) and rates[-1] < 4e-3 / 1000


def test_bf16_training_runs_where_the_cpu_has_it_and_falls_back_to_fp32_elsewhere(tiny) -> None:
    root, _ = tiny
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            precision="bf16"))
    used = res.meta.train_config["precision_used"]
    assert used == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert math.isfinite(res.history[0]["loss"]) and all(p.dtype == torch.float32 for p in res.model.parameters())


class _Spot(torch.nn.Module):
    """A stand-in model whose block logits are the picture's own 8x8 cell means: the brightest cell is its
    most suspicious block."""

    in_channels = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x[:, :1].float(), 8)[:, 0] / 255.0


def test_hard_negatives_are_the_clean_pictures_scored_highest_focused_on_their_worst_block() -> None:
    items = []
    for k in range(10):
        plane = torch.zeros(2, 64, 96, dtype=torch.uint8)
        plane[:, 8 * (k % 8): 8 * (k % 8) + 8, 8 * k: 8 * k + 8] = 25 * k  # one bright block, brighter each item
        items.append(Item(plane, torch.zeros(8, 12, dtype=torch.uint8), 0))
    items.append(Item(torch.full((2, 64, 96), 255, dtype=torch.uint8), torch.ones(8, 12, dtype=torch.uint8), 1))  # corrupt: never mined
    hard = mine_hard_negatives(_Spot(), items, 0.3, torch.device("cpu"))
    assert [h.focus for h in hard] == [(9 % 8, 9), (8 % 8, 8), (7, 7)]
    assert all(h.label == 0 and h.plane is items[k].plane for h, k in zip(hard, (9, 8, 7), strict=True))
    assert mine_hard_negatives(_Spot(), items, 0.0, torch.device("cpu")) == []
    # Crops of a hard negative hold its worst block most of the time.
    rng = np.random.default_rng(0)
    big = torch.zeros(2, 360, 640, dtype=torch.uint8)
    big[:, 320:328, 40:48] = 255  # block (40, 5)
    focused = Item(big, torch.zeros(45, 80, dtype=torch.uint8), 0, focus=(40, 5))
    hits = sum(bool((_crop(focused, 120, 160, rng)[0] > 128).any()) for _ in range(200))
    plain = sum(bool((_crop(Item(big, focused.blocks, 0), 120, 160, rng)[0] > 128).any()) for _ in range(200))
    assert hits >= 0.7 * 200 and plain < 0.3 * 200, (hits, plain)


def test_training_with_hard_negatives_runs_its_whole_schedule(tiny) -> None:
    root, _ = tiny
    res = train(TrainConfig(epochs=2, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            hard_share=0.2))
    assert res.meta.train_config["epochs_run"] == 2 and not res.meta.train_config["stopped_early"]


def test_a_capped_run_mines_its_hard_negatives_half_way_through_the_epochs_that_fit(tiny) -> None:
    """Up to 2026-12-08 hard negatives were mined after half the configured epochs, which a capped run never
    reached. `hard_pool` scores a random share of the clean pictures instead of all of them."""
    root, folder = tiny
    said: list[str] = []
    res = train(TrainConfig(epochs=500, batch=8, minutes=0.8, recipe=TINY.to_json(), data_root=str(root), output="unused",
                            threads=1, hard_share=0.5, hard_pool=0.5), progress=said.append)
    run = res.meta.train_config["epochs_run"]
    assert res.meta.train_config["stopped_early"], res.meta.train_config
    assert run >= 3, run
    mined = [re.match(r"hard negatives: (\d+) of (\d+) clean pictures scored x 2 \(by the model after (\d+) epochs\)", m) for m in said]
    mined = [m for m in mined if m]
    assert len(mined) == 1, said
    from models.train import clean_sequence_items

    n_clean = sum(it.label == 0 for it in items_from_shards(load_split(folder, "train"))) + len(clean_sequence_items(TINY, folder, "train"))
    picked, scored, after = (int(g) for g in mined[0].groups())
    assert 1 <= after < run, (after, run)  # mined during the run, with epochs left to learn from them
    assert scored == round(0.5 * n_clean), (scored, n_clean)  # hard_pool: half the clean pictures scored
    assert picked == round(0.5 * scored) > 0, (picked, scored)  # hard_share: half of those kept


def test_an_epoch_draws_a_share_of_the_clean_pictures_and_repeats_the_kinds_asked_for(tiny) -> None:
    """`clean_share` draws that share of the clean decodes' pictures each epoch, `repeat` shows a shard kind's
    frames that many times: the epoch's size says both."""
    from models.train import clean_sequence_items

    root, folder = tiny
    shards = load_split(folder, "train")
    n_seq = len(clean_sequence_items(TINY, folder, "train"))
    garble = sum(len(s.labels) for s in shards if s.kind == "garble")
    n = sum(len(s.labels) for s in shards)
    assert garble and n_seq > 10
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            clean_share=0.5, repeat={"h264/garble": 3}))
    assert res.meta.train_config["epoch_frames"] == n + 2 * garble + round(0.5 * n_seq)
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            repeat={"garble": 2}))
    assert res.meta.train_config["epoch_frames"] == n + garble + n_seq
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            clean_share=0.0))
    assert res.meta.train_config["epoch_frames"] == n


def test_key_frames_of_the_shards_are_read_alone_as_the_engine_reads_them(tiny) -> None:
    """keys_alone: the shards' key frames (flags from the split's whole decodes) are paired with themselves,
    every other picture with the one shown before it, as the shard holds it; a training run takes the option."""
    from models.train import shard_keys

    root, folder = tiny
    shards, keys = shard_keys(TINY, folder, "train")
    assert [s.kind for s in shards] == [s.kind for s in load_split(folder, "train")]
    assert all(k is not None and len(k) == len(s.labels) for s, k in zip(shards, keys, strict=True))
    assert sum(int(k.sum()) for k in keys) >= 1
    items = items_from_shards(shards, keys)
    j = 0
    for s, k in zip(shards, keys, strict=True):
        for i in range(len(s.labels)):
            before = s.planes[i] if k[i] else s.prev[i]
            assert np.array_equal(items[j].plane[1].numpy(), before) and np.array_equal(items[j].plane[0].numpy(), s.planes[i])
            j += 1
    res = train(TrainConfig(epochs=1, batch=8, recipe=TINY.to_json(), data_root=str(root), output="unused", threads=1,
                            keys_alone=True, clean_sequences=False))
    assert res.meta.train_config["keys_alone"] is True
    with pytest.raises(ValueError, match="keys_alone"):
        TrainConfig(keys_alone="yes").check()


def _meta(version: str = "t1") -> ModelMeta:
    return ModelMeta(version=version, created="2026-11-27T00:00:00+00:00", recipe_hash=TINY.hash, width=48, threshold=0.5)


def test_weights_round_trip_and_clear_errors(tmp_path) -> None:
    m = CorruptionNet()
    path = save(m, _meta(), tmp_path / "w.pt")
    loaded, meta = load(path)
    assert meta.version == "t1" and meta.parameters == parameters_count(m)
    assert json.loads(path.with_suffix(".json").read_text())["version"] == "t1"
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert meta.tta == loaded.tta == "none"
    turned = _meta()
    turned.tta = "rot180"
    assert load(save(m, turned, tmp_path / "turned.pt"))[0].tta == "rot180"  # the views the threshold was chosen with
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(WeightsError, match="cannot be read"):
        load(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(WeightsError, match="not a framewatch corruption model"):
        load(bad)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"].pop("stem.0.weight")
    torch.save(blob, bad)
    with pytest.raises(WeightsError, match="does not match"):
        load(bad)
    with pytest.raises(WeightsError, match="not found"):
        load(tmp_path / "missing.pt")
    # Found by an adversarial pass: an empty file (what a copy over the watched file passes through) gave an
    # IndexError, and metadata that fits the shapes but not the detector loaded "fine" and then failed every
    # stream that used it.
    bad.write_bytes(b"")
    with pytest.raises(WeightsError, match="is empty"):
        load(bad)
    for key, value, words in (("threshold", "abc", "threshold must be a finite number, not 'abc'"),
                              ("threshold", float("nan"), "threshold must be a finite number, not nan"),
                              ("threshold", -0.5, "threshold must not be negative"),
                              ("decision", "bogus", "decision must be one of frame, hold, hold+evidence, not 'bogus'"),
                              ("tta", "sideways", "tta must be one of none, mirror, rot180, mirror+rot180, not 'sideways'")):
        blob = torch.load(path, weights_only=True)
        blob["meta"][key] = value
        torch.save(blob, bad)
        with pytest.raises(WeightsError, match=f"does not match the model: {re.escape(words)}"):
            load(bad)


def test_engine_keeps_its_model_when_a_bad_file_replaces_it(tmp_path, caplog) -> None:
    path = save(CorruptionNet(), _meta("v1"), tmp_path / "w.pt")
    slot = ModelSlot(path, torch.device("cpu"))
    assert slot.current(now=0.0).meta.version == "v1"
    path.write_bytes(b"\x00garbage")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert slot.current(now=10.0).meta.version == "v1"  # still serving the old model
    assert slot.error and "cannot be read" in slot.error and slot.reload_errors == 1
    assert "still using model v1" in caplog.text
    save(CorruptionNet(), _meta("v2"), path)
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert slot.current(now=20.0).meta.version == "v2" and slot.reloads == 1 and slot.error is None


def test_damaged_decodes_take_the_clean_decode_s_probabilities_where_the_model_reads_them_alike(tiny) -> None:
    """Evaluation and calibration score each clip's clean decode once and take its probabilities over for the
    pictures a damaged decode shares with it (before the loss, after the key frame that heals it): the same
    figures as scoring every picture, for about a third of the work."""
    from types import SimpleNamespace

    _, folder = tiny
    torch.manual_seed(0)
    model = CorruptionNet(width=8).eval()
    meta = SimpleNamespace(frame_blocks=TINY.frame_blocks, decision="hold+evidence")
    ss = score_sequences(model, meta, "val", TINY, folder)
    clean = next(q for q in ss.seqs if q.kind == "clean")
    taken = 0
    for q, p in zip(ss.seqs, ss.probs, strict=True):
        np.testing.assert_allclose(p, sequence_probs(model, q, torch.device("cpu"), TINY.frame_blocks), rtol=0, atol=1e-5)
        if q is not clean:
            same = same_inputs(q, clean)
            assert not same[q.labels == 1].any()  # a corrupt picture differs from the clean one
            taken += int(same.sum())
    assert 0 < taken < sum(len(q.labels) for q in ss.seqs if q is not clean)


def test_f1_interval_resamples_whole_decodes() -> None:
    """The interval is about decodes, not frames: the same frames in 8 decodes give a wider interval than in 80,
    it holds the point estimate, and a perfect detector's is a point."""
    rng = np.random.default_rng(1)

    def case(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = np.repeat(np.arange(k), 800 // k)
        # each decode has its own hit rate: frames within a decode are alike
        hit = rng.uniform(0.5, 1.0, k)[groups] > rng.uniform(0, 1, len(groups))
        labels = np.ones(len(groups), np.int8)
        return hit, labels, groups

    lo8, hi8 = f1_interval(*case(8))
    lo80, hi80 = f1_interval(*case(80))
    assert 0 < lo8 < hi8 < 1 and 0 < lo80 < hi80 < 1
    assert hi8 - lo8 > 1.5 * (hi80 - lo80)
    pred, labels, groups = case(80)
    f1 = 2 * pred.sum() / (pred.sum() + len(labels))
    assert lo80 <= f1 <= hi80
    assert f1_interval(labels == 1, labels, groups) == [1.0, 1.0]
    assert all(np.isnan(f1_interval(pred, labels, np.zeros(len(labels), int))))


def test_f1_difference_is_paired_over_decodes() -> None:
    """Two models on the same decodes: hard decodes are hard for both, so the paired interval of the difference
    is narrower than the two models' own intervals; identical models differ by exactly 0."""
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 20)
    hard = rng.uniform(0.4, 1.0, 40)[groups]  # how findable each decode's damage is
    u = rng.uniform(0, 1, len(groups))
    a, b = hard > u, hard > u + 0.03  # B misses a little more, on the same pictures
    labels = np.ones(len(groups), np.int8)
    d = f1_difference(a, b, labels, groups)
    lo_a, hi_a = f1_interval(a, labels, groups)
    assert d["difference"] > 0 and 0 <= d["ci95"][0] <= d["ci95"][1]
    assert d["ci95"][1] - d["ci95"][0] < 0.5 * (hi_a - lo_a)
    assert d["a_ahead"] > 0.95
    same = f1_difference(a, a, labels, groups)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["a_ahead"] == 0


def test_shipped_weights_load_with_metadata() -> None:
    import dataclasses

    from models.data.generate import VAL_PHOTOS

    model, meta = load(SHIPPED)
    # Trained on the default recipe's training split: the default itself, or the default without the held-out
    # splits' extra draws (Recipe.draws) or its validation photographs (2026-12-08), which leave the training split
    # as it was (the shipped weights are from before them; their test figures are measured on the default's three
    # draws). Its threshold was chosen on the default's validation split as it is now.
    before = dataclasses.replace(Recipe(), sources=tuple(s for s in Recipe().sources if s.name not in VAL_PHOTOS))
    assert meta.recipe_hash in (Recipe().hash, before.hash, dataclasses.replace(before, draws=()).hash)
    assert meta.metrics["calibrated"]["recipe_hash"] == Recipe().hash
    assert meta.metrics["test"]["packet_loss"]["f1"] > 0 and 0 < meta.threshold < 1
    assert parameters_count(model) <= 1_000_000
    # Its threshold was chosen (and its test figures measured) with the loss evidence the engine now reads: a change
    # to the evidence (models.data.sequences.EVIDENCE) calls for `framewatch calibrate` and `eval --record` again.
    assert meta.metrics["evidence"] == EVIDENCE


def test_label_retrain_promote_round_trip(tiny, tmp_path) -> None:
    root, folder = tiny
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY.to_json()))
    current = tmp_path / "current.pt"
    # The current model: a short training on the tiny set.
    r = run_cli("train", "--recipe", recipe_file, "--data-root", root, "--epochs", "2", "-o", current, timeout=300)
    assert r.returncode == 0, r.stderr
    store = ReviewStore(tmp_path / "review")
    shards = load_split(folder, "train")
    corrupt = [p for s in shards for p, lab in zip(s.planes, s.labels, strict=True) if lab == 1][:3]
    clean = [p for s in shards for p, lab in zip(s.planes, s.labels, strict=True) if lab == 0][:3]
    ids = []
    for i, plane in enumerate(corrupt + clean):
        rec = ReviewRecord(alert_id=f"a{i}", stream="s", start=float(i), wallclock="2026-11-27T00:00:00Z", probability=0.9,
                           threshold=0.5, model_version="x", box=(0.1, 0.1, 0.2, 0.2))
        assert store.add(rec, plane, np.zeros((12, 20), np.float16)) is not None
        ids.append(rec.alert_id)
    assert (tmp_path / "review" / "a0" / "view.png").is_file()
    r = run_cli("label", *ids[:3], "--true", "--review", tmp_path / "review")
    assert r.returncode == 0, r.stderr
    (tmp_path / "verdicts.csv").write_text("".join(f"{i},false\n" for i in ids[3:]))
    r = run_cli("label", "--file", tmp_path / "verdicts.csv", "--review", tmp_path / "review")
    assert r.returncode == 0, r.stderr
    assert [store.get(i).verdict for i in ids] == [True] * 3 + [False] * 3
    r = run_cli("label", "nope", "--true", "--review", tmp_path / "review")
    assert r.returncode == 2 and "no corruption alert nope" in r.stderr
    # Fine-tune on the verdicts, from the current model.
    cand = tmp_path / "cand.pt"
    r = run_cli("train", "--include-feedback", "--review", tmp_path / "review", "--init", current, "--recipe", recipe_file,
                "--data-root", root, "--epochs", "1", "-o", cand, timeout=300)
    assert r.returncode == 0, r.stderr
    _, meta = load(cand)
    assert meta.feedback == 6 and meta.parent == load(current)[1].version
    assert meta.tta == "rot180"  # TrainConfig's default: the threshold was chosen with the turned view
    # The threshold chosen again on validation with other views: the file says which, and what it was before.
    recal = tmp_path / "recal.pt"
    r = run_cli("calibrate", cand, "--tta", "none", "--recipe", recipe_file, "--data-root", root, "-o", recal, timeout=300)
    assert r.returncode == 0, r.stderr
    _, rm = load(recal)
    assert rm.tta == "none" and rm.metrics["calibrated"]["previous_threshold"] == meta.threshold and 0 <= rm.metrics["val_f1"] <= 1
    assert rm.parent == meta.version != rm.version and "test" not in rm.metrics
    assert meta.metrics["evidence"] == rm.metrics["evidence"] == EVIDENCE  # the loss evidence the threshold was chosen with
    assert f"views none, threshold {meta.threshold:.4f} -> {rm.threshold:.4f}" in " ".join(r.stderr.split())
    r = run_cli("calibrate", cand, "--tta", "sideways", "-o", recal)
    assert r.returncode == 2 and "--tta must be one of none, mirror, rot180, mirror+rot180, not 'sideways'" in r.stderr
    # Evaluate candidate against current: JSON report and PR curve written.
    out = tmp_path / "eval"
    r = run_cli("eval", cand, "--against", current, "--recipe", recipe_file, "--data-root", root, "--out", out, "--json",
                "--record", timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    # --record with --against stores the candidate's own figures (the ones it would get evaluated alone).
    assert load(cand)[1].metrics["test"]["overall"] == rep["candidate"]["overall"]
    assert "test" not in load(current)[1].metrics
    assert {"candidate", "current", "better_or_equal", "f1_difference"} <= set(rep) and (out / "pr_compare.png").stat().st_size > 1000
    assert set(rep["f1_difference"]) == {"difference", "ci95", "a_ahead"}
    # Recorded figures carry the digest of the data they came from; an evaluation on other bytes says so.
    digest = rep["current"]["data_digest"]
    lo, hi = rep["current"]["overall"]["f1_ci95"]
    assert 0 <= lo <= hi <= 1
    assert len(digest) == 16 and rep["candidate"]["data_digest"] == digest
    r = run_cli("eval", current, "--record", "--recipe", recipe_file, "--data-root", root, "--out", out, timeout=300)
    assert r.returncode == 0 and "note:" not in r.stdout, r.stderr
    assert load(current)[1].metrics["test"]["data_digest"] == digest
    record_metrics(current, "test", {**load(current)[1].metrics["test"], "data_digest": "0" * 16})
    r = run_cli("eval", current, "--recipe", recipe_file, "--data-root", root, "--out", out, timeout=300)
    assert r.returncode == 0 and f"note: these test data (digest {digest}) are not those" in " ".join(r.stdout.split()), r.stdout
    # A model that is worse (one that never flags anything: F1 0) is refused, and the current file is left as it was.
    blind = _meta("blind")
    blind.threshold = 1.01
    worse = save(CorruptionNet(), blind, tmp_path / "worse.pt")
    before = current.read_bytes()
    r = run_cli("promote", worse, "--current", current, "--recipe", recipe_file, "--data-root", root, timeout=300)
    assert r.returncode == 1 and "refused" in r.stderr
    assert current.read_bytes() == before
    # An equal model (a copy) may be promoted; the previous file is kept beside it.
    same = tmp_path / "same.pt"
    same.write_bytes(before)
    r = run_cli("promote", same, "--current", current, "--recipe", recipe_file, "--data-root", root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "current.previous.pt").read_bytes() == before


def test_the_facade_training_config_extends_the_default_recipe() -> None:
    import dataclasses

    from engine.model_cli import _train_config

    cfg = _train_config(Path(__file__).resolve().parents[1] / "configs" / "train_facades.yaml", {})
    r = Recipe.from_json(cfg.recipe)
    default = Recipe()
    assert r.sources[: len(default.sources)] == default.sources
    added = r.sources[len(default.sources):]
    assert {s.style for s in added} == {"facade"} and {s.split for s in added} == {"train", "val"}
    assert dataclasses.replace(r, sources=default.sources) == default  # so extend() can build only the added clips
    assert cfg.init == "models/weights/corruption.pt" and cfg.hard_share == 0.0


def test_the_one_run_config_trains_from_scratch_on_the_photographs_recipe_inside_the_target() -> None:
    from engine.model_cli import _train_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    one = _train_config(configs / "train_one_run.yaml", {})
    photos = _train_config(configs / "train_photos.yaml", {})
    assert one.init is None and one.recipe == photos.recipe  # the same data set as the photographs' fine-tuning
    assert one.precision == "bf16" and one.minutes <= 13.0  # the validation pass after the epochs fits in the rest


def test_offgrid_crops_teach_damage_moved_off_the_codec_grid_as_clean() -> None:
    """Concealment follows the codec's 16x16 grid (8x8 cells of the analysis plane); content with a grid of its
    own (lit windows, tiles) falls at any phase. With `offgrid`, crops holding damage are moved off the grid by
    1-7 pixels and labelled clean: a crop is labelled damaged only where the damage's edges lie on the grid."""
    plane = torch.zeros(2, 240, 320, dtype=torch.uint8)
    plane[:, 80:160, 80:240] = 200  # a damaged region of whole cells
    blocks = torch.zeros(30, 40, dtype=torch.uint8)
    blocks[10:20, 10:30] = 1
    item = Item(plane, blocks, 1)

    def edges(crop: torch.Tensor) -> set[int]:
        """Phases (mod 8) of the columns and rows where the picture steps."""
        y = crop[0].float()
        cols = torch.nonzero((y[:, 1:] - y[:, :-1]).abs().amax(0) > 20).flatten() + 1
        rows = torch.nonzero((y[1:, :] - y[:-1, :]).abs().amax(1) > 20).flatten() + 1
        return {int(v) % 8 for v in torch.cat([cols, rows])}

    rng = np.random.default_rng(3)
    moved = labelled = 0
    for _ in range(300):
        crop, b = _crop(item, 120, 160, rng, offgrid=0.5)
        if (b == 1).any():
            labelled += 1
            assert edges(crop) <= {0}  # damage taught as damage sits on the grid
        elif edges(crop) - {0}:
            moved += 1
            assert not (b == 1).any()
    assert moved > 50 and labelled > 50, (moved, labelled)
    # Without it, every crop keeps the grid.
    assert all(edges(_crop(item, 120, 160, rng)[0]) <= {0} for _ in range(100))


@pytest.mark.parametrize("text, message", [
    ("offgrid: 2", "offgrid must be a number within 0..1, not 2"),
    ("offgrid: abc", "offgrid must be a number within 0..1, not 'abc'"),
    ("epochs: 0", "epochs must be a whole number of at least 1, not 0"),
    ("lr: .nan", "lr must be a number above 0, not nan"),
    ("crop: [100, 160]", "crop must be [height, width] in whole macroblocks (multiples of 8), not (100, 160)"),
    ("decision: often", "decision must be frame, hold or hold+evidence, not 'often'"),
    ("epoch: 3", "unknown training option(s) epoch"),
    ("clean_share: -0.5", "clean_share must be a number within 0..1, not -0.5"),
    ("repeat: {hevc/bitflip: 0}", "repeat must map 'codec/kind' or 'kind' to a whole number 1..16, not {'hevc/bitflip': 0}"),
    ("repeat: [2]", "repeat must map 'codec/kind' or 'kind' to a whole number 1..16, not [2]"),
    ("precision: fp16", "precision must be fp32 or bf16, not 'fp16'"),
    ("hard_pool: 0", "hard_pool must be a number above 0, not 0"),
])
def test_a_bad_training_config_is_one_line_before_any_work(tmp_path, text, message) -> None:
    """Wrong types and out-of-range values in a training config were tracebacks (some only after the data set
    was built); each is one line naming the field, exit code 2."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text + "\n")
    r = run_cli("train", "--config", cfg, "-o", tmp_path / "w.pt", "--data-root", tmp_path / "data", fresh=False)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and message in line and "Traceback" not in line, line
    assert not (tmp_path / "data").exists()
