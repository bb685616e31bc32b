"""Whole damaged decodes, frame by frame, for judging the corruption detector the way the engine runs it.

The shards of `generate` keep a sample of each damaged decode (a few dozen labelled pictures and the picture
before each). The engine, though, sees every picture of a stream in order, with the decoder's flags (key frame,
concealed error), and may decide from what came before. This module replays the recipe's damage for one source
clip from its kept clean streams (the damage, the decode and the labels are bit-exact for the recipe, so the
same frames come out as in the shards), keeps every picture of every decode, and marks which of them the shard
sampled: a sequence evaluation scores exactly the shards' frames (or all labelled frames) with the whole history
before each one available.

Sequences are cached beside the data set under `sequences/<split>/` (analysis planes, labels, flags), each
file with the version of the loss evidence (`EVIDENCE`) it was made with: a cache from an older decoder's
evidence is made again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.corruption import analysis_plane
from models.data.codec import decode_pictures, video_pid
from models.data.content import SourceSpec
from models.data.generate import (
    CLEAN,
    CORRUPT,
    Recipe,
    _pick,
    _rng,
    block_mad,
    block_seam,
    damage_rng,
    damaged_stream,
    decode_name,
    label,
)

# Version of the loss evidence (engine.decode.base.DamageTracker) in `Sequence.damaged`; 2: the demuxer's flag
# read as damage of the next packet, concealed pictures marking the stream until a whole key frame; 3: damage of
# a non-reference picture (engine.decode.base.picture_reference) marks that picture alone; 4: a packet the
# decoder logged errors for counts as damaged (engine.decode.pyav.decode_packet); 5: so does a picture with
# fewer slices than the stream's fixed layout (engine.decode.base.slice_count); 6: a concealed picture marks the
# pictures decoded after it that are still in the decoder, and not a GOP a whole key frame began
# (DamageTracker.concealed), and the H.264 decoder's logged errors no longer count (engine.decode.pyav.loss_evidence).
EVIDENCE = 6


@dataclass
class Sequence:
    """Every picture of one decode in display order: analysis planes (N, H/2, W/2) uint8, frame labels (N,) int8
    (-2: no clean counterpart, not scored), block labels (N, H/16, W/16) uint8, the decoder's key-frame and
    concealment flags (N,) bool, the loss evidence the engine's decoder gives each picture (`damaged`, see
    engine.decode.base.DamageTracker), and `sampled` (N,) bool: the pictures the recipe's shard of this decode
    holds."""

    planes: np.ndarray
    labels: np.ndarray
    blocks: np.ndarray
    key: np.ndarray
    corrupt: np.ndarray
    sampled: np.ndarray
    damaged: np.ndarray
    source: str
    split: str
    codec: str
    kind: str
    fps: float
    draw: int = 0  # which of the recipe's damaged decodes of this kind (Recipe.draws)

    @property
    def name(self) -> str:
        """source__codec__decode, as in the file names of shards and sequences."""
        return decode_name(self.source, self.codec, self.kind, self.draw)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, planes=self.planes, labels=self.labels, blocks=self.blocks, key=self.key, corrupt=self.corrupt,
                 sampled=self.sampled, damaged=self.damaged, meta=np.array(json.dumps({"source": self.source, "split": self.split, "codec": self.codec,
                                                                 "kind": self.kind, "fps": self.fps,
                                                                 "draw": self.draw, "evidence": EVIDENCE})))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> Sequence:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        meta.pop("evidence", None)
        return Sequence(z["planes"], z["labels"], z["blocks"], z["key"], z["corrupt"], z["sampled"], z["damaged"], **meta)


def _planes(lumas: list[np.ndarray]) -> np.ndarray:
    return np.stack([analysis_plane(torch.from_numpy(y)).numpy() for y in lumas])


def source_sequences(r: Recipe, src: SourceSpec, folder: Path) -> list[Sequence]:
    """Every decode of one source clip (each codec: the clean one and one per damage), replayed exactly as
    `generate.build_source` made its shards (same random draws in the same order)."""
    out = []
    fps = src.fps
    for codec in r.codecs:
        stream_path = folder / "streams" / f"{src.name.replace('.', '_')}__{codec}.ts"
        ts = stream_path.read_bytes()
        clean = decode_pictures(ts)[0]
        keys = sorted(clean)
        duration = len(keys) / fps
        h, w = clean[keys[0]][0].shape
        rng = _rng(r, src.name, codec, "clean")
        picks = _pick(np.arange(len(keys)), r.clean_per_codec, rng)
        sampled = np.zeros(len(keys), bool)
        sampled[picks] = True
        zero = np.zeros((len(keys), h // 16, w // 16), np.uint8)
        out.append(Sequence(_planes([clean[k][0] for k in keys]), np.full(len(keys), CLEAN, np.int8), zero,
                            np.array([clean[k][1] for k in keys]), np.array([clean[k][2] for k in keys]), sampled,
                            np.array([clean[k][3] for k in keys]), src.name, src.split, codec, "clean", float(fps)))
        pid = video_pid(ts)
        for spec, draw in r.decodes(src.split, codec):
            rng = damage_rng(r, src.name, codec, spec.kind, draw)
            damaged = damaged_stream(ts, pid, spec, duration, fps, codec, rng)
            dec = decode_pictures(damaged)[0]
            order = sorted(dec)
            common = sorted(set(dec) & set(clean))
            labels = np.full(len(order), -2, np.int8)  # -2: no clean counterpart (not scored)
            blocks = np.zeros((len(order), h // 16, w // 16), np.uint8)
            pos = {k: i for i, k in enumerate(order)}
            for k in common:
                mad = block_mad(dec[k][0], clean[k][0])
                lab, b = label(mad, r, block_seam(dec[k][0], clean[k][0]))
                labels[pos[k]], blocks[pos[k]] = lab, b
            lab_common = np.array([labels[pos[k]] for k in common])
            keep = np.concatenate([_pick(np.flatnonzero(lab_common == CORRUPT), r.per_decode[0], rng),
                                   _pick(np.flatnonzero(lab_common == CLEAN), r.per_decode[1], rng)])
            sampled = np.zeros(len(order), bool)
            sampled[[pos[common[i]] for i in keep]] = True
            out.append(Sequence(_planes([dec[k][0] for k in order]), labels, blocks,
                                np.array([dec[k][1] for k in order]), np.array([dec[k][2] for k in order]), sampled,
                                np.array([dec[k][3] for k in order]), src.name, src.split, codec, spec.kind, float(fps), draw))
    return out


def _current(path: Path) -> bool:
    """A cached sequence made with this version of the loss evidence."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"])).get("evidence") == EVIDENCE
    except (OSError, ValueError, KeyError):
        return False


def sequence_paths(r: Recipe, folder: Path, split: str) -> list[Path]:
    """The cached files of every decode of every source clip of a split (built where missing or from an older
    evidence version), under folder/sequences/<split>, in the order `sequences` loads them."""
    out = []
    for src in r.sources:
        if src.split != split:
            continue
        base = folder / "sequences" / split
        names = [base / f"{decode_name(src.name, c, k, i)}.npz" for c in r.codecs
                 for k, i in (("clean", 0), *((d.kind, i) for d, i in r.decodes(split, c)))]
        if not all(_current(p) for p in names):
            for s in source_sequences(r, src, folder):
                s.save(base / f"{s.name}.npz")
        out.extend(names)
    return out


def sequences(r: Recipe, folder: Path, split: str) -> list[Sequence]:
    """Every decode of every source clip of a split, built once and cached under folder/sequences/<split>."""
    return [Sequence.load(p) for p in sequence_paths(r, folder, split)]


def sampled_keys(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The decoder's key-frame flags of the pictures a decode's shard holds (in the shard's order), read from
    its cached sequence without loading the pictures; None when the sequence's sample does not match the
    shard's `labels` (FFmpeg's HEVC concealment of damaged data is not bit-exact run to run)."""
    with np.load(path) as z:
        sampled = z["sampled"]
        if int(sampled.sum()) != len(labels) or not np.array_equal(z["labels"][sampled], labels):
            return None
        return z["key"][sampled]
