"""Weights files of the corruption CNN: the state dict plus the metadata that says what it is (version, the data
recipe's hash, training config, metrics, decision threshold, date). One file, so a copy never loses its label;
a JSON twin beside it is for people."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.net import CorruptionNet, parameters_count

SHIPPED = Path(__file__).parent / "weights" / "corruption.pt"
FORMAT = "framewatch-corruption/1"


class WeightsError(Exception):
    """A weights file that cannot be used (missing, not ours, damaged, wrong shapes)."""


@dataclass
class ModelMeta:
    version: str
    created: str
    recipe_hash: str
    width: int
    threshold: float  # frame probability at or above which a frame counts as corrupt (chosen on validation)
    parameters: int = 0
    frame_blocks: float = 0.003
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # version this one was fine-tuned from
    feedback: int = 0  # operator verdicts it was trained on
    in_channels: int = 2  # 1: the picture alone; 2: the picture and the one shown before it
    # How pictures are decided (engine.detectors.corruption.GopHold): "frame" (each picture by its own
    # probability), "hold" (the highest probability since the last key frame), "hold+evidence" (the same, and
    # loss the transport or decoder reported since the last key frame counts as corrupt). `threshold` was chosen
    # on validation data for this rule.
    decision: str = "frame"
    # Test-time views the model averages over (models.net.VIEWS); `threshold` was chosen with them.
    tta: str = "none"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _check_meta(meta: ModelMeta) -> None:
    """What the detector relies on in the metadata: a threshold that is a probability, a known rule, a share
    of blocks. A file that passes the shapes but not these would fail every stream that uses it, later."""
    from engine.detectors.corruption import RULES

    for name in ("threshold", "frame_blocks"):
        v = getattr(meta, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, not {v!r}")
    if meta.threshold < 0.0:  # above 1 is a model that never flags (tests use one), below 0 flags everything
        raise ValueError(f"threshold must not be negative, not {meta.threshold}")
    if not 0.0 < meta.frame_blocks <= 1.0:
        raise ValueError(f"frame_blocks must be within (0, 1], not {meta.frame_blocks}")
    if meta.decision not in RULES:
        raise ValueError(f"decision must be one of {', '.join(RULES)}, not {meta.decision!r}")
    from models.net import VIEWS

    if meta.tta not in VIEWS:
        raise ValueError(f"tta must be one of {', '.join(VIEWS)}, not {meta.tta!r}")
    if meta.in_channels not in (1, 2) or not isinstance(meta.width, int) or not 4 <= meta.width <= 512:
        raise ValueError(f"in_channels 1 or 2 and width 4..512 expected, not {meta.in_channels} and {meta.width!r}")


def save(model: CorruptionNet, meta: ModelMeta, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta.parameters = parameters_count(model)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "meta": meta.to_json(), "state_dict": state}, tmp)
    tmp.replace(path)  # a running engine watching this path never sees half a file
    path.with_suffix(".json").write_text(json.dumps(meta.to_json(), indent=1, sort_keys=True) + "\n")
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[CorruptionNet, ModelMeta]:
    """The model in eval mode on `device`, and its metadata. Any problem is a WeightsError with one line saying
    what is wrong with which file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found" if not path.is_dir() else f"weights file {path} is a directory")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty")
    try:
        with warnings.catch_warnings():  # torch's own warnings about the file are not the user's business
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise WeightsError(f"weights file {path} cannot be read: not a torch weights file, or damaged "
                           f"({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise WeightsError(f"weights file {path} is not a framewatch corruption model (format {FORMAT} expected)")
    try:
        meta = ModelMeta(**blob["meta"])
        _check_meta(meta)
        model = CorruptionNet(width=int(meta.width), in_channels=int(meta.in_channels), tta=meta.tta)
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"weights file {path} does not match the model: {_first_line(exc)}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise WeightsError(f"weights file {path} holds non-finite weights")
    return model.to(device).eval(), meta


def record_metrics(path: Path, key: str, metrics: dict[str, Any]) -> ModelMeta:
    """Add evaluation results to a weights file's metadata (e.g. the held-out test metrics of a model about to
    ship), rewriting the file atomically."""
    model, meta = load(path)
    meta.metrics = {**meta.metrics, key: metrics}
    save(model, meta, Path(path))
    return meta
