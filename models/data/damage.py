"""Damage an MPEG-TS byte stream the way networks do, on the video PID only.

Transport streams travel in 188-byte packets (7 to an IP datagram), so real loss removes or garbles whole TS
packets: bursts (a congested link or a lost datagram run), scattered loss, garbled payloads (a bad RF link),
bit errors, and whole slices missing (a lost RTP packet carrying one slice). Every function here is pure:
bytes in, bytes out, a seeded numpy Generator for the randomness, and a list of the TS packet indices touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.decode.base import annex_b_units, is_slice

TS = 188
KINDS = ("burst", "random", "garble", "bitflip", "slice", "key")


@dataclass(frozen=True)
class DamageSpec:
    """kind: one of KINDS. rate: bursts per second (burst, garble, slice) or a probability per video packet
    (random), per video payload bit (bitflip) or per key frame (key: damage_key_frame). size: (min, max) TS
    packets per burst or garbled run.
    protect: seconds at the start left intact, so the decoder has a clean start."""

    kind: str
    rate: float
    size: tuple[int, int] = (1, 1)
    protect: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"damage kind {self.kind!r} is not one of {', '.join(KINDS)}")


def packets(data: bytes) -> np.ndarray:
    if len(data) % TS or (len(data) and data[0] != 0x47):
        raise ValueError("not an aligned MPEG-TS byte stream (188-byte packets starting with 0x47)")
    return np.frombuffer(data, np.uint8).reshape(-1, TS).copy()


def pids(pk: np.ndarray) -> np.ndarray:
    return ((pk[:, 1].astype(np.int32) & 0x1F) << 8) | pk[:, 2]


def _payload_start(p: np.ndarray) -> int:
    afc = (int(p[3]) >> 4) & 3
    if afc in (2, 0):
        return TS
    return 4 + (1 + int(p[4]) if afc == 3 else 0)


def damage(data: bytes, video_pid: int, spec: DamageSpec, duration: float, rng: np.random.Generator) -> tuple[bytes, list[int]]:
    """The damaged stream and the indices (in the original packet list) of the video packets dropped or
    changed. `duration` (seconds) turns per-second rates into counts."""
    pk = packets(data)
    vid = np.flatnonzero(pids(pk) == video_pid)
    start = int(len(vid) * min(1.0, spec.protect / max(duration, 1e-6)))
    candidates = vid[start:]
    if len(candidates) == 0:
        return data, []
    seconds = max(duration - spec.protect, 1e-6)
    touched: list[int] = []
    drop = np.zeros(len(pk), dtype=bool)
    if spec.kind == "random":
        hit = candidates[rng.random(len(candidates)) < spec.rate]
        drop[hit] = True
        touched = hit.tolist()
    elif spec.kind == "bitflip":
        for i in candidates:
            off = _payload_start(pk[i])
            nbits = (TS - off) * 8
            k = rng.binomial(nbits, spec.rate)
            for b in rng.choice(nbits, size=k, replace=False) if k else ():
                pk[i, off + b // 8] ^= np.uint8(1 << (b % 8))
            if k:
                touched.append(int(i))
    else:
        n = max(1, rng.poisson(spec.rate * seconds))
        for _ in range(n):
            at = int(rng.integers(0, len(candidates)))
            size = int(rng.integers(spec.size[0], spec.size[1] + 1))
            run = candidates[at: at + size]
            if spec.kind == "burst":
                drop[run] = True
            elif spec.kind == "garble":
                for i in run:
                    off = _payload_start(pk[i])
                    pk[i, off:] = rng.integers(0, 256, TS - off, dtype=np.uint8)
            touched.extend(int(i) for i in run)
    return pk[~drop].tobytes(), sorted(set(touched))


def drop_slices(nal_payload: bytes, rng: np.random.Generator, codec: str, fraction: float = 0.5) -> bytes:
    """One access unit (Annex B) with one of its slice NAL units removed (never the first slice, whose header
    the decoder needs to start the picture): what a lost RTP packet carrying one slice leaves."""
    starts = []
    i = 0
    b = nal_payload
    while True:
        j = b.find(b"\x00\x00\x01", i)
        if j < 0:
            break
        starts.append(j + 3)
        i = j + 3
    units = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 3 if k + 1 < len(starts) else len(b)
        while e > s and b[e - 1] == 0 and k + 1 < len(starts):
            e -= 1
        units.append((s, e))
    slices = [k for k, (s, _e) in enumerate(units) if is_slice(b[s], codec)]
    if len(slices) < 2:
        return nal_payload
    victims = set(rng.choice(slices[1:], size=max(1, int(round(fraction * (len(slices) - 1)))), replace=False).tolist())
    out = bytearray()
    for k, (s, e) in enumerate(units):
        if k not in victims:
            out += b"\x00\x00\x00\x01" + b[s:e]
    return bytes(out)


def damage_key_frame(au: bytes, rng: np.random.Generator, codec: str) -> bytes:
    """One key frame's access unit (Annex B) as a lossy link leaves it: a garbled run of one to six TS packets'
    worth of payload, a lost slice, or a few bit errors, all after the start of its first slice (the parameter
    sets and the first slice header stay, so the decoder starts the picture and conceals the rest). A damaged key
    frame spoils its whole GOP, and the engine has to see it in the picture alone (key frames are read without
    the picture before), but random loss rarely hits one: this aims at them."""
    mode = int(rng.integers(0, 3))
    if mode == 1:
        out = drop_slices(au, rng, codec, fraction=0.0)
        if out != au:
            return out
        mode = 0
    first = _first_slice(au, codec)
    if first is None or len(au) - first < 32:
        return au
    b = bytearray(au)
    if mode == 0:
        n = int(rng.integers(1, 7)) * (TS - 4)
        at = int(rng.integers(first, len(b)))
        n = min(n, len(b) - at)
        b[at: at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:
        for pos in rng.integers(first * 8, len(b) * 8, int(rng.integers(1, 9))):
            b[int(pos) // 8] ^= 1 << (int(pos) % 8)
    return bytes(b)


def _first_slice(au: bytes, codec: str) -> int | None:
    """The offset a few bytes into the first slice NAL unit of an access unit (past its slice header's start)."""
    return next((o + 8 for o in annex_b_units(au) if is_slice(au[o], codec)), None)
