"""The review store: every `corruption` alert keeps the picture the model judged (its analysis plane) and the
model's block map, so an operator can say whether it was right (`framewatch label`), and `framewatch train
--include-feedback` learns from the verdicts.

One folder per alert: record.json (what the alert was, the verdict once given), sample.npz (plane and map) and
view.png (the plane with the damage box, for people). Plain files: easy to copy off a box, back up or prune.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("framewatch")
_LOCK = threading.Lock()  # verdicts are rare; one lock keeps the store picklable for worker processes
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ReviewError(Exception):
    pass


@dataclass
class ReviewRecord:
    alert_id: str
    stream: str
    start: float
    wallclock: str
    probability: float | None
    threshold: float | None
    model_version: str | None
    box: tuple[float, float, float, float] | None
    verdict: bool | None = None
    labelled_at: str | None = None
    plane: np.ndarray | None = None  # (H/2, W/2) or (2, H/2, W/2) uint8 (with the picture before), loaded on demand
    map: np.ndarray | None = None

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("plane")
        d.pop("map")
        return d


class ReviewStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, alert_id: str) -> Path:
        if not _ID.match(alert_id):
            raise ReviewError(f"{alert_id!r} is not an alert id")
        return self.root / alert_id

    def add(self, rec: ReviewRecord, plane: np.ndarray, block_map: np.ndarray | None) -> Path | None:
        """Store one alert's evidence; a failure is logged (the alert itself goes out regardless)."""
        try:
            folder = self._dir(rec.alert_id)
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / "sample.npz", plane=np.asarray(plane, np.uint8),
                                map=np.zeros((0, 0), np.float16) if block_map is None else np.asarray(block_map, np.float16))
            self._write(folder, rec)
            _view(plane, rec.box).save(folder / "view.png")
            return folder
        except Exception as exc:
            log.error("review store: cannot keep alert %s: %s", rec.alert_id, exc)
            return None

    def _write(self, folder: Path, rec: ReviewRecord) -> None:
        tmp = folder / "record.json.tmp"
        tmp.write_text(json.dumps(rec.summary(), indent=1) + "\n")
        tmp.replace(folder / "record.json")

    def get(self, alert_id: str, load: bool = False) -> ReviewRecord:
        folder = self._dir(alert_id)
        try:
            d = json.loads((folder / "record.json").read_text())
        except FileNotFoundError:
            raise ReviewError(f"no corruption alert {alert_id} in the review store {self.root}") from None
        except (OSError, ValueError) as exc:
            raise ReviewError(f"review record {alert_id} is unreadable: {exc}") from None
        try:  # a record edited by hand or written by another version: one line, not a traceback
            d["box"] = tuple(d["box"]) if d.get("box") else None
            rec = ReviewRecord(**d)
        except (TypeError, AttributeError, ValueError) as exc:
            raise ReviewError(f"review record {alert_id} is not a review record: {exc}") from None
        if load:
            with np.load(folder / "sample.npz") as z:
                rec.plane = z["plane"]
                rec.map = z["map"] if z["map"].size else None
        return rec

    def label(self, alert_id: str, verdict: bool) -> ReviewRecord:
        with _LOCK:
            rec = self.get(alert_id)
            rec.verdict = bool(verdict)
            rec.labelled_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            try:
                self._write(self._dir(alert_id), rec)
            except OSError as exc:  # a read-only store
                raise ReviewError(f"cannot record the verdict for {alert_id}: {exc.strerror or exc}") from None
            return rec

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "record.json").is_file())

    def records(self, load: bool = False) -> Iterator[ReviewRecord]:
        for i in self.ids():
            try:
                yield self.get(i, load)
            except (ReviewError, OSError, ValueError) as exc:
                log.error("review store: skipping %s: %s", i, exc)

    def labelled(self) -> list[ReviewRecord]:
        return [r for r in self.records(load=True) if r.verdict is not None and r.plane is not None]


def _view(plane: np.ndarray, box: tuple[float, float, float, float] | None):
    from PIL import Image

    p = np.asarray(plane, np.uint8)
    img = Image.fromarray(p[0] if p.ndim == 3 else p).convert("RGB")
    if box is not None:
        draw_box(img, box)
    return img


def draw_box(img, box: tuple[float, float, float, float], colour: tuple[int, int, int] = (255, 40, 40)) -> None:
    from PIL import ImageDraw

    w, h = img.size
    x, y, bw, bh = box
    ImageDraw.Draw(img).rectangle([x * w, y * h, min(w - 1, (x + bw) * w), min(h - 1, (y + bh) * h)],
                                  outline=colour, width=max(1, w // 160))
