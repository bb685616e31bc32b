"""The corruption data generator: deterministic for a seed, and its labels agree with the damage done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.codec import EncodeSpec, decode_luma, encode_ts, video_pid
from models.data.content import SourceSpec, generated_frames
from models.data.damage import TS, DamageSpec, damage, drop_slices, packets, pids
from models.data.generate import CLEAN, CORRUPT, IGNORE, Recipe, block_mad, build, label, load_split

SMALL = SourceSpec("tiny", "generated", "train", seed=7, width=320, height=192, seconds=2.0, fps=25)


@pytest.fixture(scope="module")
def clip() -> tuple[list[np.ndarray], bytes]:
    frames = generated_frames(SMALL)
    return frames, encode_ts(frames, 25, EncodeSpec("h264", 600_000, 25))


def test_generated_content_is_seeded() -> None:
    a = generated_frames(SourceSpec("a", "generated", "train", seed=3, width=160, height=96, seconds=0.4))
    b = generated_frames(SourceSpec("a", "generated", "train", seed=3, width=160, height=96, seconds=0.4))
    c = generated_frames(SourceSpec("a", "generated", "train", seed=4, width=160, height=96, seconds=0.4))
    assert len(a) == 10 and a[0].shape == (96, 160, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[5])  # it moves


def test_facade_content_is_seeded_and_grid_like() -> None:
    spec = SourceSpec("f", "generated", "train", seed=3, width=320, height=192, seconds=0.2, style="facade")
    a, b = generated_frames(spec), generated_frames(spec)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    mixed = generated_frames(SourceSpec("f", "generated", "train", seed=3, width=320, height=192, seconds=0.2))
    assert not np.array_equal(a[0], mixed[0])
    # Night towers: a dark picture with many strong, short-period edges (the window grids).
    y = a[0].astype(np.float32).mean(axis=2)
    assert y.mean() < 110
    assert (np.abs(np.diff(y, axis=1)) > 40).mean() > 0.01
    with pytest.raises(ValueError, match="content style"):
        generated_frames(SourceSpec("f", "generated", "train", seed=3, width=64, height=64, seconds=0.1, style="x"))


def test_photo_content_moves_a_camera_over_the_photograph(tmp_path, monkeypatch) -> None:
    """A photo source reads samples/photos/<name>, is seeded, has the asked size and moves (pan and zoom) over
    the picture's own content; a missing photograph is one clear error naming the fetch script."""
    from PIL import Image

    from models.data.content import photo_frames, source_frames

    monkeypatch.setenv("FRAMEWATCH_SAMPLES", str(tmp_path))
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    picture = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, (xx + yy) % 256], -1) + rng.normal(0, 8, (300, 400, 3))
    Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(tmp_path / "photos" / "p.png")
    spec = SourceSpec("p.png", "photo", "train", seed=3, width=320, height=192, seconds=0.8)
    a, b = photo_frames(spec), source_frames(spec)
    assert len(a) == 20 and a[0].shape == (192, 320, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], photo_frames(SourceSpec("p.png", "photo", "train", seed=4, width=320, height=192, seconds=0.8))[0])
    assert np.abs(a[0].astype(int) - a[-1].astype(int)).mean() > 5  # it moves
    # the picture's content, not a blank: the red ramp still runs left to right
    assert a[0][:, :, 0].std() > 20
    with pytest.raises(FileNotFoundError, match="fetch_samples.sh"):
        photo_frames(SourceSpec("gone.jpg", "photo", "train"))
    # a file that is there but is not what its kind says: one clear error, not a decoder's traceback
    from models.data.content import SourceError, sample_frames

    (tmp_path / "photos" / "junk.jpg").write_bytes(b"not a picture")
    with pytest.raises(SourceError, match="junk.jpg is not a readable picture"):
        photo_frames(SourceSpec("junk.jpg", "photo", "train"))
    (tmp_path / "junk.avi").write_bytes(b"not a clip" * 100)
    with pytest.raises(SourceError, match="junk.avi"):
        sample_frames(SourceSpec("junk.avi", "sample", "train"))


def test_the_photo_training_config_adds_the_photos_the_fetch_script_places() -> None:
    """configs/train_photos.yaml is the default recipe plus one training source per photograph that
    tests/fetch_samples.sh places (models.data.generate.PHOTOS), so extend() builds only those."""
    import dataclasses
    import re
    from pathlib import Path

    from engine.model_cli import _train_config
    from models.data.generate import PHOTOS, VAL_PHOTOS

    root = Path(__file__).resolve().parents[1]
    listed = re.search(r"REQUIRED_PHOTOS=\(([^)]*)\)", (root / "tests" / "fetch_samples.sh").read_text()).group(1).split()
    assert tuple(listed) == PHOTOS + VAL_PHOTOS
    # The validation photographs are the default recipe's own (its validation split), the others the config's.
    assert [s.name for s in Recipe().sources if s.kind == "photo"] == list(VAL_PHOTOS)
    assert {(s.kind, s.split) for s in Recipe().sources if s.name in VAL_PHOTOS} == {("photo", "val")}
    cfg = _train_config(root / "configs" / "train_photos.yaml", {})
    r = Recipe.from_json(cfg.recipe)
    default = Recipe()
    added = [s for s in r.sources if s not in default.sources]
    assert [s for s in r.sources if s in default.sources] == list(default.sources)
    assert [s.name for s in added] == list(PHOTOS) and {(s.kind, s.split) for s in added} == {("photo", "train")}
    assert dataclasses.replace(r, sources=default.sources) == default


def test_damage_touches_only_the_video_pid_after_the_protected_start(clip) -> None:
    _, ts = clip
    pid = video_pid(ts)
    pk = packets(ts)
    for spec in (DamageSpec("burst", 2.0, (3, 6)), DamageSpec("garble", 2.0, (1, 3)), DamageSpec("bitflip", 1e-4),
                 DamageSpec("random", 0.05)):
        out, touched = damage(ts, pid, spec, 2.0, np.random.default_rng(1))
        again, touched2 = damage(ts, pid, spec, 2.0, np.random.default_rng(1))
        assert out == again and touched == touched2  # deterministic for a seed
        assert touched, spec.kind
        assert all(pids(pk[[i]])[0] == pid for i in touched)
        first_video = np.flatnonzero(pids(pk) == pid)
        protected = first_video[: int(len(first_video) * 1.0 / 2.0)]
        assert min(touched) > protected[-1]
        assert len(out) % TS == 0
        if spec.kind in ("burst", "random"):
            assert len(out) == len(ts) - TS * len(touched)
        else:
            assert len(out) == len(ts)
            changed = np.flatnonzero((packets(out) != pk).any(axis=1))
            assert set(changed.tolist()) <= set(touched)
            assert (pk[changed, :4] == packets(out)[changed, :4]).all()  # headers intact: payload damage only


def test_drop_slices_removes_one_slice_never_the_first() -> None:
    au = b"".join(b"\x00\x00\x00\x01" + bytes([t]) + b"\xaa" * 5 for t in (0x09, 0x65, 0x41, 0x41, 0x41))
    out = drop_slices(au, np.random.default_rng(0), "h264", fraction=0.0)
    units = out.split(b"\x00\x00\x00\x01")[1:]
    assert len(units) == 4 and units[0][0] == 0x09 and units[1][0] == 0x65


def test_key_damage_hits_key_frames_after_the_protected_start_for_training_only(clip) -> None:
    """DamageSpec("key"): each key frame after the protected start is damaged (with probability `rate`), the
    picture starts (its first slice header kept) and is concealed; nothing before it changes; deterministic for a
    seed. Recipe.train_damages adds such decodes to the training split alone and leaves older recipes' hashes."""
    import dataclasses

    from models.data.codec import decode_pictures
    from models.data.damage import damage_key_frame
    from models.data.generate import damaged_stream

    _, ts = clip
    clean = decode_pictures(ts)[0]
    spec = DamageSpec("key", 1.0)
    out = damaged_stream(ts, video_pid(ts), spec, 2.0, 25, "h264", np.random.default_rng(3))
    assert out == damaged_stream(ts, video_pid(ts), spec, 2.0, 25, "h264", np.random.default_rng(3))
    dec = decode_pictures(out)[0]
    order = sorted(clean)
    keys = [i for i, k in enumerate(order) if clean[k][1]]
    assert keys == [0, 25]  # one-second GOPs: the second key frame is the first after the protected second
    labels = [label(block_mad(dec[k][0], clean[k][0]), Recipe())[0] if k in dec else None for k in order]
    assert all(lab == CLEAN for lab in labels[:25]) and labels[25] == CORRUPT and dec[order[25]][1]
    untouched = decode_pictures(damaged_stream(ts, video_pid(ts), DamageSpec("key", 0.0), 2.0, 25, "h264", np.random.default_rng(3)))[0]
    assert all(np.array_equal(untouched[k][0], clean[k][0]) for k in order)
    # An access unit with no slice is left alone; the parameter sets and the first slice header are never touched.
    au = b"\x00\x00\x00\x01\x67" + b"\x11" * 20 + b"\x00\x00\x00\x01\x65" + b"\x22" * 400
    assert damage_key_frame(au[:25], np.random.default_rng(0), "h264") == au[:25]
    for seed in range(12):
        hit = damage_key_frame(au, np.random.default_rng(seed), "h264")
        assert hit != au and hit[:38] == au[:38]
    from models.data.generate import VAL_PHOTOS

    before = tuple(s for s in Recipe().sources if s.name not in VAL_PHOTOS)  # the default's sources before 2026-12-08
    r = dataclasses.replace(Recipe(), sources=before, train_damages=(), draws=(("test", 3), ("val", 3)))
    assert "train_damages" not in r.to_json() and Recipe.from_json(r.to_json()) == r  # a whole recipe from before: none
    assert r.hash == "a0439e04cf12edf9"  # the default recipe before training-only damages, unchanged
    rk = Recipe.from_json({"train_damages": [{"kind": "key", "rate": 0.75}], "draws": [["train/hevc/key", 3]]})
    assert rk.train_damages == (DamageSpec("key", 0.75),) and Recipe.from_json(rk.to_json()) == rk and rk.hash != r.hash
    assert Recipe().train_damages == rk.train_damages  # the default recipe has them
    assert [(d.kind, i) for d, i in rk.decodes("train", "hevc")][-3:] == [("key", 0), ("key", 1), ("key", 2)]
    assert "key" not in {d.kind for d, _ in rk.decodes("test", "hevc") + rk.decodes("val", "h264")}
    assert rk.decodes("train", "h264")[-1][0].kind == "key"
    with pytest.raises(ValueError, match="draws"):
        dataclasses.replace(r, draws=(("train/hevc/key", 2),))  # no such damage in this recipe


def test_labels_follow_the_difference_from_the_clean_decode() -> None:
    r = Recipe()
    clean = np.full((64, 64), 100, np.uint8)
    assert label(block_mad(clean, clean), r)[0] == CLEAN
    hit = clean.copy()
    hit[:16, :48] = 140  # three whole blocks off by 40 levels
    lab, blocks = label(block_mad(hit, clean), r)
    assert lab == CORRUPT
    assert blocks[0, :3].tolist() == [1, 1, 1] and (blocks[1:] == 0).all() and blocks[0, 3] == 0
    drift = clean.copy()
    drift[:16, :16] = 103  # 3 levels: not visible, not intact
    lab, blocks = label(block_mad(drift, clean), r)
    assert lab not in (CLEAN, CORRUPT) and blocks[0, 0] == IGNORE


def test_real_damage_is_labelled_where_the_stream_was_hit(clip) -> None:
    _, ts = clip
    clean, _ = decode_luma(ts)
    damaged, touched = damage(ts, video_pid(ts), DamageSpec("burst", 1.0, (20, 20)), 2.0, np.random.default_rng(5))
    dec, _ = decode_luma(damaged)
    keys = sorted(set(clean) & set(dec))
    labels = [label(block_mad(dec[k], clean[k]), Recipe())[0] for k in keys]
    assert CORRUPT in labels
    first_bad = labels.index(CORRUPT)
    assert all(lab == CLEAN for lab in labels[:first_bad])  # nothing before the damage is labelled corrupt
    assert keys[first_bad] / 90_000 >= 1.0 - 0.2  # and the damage is after the protected first second


def test_build_is_deterministic_and_split_by_source(tmp_path) -> None:
    r = Recipe(
        sources=(SMALL, SourceSpec("tiny2", "generated", "test", seed=8, width=320, height=192, seconds=2.0)),
        codecs=("h264",), damages=(DamageSpec("burst", 1.0, (10, 30)), DamageSpec("garble", 1.0, (2, 4))),
        clean_per_codec=4, per_decode=(8, 4), native_splits=("test",), draws=(),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = build(r, tmp_path / "a", workers=1)
        # The caller's threads come back: a first training run on a fresh machine builds its data, then trains.
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    # The same recipe from the same encoded streams (kept by the first build: x264 is not bit-exact run to run)
    b = tmp_path / "b" / r.hash
    b.mkdir(parents=True)
    (b / "streams").symlink_to(a / "streams")
    b = build(r, tmp_path / "b", workers=1)
    assert a.name == b.name == r.hash
    sa, sb = load_split(a, "train"), load_split(b, "train")
    assert [s.kind for s in sa] == [s.kind for s in sb] and len(sa) >= 3
    for x, y in zip(sa, sb, strict=True):
        assert np.array_equal(x.planes, y.planes) and np.array_equal(x.blocks, y.blocks) and np.array_equal(x.labels, y.labels)
    assert {s.source for s in sa} == {"tiny"} and {s.source for s in load_split(a, "test")} == {"tiny2"}
    test = load_split(a, "test", native=True)
    assert all(s.native is not None and s.native.shape[1:] == (192, 320) for s in test)
    assert all(s.planes.shape[1:] == (96, 160) and s.blocks.shape[1:] == (12, 20) for s in sa)
    assert Recipe.from_json(r.to_json()) == r
    assert (a / "recipe.json").is_file()
    # Whole decodes for evaluation replay the same damage: the pictures a shard sampled come out the same, with
    # the decoder's key frames and the transport's loss evidence (bursts of lost TS packets) beside them.
    from models.data.sequences import sequences

    seqs = sequences(r, a, "test")
    shards = {(s.codec, s.kind): s for s in load_split(a, "test")}
    assert {(q.codec, q.kind) for q in seqs} == set(shards)
    for q in seqs:
        sh = shards[(q.codec, q.kind)]
        assert np.array_equal(q.planes[q.sampled], sh.planes) and np.array_equal(q.labels[q.sampled], sh.labels)
        assert q.key[0] and len(q.key) == len(q.labels) == len(q.damaged)
    burst = next(q for q in seqs if q.kind == "burst")
    assert burst.damaged.any() and not next(q for q in seqs if q.kind == "clean").damaged.any()
    assert (burst.labels[burst.damaged] != 0).mean() > 0.5  # evidence mostly where the picture is damaged


def test_a_recipe_that_adds_sources_builds_only_those(tmp_path, monkeypatch) -> None:
    import dataclasses

    import models.data.generate as gen
    from models.data.generate import extend

    r = Recipe(sources=(SMALL,), codecs=("h264",), damages=(DamageSpec("burst", 1.0, (10, 30)),), clean_per_codec=4,
               per_decode=(8, 4))
    a = build(r, tmp_path, workers=1)
    added = SourceSpec("tiny3", "generated", "val", seed=9, width=320, height=192, seconds=2.0, style="facade")
    r2 = dataclasses.replace(r, sources=(SMALL, added))
    with pytest.raises(ValueError, match="more than its sources"):
        extend(dataclasses.replace(r2, block_mad=9.0), a, tmp_path)
    made = []
    real = gen.build_source
    monkeypatch.setattr(gen, "build_source", lambda rr, src, out: made.append(src.name) or real(rr, src, out))
    folder = extend(r2, a, tmp_path)
    assert folder.name == r2.hash and not (folder / "recipe.json").exists()
    b = build(r2, tmp_path, workers=1)
    assert b == folder and made == ["tiny3"]
    # build() finds such a finished build by itself.
    made.clear()
    r3 = dataclasses.replace(r, sources=(SMALL, dataclasses.replace(added, name="tiny4", seed=10)))
    c = build(r3, tmp_path, workers=1)
    assert made == ["tiny4"] and (c / "train" / next((a / "train").glob("*.npz")).name).samefile(next((a / "train").glob("*.npz")))
    # The shared source's shards are the old ones (hard links), the new one's are there too.
    old = {p.name: p.stat().st_ino for p in (a / "train").glob("*.npz")}
    assert old and {p.name: p.stat().st_ino for p in (b / "train").glob("*.npz")} == old
    assert {s.source for s in load_split(b, "val")} == {"tiny3"}
    # Building again makes nothing.
    made.clear()
    (b / "recipe.json").unlink()
    build(r2, tmp_path, workers=1)
    assert made == []


def test_draws_add_damaged_decodes_and_keep_the_first(tmp_path, monkeypatch) -> None:
    """`draws` gives a split more damaged decodes, each with its own damage; the first is the decode of the recipe
    without draws, whose hash is unchanged; a build differing only in draws reuses the old one's encodes and the
    sources whose decodes did not change, and whole decodes for evaluation follow the draws."""
    import dataclasses

    import models.data.codec as codec
    import models.data.generate as gen
    from models.data.sequences import sequences

    test_src = SourceSpec("tiny2", "generated", "test", seed=8, width=320, height=192, seconds=2.0)
    r = Recipe(sources=(SMALL, test_src), codecs=("h264",), damages=(DamageSpec("burst", 1.0, (10, 30)),),
               clean_per_codec=4, per_decode=(8, 4), draws=())
    assert "draws" not in r.to_json() and Recipe.from_json(r.to_json()) == r  # recipes from before draws: same hash
    assert dict(Recipe().draws)["test"] == dict(Recipe().draws)["val"] == 3  # the default measures on three draws of every damage
    a = build(r, tmp_path, workers=1)
    r3 = dataclasses.replace(r, draws=(("test", 3),))
    assert Recipe.from_json(r3.to_json()) == r3 and r3.hash != r.hash
    # A config may give only the fields it changes, and the order of the draws does not matter.
    two = Recipe.from_json({"draws": [["train/hevc/garble", 2], ["test", 3]]})
    assert two == dataclasses.replace(Recipe(), draws=(("test", 3), ("train/hevc/garble", 2)))
    assert two.n_draws("train", "hevc", "garble") == 2 and two.n_draws("train", "h264", "garble") == 1
    assert r3.n_draws("test", "h264", "burst") == 3 and r3.n_draws("train", "h264", "burst") == 1
    for bad in ((("test/vp9", 2),), (("test/h264/flood", 2),), (("eval", 2),), (("test", 0),), (("test", True),)):
        with pytest.raises(ValueError, match="draws"):
            dataclasses.replace(r, draws=bad)
    made, encodes = [], []
    real_build, real_encode = gen.build_source, codec.encode_ts
    monkeypatch.setattr(gen, "build_source", lambda rr, src, out: made.append(src.name) or real_build(rr, src, out))
    monkeypatch.setattr(gen, "encode_ts", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    b = build(r3, tmp_path, workers=1)
    assert made == ["tiny2"] and encodes == []  # the training source kept, the test source's stream reused
    names = sorted(p.name for p in (b / "test").glob("*.npz"))
    assert names == ["tiny2__h264__burst-1.npz", "tiny2__h264__burst-2.npz", "tiny2__h264__burst.npz", "tiny2__h264__clean.npz"]
    old = {p.name: np.load(p)["planes"] for p in (a / "test").glob("*.npz")}
    new = {p.name: np.load(p)["planes"] for p in (b / "test").glob("*.npz")}
    assert all(np.array_equal(old[n], new[n]) for n in old)  # draw 0 is the old decode
    seqs = sequences(r3, b, "test")
    assert [(q.kind, q.draw) for q in seqs] == [("clean", 0), ("burst", 0), ("burst", 1), ("burst", 2)]
    damaged = [q.labels == CORRUPT for q in seqs[1:]]  # each draw damages other pictures
    assert all(d.any() for d in damaged) and len({d.tobytes() for d in damaged}) == 3
    for q in seqs:
        sh = np.load(b / "test" / f"{q.name}.npz")
        assert np.array_equal(q.planes[q.sampled], sh["planes"])


def test_colour_conversion_is_bt601_in_integers() -> None:
    """The data's colour conversions (no swscale, whose SIMD paths differ between CPUs) are BT.601 limited range:
    luma within a level of the formula, chroma of each 2x2 block's mean colour, and a round trip through RGB
    moves no plane by more than a level."""
    from models.data.codec import i420_to_rgb, rgb_to_i420

    rgb = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    yuv = rgb_to_i420(rgb)
    assert yuv.shape == (48, 48) and yuv.dtype == np.uint8
    x = rgb.astype(np.float64)
    y = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    m = x.reshape(16, 2, 24, 2, 3).mean((1, 3))
    cb = 128 + (-37.797 * m[..., 0] - 74.203 * m[..., 1] + 112.0 * m[..., 2]) / 255
    cr = 128 + (112.0 * m[..., 0] - 93.786 * m[..., 1] - 18.214 * m[..., 2]) / 255
    assert np.abs(yuv[:32].astype(float) - y).max() <= 1.0
    assert np.abs(yuv[32:40].reshape(16, 24).astype(float) - cb).max() <= 1.0
    assert np.abs(yuv[40:].reshape(16, 24).astype(float) - cr).max() <= 1.0
    # The round trip from Y'CbCr inside the RGB gamut (nothing clipped) moves no plane by more than a level.
    g = np.random.default_rng(6)
    y, cb, cr = g.integers(60, 190, (32, 48)), g.integers(112, 144, (16, 24)), g.integers(112, 144, (16, 24))
    back = rgb_to_i420(i420_to_rgb(y.astype(np.uint8), cb.astype(np.uint8), cr.astype(np.uint8))).astype(int)
    assert np.abs(back[:32] - y).max() <= 1
    assert np.abs(back[32:40].reshape(16, 24) - cb).max() <= 1 and np.abs(back[40:].reshape(16, 24) - cr).max() <= 1
    with pytest.raises(ValueError, match="not even"):
        rgb_to_i420(rgb[:31])


def test_hevc_encoding_is_bit_exact() -> None:
    frames = generated_frames(SourceSpec("h", "generated", "train", seed=2, width=160, height=96, seconds=0.8))
    assert encode_ts(frames, 25, EncodeSpec("hevc", 200_000, 10)) == encode_ts(frames, 25, EncodeSpec("hevc", 200_000, 10))


def test_data_decodes_conceal_damage_as_the_engine_does(clip) -> None:
    """The data set must show damage as the engine (and a player) sees it. Slice threads switch FFmpeg's H.264
    error concealment off, which left garbled pictures several times as wrong as the engine's frame-threaded
    decode shows them, with no picture flagged as concealed: the data decode uses one thread."""
    import io

    import av

    from engine.decode.pyav import PyAVVideoDecoder
    from models.data.codec import decode_pictures

    _, ts = clip
    clean, _ = decode_luma(ts)
    ours, theirs, concealed = [], [], 0
    for seed in range(4):
        bad, _ = damage(ts, video_pid(ts), DamageSpec("garble", 1.0, (2, 4)), 2.0, np.random.default_rng(seed))
        pictures, _ = decode_pictures(bad)
        engine = {}  # pts (90 kHz) -> the engine's luma error, measured while the decoder's buffer is current
        with av.open(io.BytesIO(bad)) as c:
            dec = PyAVVideoDecoder(c.streams.video[0], threads=2)
            for p in [*c.demux(c.streams.video[0]), None]:
                for t, f in dec.decode(p) if p is not None else dec.flush():
                    k = round(t * 90_000)
                    engine[k] = np.abs(f.luma.numpy().astype(np.int16) - clean[k]).mean()
        for k, (y, _, corrupt, _) in pictures.items():
            mad = np.abs(y.astype(np.int16) - clean[k]).mean()
            if mad > 0.5:
                ours.append(mad)
                theirs.append(engine[k])
            concealed += corrupt
    assert len(ours) >= 10
    assert np.mean(ours) == pytest.approx(np.mean(theirs), rel=0.1), (np.mean(ours), np.mean(theirs))
    assert concealed >= 1  # the decoder reports the pictures it concealed, evidence for the detector


_CHAIN = """
import ctypes, hashlib, os, sys
import numpy as np
if sys.argv[1] == "plain":
    # Every FFmpeg SIMD path off (the av wheel's own libavutil, loaded by name before av opens a codec).
    import av, glob
    lib = glob.glob(os.path.join(os.path.dirname(av.__file__), "..", "av.libs", "libavutil*"))
    ctypes.CDLL(lib[0]).av_force_cpu_flags(0) if lib else sys.exit("no libavutil in the av wheel")
from models.data.codec import EncodeSpec, decode_pictures, encode_ts, video_pid
from models.data.content import SourceSpec, generated_frames
from models.data.damage import DamageSpec, damage
frames = generated_frames(SourceSpec("x", "generated", "train", seed=5, width=320, height=192, seconds=1.2))
h = hashlib.sha256(b"".join(f.tobytes() for f in frames))
for codec in ("h264", "hevc"):
    ts = encode_ts(frames, 25, EncodeSpec(codec, 300_000, 12), x264_asm="SSE2" if sys.argv[1] == "plain" else None)
    h.update(ts)
    for seed, kind in enumerate(("garble", "burst", "bitflip")):
        bad, _ = damage(ts, video_pid(ts), DamageSpec(kind, 1.0, (2, 4)), 1.2, np.random.default_rng(seed))
        for k, (y, *flags) in sorted(decode_pictures(bad)[0].items()):
            h.update(y.tobytes() + bytes(flags))
print(h.hexdigest())
"""


def test_the_data_chain_does_not_depend_on_the_cpu() -> None:
    """Content, encode, damage and the concealing decode give the same bytes whatever SIMD the CPU offers:
    torch's portable kernels against its best ones, x264 held to SSE2, FFmpeg's decoders with every SIMD path
    off. (Up to data format 4 another CPU built another data set, so a model's recorded test F1 was not what
    a user measured.)"""
    import os
    import subprocess
    import sys

    def run(mode: str, **env: str) -> str:
        out = subprocess.run([sys.executable, "-c", _CHAIN, mode], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    assert run("best") == run("plain", ATEN_CPU_CAPABILITY="default")
