"""Training of the corruption CNN on the generated data set (and, for fine-tuning, on operators' verdicts).

Training reads random crops (15 x 20 macroblocks) of the analysis planes: a crop of a damaged frame centred on
damage half of the time, anywhere otherwise. Each crop teaches twice: every labelled macroblock (damaged or
intact; drift in between is ignored) and the crop as a whole (corrupt when it holds three damaged blocks, the
label rule's minimum; clean when every block is intact). Validation scores whole frames and picks the decision
threshold with the best F1.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kernels.corruption import top_logits
from models.data.generate import CLEAN, CORRUPT, IGNORE, Recipe, Shard, build, load_split
from models.data.sequences import EVIDENCE
from models.net import CorruptionNet, parameters_count, widen
from models.weights import SHIPPED, ModelMeta, load, save

log = logging.getLogger(__name__)

MODEL_VERSION = "1"
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """epochs: passes over the training frames (each a fresh random crop); minutes: a wall-clock cap (the
    shipped model must train on a 2-core CPU in 15 minutes); init: weights to start from (fine-tuning);
    feedback: a review store whose verdicts join the training data, each repeated `feedback_repeat` times."""

    epochs: int = 44  # 13.4 minutes on the data of 2026-12-05; on larger data the cap fits the schedule to the epochs that fit
    batch: int = 24
    lr: float = 4e-3
    weight_decay: float = 1e-4
    crop: tuple[int, int] = (120, 160)
    width: int = 48  # with `init`: the starting weights are grown to it when it is larger (models.net.widen)
    in_channels: int = 2  # 2: the picture and the one shown before it; 1: the picture alone
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    minutes: float = 15.0
    pos_weight: float = 2.0
    init: str | None = None
    feedback: str | None = None
    feedback_repeat: int = 4
    recipe: dict | None = None  # None: the default Recipe
    data_root: str | None = None
    output: str = str(SHIPPED)
    version: str | None = None
    # How the engine decides pictures (models.weights.ModelMeta.decision); the threshold is chosen on the
    # validation split's whole decodes under this rule, as the engine runs it.
    decision: str = "hold+evidence"
    # Every picture of the training split's clean decodes joins the training data as a negative, read as the engine
    # reads it (key frames alone): the held decision makes one false alarm cost a whole GOP, so clean pictures
    # matter more than their share in the shards.
    clean_sequences: bool = True
    # The share of those clean pictures drawn afresh for each epoch (1: all of them, every epoch). Neighbouring
    # pictures of a clean decode differ little, and they were two fifths of an epoch: a third of them per epoch
    # buys about a third more epochs in the same minutes.
    clean_share: float = 1.0
    # Frames of some shards seen more than once per epoch, by "codec/kind" or "kind" (e.g. {"hevc/bitflip": 2}):
    # damage that neither the transport nor the decoder reports (HEVC bit errors and garbled payloads; FFmpeg's
    # HEVC decoder takes the wrong bits for valid ones) is what only the model can find.
    repeat: dict[str, int] = field(default_factory=dict)
    # Hard negatives: the clean pictures the model scores highest (the top `hard_share` of them, by the starting
    # weights when fine-tuning, else by the model half-way through) each join the training set `hard_repeat`
    # more times, their crops centred on the block the model found most suspicious. A false alarm on clean
    # content costs a whole GOP under the held decision, and random crops of a big clean picture mostly miss the
    # few blocks that fool the model (a facade's window grid, an old codec's own blocking).
    hard_share: float = 0.0
    hard_repeat: int = 2
    # The share of the clean pictures scored when mining (a random draw; hard_share is then of those): scoring every
    # whole clean picture of the photographs' recipe once takes about as long as two epochs on 2 cores.
    hard_pool: float = 1.0
    # The share of crops holding damage that are moved off the codec's block grid by 1-7 analysis pixels and
    # taught as clean (see _crop): content with a grid of its own at another phase is not damage.
    offgrid: float = 0.3
    # Key frames of the shards read alone, as the engine reads them (models.evaluate.sequence_probs), instead of
    # with the picture before: damage inside a key frame is then learnt from the picture itself, as it must be
    # found. Needs the training split's whole decodes (built once beside the data).
    keys_alone: bool = True
    # Test-time views of the trained model (models.net.VIEWS), with which its threshold is chosen on validation.
    tta: str = "rot180"
    # Arithmetic of the training steps: "fp32", or "bf16" (autocast; weights, optimiser and validation stay fp32),
    # which pays only where the device computes bf16 natively (a GPU; a CPU with AVX-512 BF16 or AMX: on the 2-core
    # AVX-512 VM a step of 24 crops took 52-54 ms against 60-62 in fp32, one of 48 crops 94 against 110, and the loss
    # after 500 steps was the same within noise). Without it, bf16 on a CPU is emulated and about 15 times slower
    # (measured on an AVX2 VM), so "bf16" then falls back to fp32, said in the log.
    precision: str = "fp32"

    def check(self) -> None:
        """A ValueError naming the first field a training run would trip on (a YAML typo, a share above 1),
        before any data is built."""

        def number(name: str, low: float, high: float = math.inf, whole: bool = False, above: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (whole and not float(v).is_integer()) or not (low < v if above else low <= v) or v > high:
                kind = "a whole number" if whole else "a number"
                where = f"above {low:g}" if above else f"within {low:g}..{high:g}" if high < math.inf else f"of at least {low:g}"
                raise ValueError(f"{name} must be {kind} {where}, not {v!r}")

        for name in ("epochs", "batch", "width"):
            number(name, 1, whole=True)
        for name in ("seed", "threads", "hard_repeat", "feedback_repeat"):
            number(name, 0, whole=True)
        for name in ("hard_share", "offgrid", "clean_share"):
            number(name, 0.0, 1.0)
        number("hard_pool", 0.0, 1.0, above=True)
        number("weight_decay", 0.0)
        for name in ("lr", "minutes", "pos_weight"):
            number(name, 0.0, above=True)
        if not isinstance(self.repeat, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                        and 1 <= v <= 16 for k, v in self.repeat.items()):
            raise ValueError(f"repeat must map 'codec/kind' or 'kind' to a whole number 1..16, not {self.repeat!r}")
        if not isinstance(self.keys_alone, bool):
            raise ValueError(f"keys_alone must be true or false, not {self.keys_alone!r}")
        from models.net import VIEWS

        if self.tta not in VIEWS:
            raise ValueError(f"tta must be one of {', '.join(VIEWS)}, not {self.tta!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, not {self.precision!r}")
        if self.in_channels not in (1, 2) or isinstance(self.in_channels, bool):
            raise ValueError(f"in_channels must be 1 or 2, not {self.in_channels!r}")
        from engine.detectors.corruption import RULES

        if self.decision not in RULES:
            raise ValueError(f"decision must be {', '.join(RULES[:-1])} or {RULES[-1]}, not {self.decision!r}")
        crop = tuple(self.crop) if isinstance(self.crop, (list, tuple)) else ()
        if len(crop) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 8 and c % 8 == 0 for c in crop):
            raise ValueError(f"crop must be [height, width] in whole macroblocks (multiples of 8), not {self.crop!r}")


@dataclass
class Item:
    plane: torch.Tensor  # (2, H, W) uint8 analysis planes: the picture and the one shown before it
    blocks: torch.Tensor  # (H/8, W/8) uint8 block labels (IGNORE where unknown)
    label: int
    focus: tuple[int, int] | None = None  # a block (row, column) crops centre on most of the time (hard negatives)
    tag: str = ""  # "codec/kind" of the shard it came from (TrainConfig.repeat)


@dataclass
class TrainResult:
    model: CorruptionNet
    meta: ModelMeta
    history: list[dict] = field(default_factory=list)
    path: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pair(plane: np.ndarray | torch.Tensor, prev: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """(2, H, W): the picture and the one before it (itself where there is none: a stream's first picture)."""
    cur = torch.as_tensor(plane)
    if cur.dim() == 3:
        return cur
    return torch.stack([cur, cur if prev is None else torch.as_tensor(prev)])


def shard_inputs(shards: list[Shard]) -> list[torch.Tensor]:
    return [pair(s.planes[i], None if s.prev is None else s.prev[i]) for s in shards for i in range(len(s.labels))]


def items_from_shards(shards: list[Shard], keys: list[np.ndarray | None] | None = None) -> list[Item]:
    """Training items of shards; `keys` (per shard, None where unknown): the decoder's key-frame flags of its
    pictures, which are then read alone, as the engine reads key frames, instead of with the picture before."""
    inputs = shard_inputs(shards)
    if keys is not None:
        flags = [bool(k[i]) if k is not None else False for s, k in zip(shards, keys, strict=True) for i in range(len(s.labels))]
        inputs = [pair(x[0], None) if f else x for x, f in zip(inputs, flags, strict=True)]
    blocks = [torch.from_numpy(b) for s in shards for b in s.blocks]
    labels = [int(x) for s in shards for x in s.labels]
    tags = [f"{s.codec}/{s.kind}" for s in shards for _ in s.labels]
    return [Item(p, b, y, tag=t) for p, b, y, t in zip(inputs, blocks, labels, tags, strict=True)]


def shard_keys(recipe: Recipe, folder: Path, split: str) -> tuple[list[Shard], list[np.ndarray | None]]:
    """A split's shards and, for each, the key-frame flags of its pictures from the split's whole decodes
    (models.data.sequences, built on first use: about 3 minutes for the default training split on 2 cores);
    None for a shard with no decode behind it (synthetic artefacts) or whose decode came out otherwise."""
    from models.data.sequences import sampled_keys, sequence_paths

    seq = {p.name: p for p in sequence_paths(recipe, folder, split)}
    shards, keys = [], []
    for path in sorted((folder / split).glob("*.npz")):
        shard = Shard.load(path)
        shards.append(shard)
        keys.append(sampled_keys(seq[path.name], shard.labels) if path.name in seq else None)
    return shards, keys


def _crop(item: Item, ch: int, cw: int, rng: np.random.Generator, offgrid: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    bh, bw = item.blocks.shape
    h, w = item.plane.shape[-2:]
    gh, gw = ch // 8, cw // 8
    if h < ch or w < cw:  # smaller than a crop: pad with replicated edges, padding blocks ignored
        plane = F.pad(item.plane[None].float(), (0, max(0, cw - w), 0, max(0, ch - h)), mode="replicate")[0].to(torch.uint8)
        blocks = torch.full((max(bh, gh), max(bw, gw)), IGNORE, dtype=torch.uint8)
        blocks[:bh, :bw] = item.blocks
        item = Item(plane, blocks, item.label, item.focus)
        bh, bw = blocks.shape
    damaged = torch.nonzero(item.blocks == 1)
    if item.focus is not None and rng.random() < 0.75:
        centre = True
        cy, cx = item.focus
    else:
        centre = bool(len(damaged)) and rng.random() < 0.5
        if centre:
            cy, cx = damaged[int(rng.integers(len(damaged)))].tolist()
    if centre:
        by = int(np.clip(cy - gh // 2 + rng.integers(-gh // 4, gh // 4 + 1), 0, bh - gh))
        bx = int(np.clip(cx - gw // 2 + rng.integers(-gw // 4, gw // 4 + 1), 0, bw - gw))
    else:
        by, bx = int(rng.integers(0, bh - gh + 1)), int(rng.integers(0, bw - gw + 1))
    sy = sx = 0
    if offgrid > 0 and int((item.blocks[by: by + gh, bx: bx + gw] == 1).sum()) >= 3 and rng.random() < offgrid:
        # Damage moved off the codec's grid is taught as clean: concealment always follows the grid, a lit
        # window grid or tiles fall at any phase, so the model has to judge the phase, not the look.
        while sy % 8 == 0 and sx % 8 == 0:
            sy, sx = (int(v) for v in rng.integers(-7, 8, 2))
    y0, x0 = by * 8 + sy, bx * 8 + sx
    top, left = max(0, -y0), max(0, -x0)  # a crop moved past the top or left edge: replicated below
    plane = item.plane[:, y0 + top: y0 + ch, x0 + left: x0 + cw]
    if top or left:
        plane = F.pad(plane[None].float(), (left, 0, top, 0), mode="replicate")[0].to(torch.uint8)
    blocks = torch.zeros((gh, gw), dtype=torch.uint8) if sy or sx else item.blocks[by: by + gh, bx: bx + gw]
    if plane.shape[-2:] != (ch, cw):  # the last partial macroblock row/column of an odd-sized picture
        plane = F.pad(plane[None].float(), (0, cw - plane.shape[-1], 0, ch - plane.shape[-2]), mode="replicate")[0].to(torch.uint8)
    return _augment(plane, blocks, rng)


def _augment(plane: torch.Tensor, blocks: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror images and other exposures are as likely as the originals. Crops are whole macroblocks, so a
    mirrored crop keeps the codec grid where it was."""
    if rng.random() < 0.5:
        plane, blocks = plane.flip(-1), blocks.flip(-1)
    if rng.random() < 0.3:
        plane, blocks = plane.flip(-2), blocks.flip(-2)
    if rng.random() < 0.5:
        gain, offset = rng.uniform(0.75, 1.2), rng.uniform(-20, 20)
        plane = (plane.float() * gain + offset).round_().clamp_(0, 255).to(torch.uint8)
    if rng.random() < 0.1:
        # No picture before (a stream's start, a sparse tier): the model must still judge from the picture.
        plane = torch.stack([plane[0], plane[0]])
    return plane.contiguous(), blocks.contiguous()


def _crop_label(blocks: torch.Tensor, frame_label: int | None) -> float:
    if frame_label is not None:  # an operator's verdict on the whole picture
        return float(frame_label)
    n = int((blocks == 1).sum())
    if n >= 3:
        return 1.0
    if n == 0 and not bool((blocks == IGNORE).any()):
        return 0.0
    return math.nan


def _loss(model: CorruptionNet, planes: torch.Tensor, blocks: torch.Tensor, frame_y: torch.Tensor, pos_weight: float) -> torch.Tensor:
    logits = model(planes[:, : model.in_channels]).float()  # the loss in fp32 under bf16 autocast too
    logits = logits[:, : blocks.shape[1], : blocks.shape[2]]
    known = blocks != IGNORE
    pw = torch.tensor(pos_weight, device=logits.device)
    loss = torch.zeros((), device=logits.device)
    if known.any():
        loss = loss + F.binary_cross_entropy_with_logits(logits[known], blocks[known].float(), pos_weight=pw)
    ok = ~torch.isnan(frame_y)
    if ok.any():
        fl = top_logits(logits, share=0.0)  # a crop: three damaged blocks make it corrupt
        loss = loss + F.binary_cross_entropy_with_logits(fl[ok], frame_y[ok], pos_weight=pw)
    return loss


@torch.inference_mode()
def dataset_loss(model: CorruptionNet, items: list[Item], crop: tuple[int, int], seed: int = 0, pos_weight: float = 2.0,
                 batch_stats: bool = False) -> float:
    """The training loss over one fixed set of crops (the same crops for the same seed): comparable before and
    after training. `batch_stats`: normalise with the set's own statistics, as training does, instead of the
    running ones (which after a few steps of a tiny run say more about the momentum than about the model); the
    model itself is left as it was."""
    rng = np.random.default_rng(seed)
    was = model.training
    if batch_stats:
        import copy

        model = copy.deepcopy(model)
    model.train(batch_stats)
    crops = [_crop(it, crop[0], crop[1], rng) for it in items]
    planes = torch.stack([c[0] for c in crops])
    blocks = torch.stack([c[1] for c in crops])
    fy = torch.tensor([_crop_label(c[1], None) for c in crops])
    with torch.no_grad():
        loss = float(_loss(model, planes, blocks, fy, pos_weight))
    model.train(was)
    return loss


@torch.inference_mode()
def frame_probabilities(model: CorruptionNet, planes: list[torch.Tensor] | np.ndarray, device: torch.device, share: float,
                        batch: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frame probabilities (N,) and block probability maps of whole analysis planes (grouped by size)."""
    model.eval()
    probs = np.zeros(len(planes), dtype=np.float32)
    maps: list[np.ndarray] = [None] * len(planes)  # type: ignore[list-item]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(planes):
        groups.setdefault(tuple(p.shape[-2:]), []).append(i)
    for idx in groups.values():
        for a in range(0, len(idx), batch):
            sel = idx[a: a + batch]
            x = torch.stack([pair(planes[i], None) for i in sel]).to(device)
            logits = model(x[:, : model.in_channels]).float()
            probs[sel] = torch.sigmoid(top_logits(logits, share)).cpu().numpy()
            m = torch.sigmoid(logits).cpu().numpy()
            for j, i in enumerate(sel):
                maps[i] = m[j]
    return probs, maps


def best_f1_threshold(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-probs, kind="stable")
    p, y = probs[order], labels[order] == CORRUPT
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    pos = max(1, int(y.sum()))
    f1 = 2 * tp / (tp + fp + pos)
    # Only where the next score differs is a threshold between them possible.
    cut = np.flatnonzero(np.r_[p[1:] != p[:-1], True])
    # Levels above 1 are transport evidence and -1 marks pictures not analysed (models.evaluate.hold_levels): the
    # first fire and the second stay quiet whatever the threshold, so a cut at either is no threshold for the
    # model. A barely trained model can score best by firing on evidence alone; its threshold is then the highest
    # probability, not a number past every probability.
    model_cuts = cut[(p[cut] >= 0.0) & (p[cut] <= 1.0)]
    if model_cuts.size:
        cut = model_cuts
    k = cut[int(np.argmax(f1[cut]))]
    return float(p[k]), float(f1[k])


def clean_sequence_items(recipe: Recipe, folder: Path, split: str) -> list[Item]:
    """Every picture of a split's clean decodes (from the streams kept beside the data), each with the picture
    shown before it, or alone at a key frame or a stream's start, as the engine reads them; all blocks intact."""
    from kernels.corruption import analysis_plane
    from models.data.codec import decode_pictures

    out = []
    for src in recipe.sources:
        if src.split != split:
            continue
        for codec in recipe.codecs:
            dec, _ = decode_pictures((folder / "streams" / f"{src.name.replace('.', '_')}__{codec}.ts").read_bytes())
            keys = sorted(dec)
            planes = [analysis_plane(torch.from_numpy(dec[k][0])) for k in keys]
            for i, k in enumerate(keys):
                before = planes[i] if i == 0 or dec[k][1] else planes[i - 1]
                blocks = torch.zeros(math.ceil(planes[i].shape[-2] / 8), math.ceil(planes[i].shape[-1] / 8), dtype=torch.uint8)
                out.append(Item(torch.stack([planes[i], before]), blocks, CLEAN))
    return out


def mine_hard_negatives(model: CorruptionNet, items: list[Item], share: float, device: torch.device,
                        batch: int = 8) -> list[Item]:
    """The top `share` of the clean items by the model's score (the mean of its top block logits), each as a copy
    focused on its most suspicious block (Item.focus)."""
    clean = [it for it in items if it.label == CLEAN]
    n = int(round(share * len(clean)))
    if n <= 0:
        return []
    was = model.training
    model.eval()
    scores, focus = np.zeros(len(clean)), []
    with torch.inference_mode():
        groups: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(clean):
            groups.setdefault(tuple(it.plane.shape[-2:]), []).append(i)
        for idx in groups.values():
            for a in range(0, len(idx), batch):
                sel = idx[a: a + batch]
                logits = model(torch.stack([clean[i].plane for i in sel]).to(device)[:, : model.in_channels]).float()
                flat = logits.flatten(1)
                scores[sel] = top_logits(logits, 0.0).cpu().numpy()
                for j, k in zip(sel, flat.argmax(1).tolist(), strict=True):
                    focus.append((j, divmod(int(k), logits.shape[-1])))
    model.train(was)
    where = dict(focus)
    hardest = np.argsort(-scores, kind="stable")[:n]
    return [Item(clean[i].plane, clean[i].blocks, CLEAN, where[int(i)]) for i in hardest]


def _feedback_items(store_path: str | None) -> list[tuple[Item, int]]:
    if not store_path:
        return []
    from engine.review import ReviewStore

    out = []
    for rec in ReviewStore(store_path).labelled():
        plane = pair(rec.plane, None)
        gh, gw = math.ceil(plane.shape[-2] / 8), math.ceil(plane.shape[-1] / 8)
        # A confirmed alert says *that* the picture is corrupt, not where: only the frame label is known. A false
        # alarm says nothing in it is damaged.
        blocks = torch.full((gh, gw), IGNORE if rec.verdict else 0, dtype=torch.uint8)
        out.append((Item(plane, blocks, CORRUPT if rec.verdict else CLEAN), int(rec.verdict)))
    return out


def one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int, pct_start: float,
              done: int = 0) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's one-cycle schedule over `total_steps`, with `done` of them already taken (the optimiser's rate set
    to the step reached): when the time cap shortens a run, the same shape laid out over the new length."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, done + 1), pct_start=pct_start)
    with warnings.catch_warnings():  # stepping a fresh schedule forward is not the misuse torch warns about
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            sched.step()
    return sched


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 convolutions natively (else autocast to bf16 is emulated: far slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's query
        return False


def train(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    say = progress or (lambda s: log.info(s))
    cfg.check()
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    bf16 = cfg.precision == "bf16" and native_bf16(device)
    if cfg.precision == "bf16" and not bf16:
        say(f"precision bf16: {device.type} has no native bf16 arithmetic here; training in fp32")
    recipe = Recipe.from_json(cfg.recipe) if cfg.recipe else Recipe()
    folder = build(recipe, Path(cfg.data_root) if cfg.data_root else None, progress=lambda s: say(f"data: {s} built"))
    if cfg.keys_alone:
        shards, keys = shard_keys(recipe, folder, "train")
        say(f"key frames read alone: {sum(int(k.sum()) for k in keys if k is not None)} shard pictures "
            f"({sum(k is None for k in keys)} of {len(keys)} shards without flags)")
        items = items_from_shards(shards, keys)
    else:
        items = items_from_shards(load_split(folder, "train"))
    seq_items = clean_sequence_items(recipe, folder, "train") if cfg.clean_sequences else []
    every = cfg.clean_share >= 1  # every clean sequence picture in every epoch; else `drawn` of them afresh
    drawn = 0 if every else int(round(cfg.clean_share * len(seq_items)))

    def times(it: Item) -> int:
        return cfg.repeat.get(it.tag, cfg.repeat.get(it.tag.partition("/")[2], 1))

    fixed = [it for it in items for _ in range(times(it))] + (seq_items if every else [])
    items += seq_items
    feedback = _feedback_items(cfg.feedback)
    # Verdicts are few and precious: each is seen several times per epoch, with its frame label kept whole.
    train_set: list[tuple[Item, int | None]] = [(it, None) for it in fixed] + [fb for fb in feedback for _ in range(cfg.feedback_repeat)]
    val = load_split(folder, "val")
    val_labels = np.concatenate([s.labels for s in val]) if val else np.zeros(0)
    say(f"data {recipe.hash}: {len(items)} training frames ({sum(it.label == CORRUPT for it in items)} corrupt), "
        f"{len(feedback)} operator verdicts, {len(val_labels)} validation frames; device {device}")

    parent = None
    if cfg.init:
        model, pmeta = load(cfg.init, device)
        parent = pmeta.version
        width = pmeta.width
        if cfg.width > width:  # grown from the weights it starts from (models.net.widen), not started afresh
            model = widen(model.cpu(), cfg.width, seed=cfg.seed).to(device)
            width = cfg.width
            say(f"widened {pmeta.version} from width {pmeta.width} to {width} ({parameters_count(model)} parameters)")
    else:
        model = CorruptionNet(width=cfg.width, in_channels=cfg.in_channels).to(device)
        width = cfg.width
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # oneDNN's faster layout: ~11 % per step on 2 cores
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil((len(train_set) + drawn) / cfg.batch))
    mine_at = 0 if cfg.init else cfg.epochs // 2  # epochs done before hard negatives are mined (once)
    clean_items = [it for it in items if it.label == CLEAN]
    n_pool = int(round(cfg.hard_pool * len(clean_items)))
    n_hard = int(round(cfg.hard_share * n_pool)) * cfg.hard_repeat
    mined_steps = max(1, math.ceil((len(train_set) + drawn + n_hard) / cfg.batch))
    total_steps = cfg.epochs * steps_per_epoch if cfg.hard_share <= 0 else mine_at * steps_per_epoch + (cfg.epochs - mine_at) * mined_steps
    pct_start = 0.15 if not cfg.init else 0.05
    sched = one_cycle(opt, cfg.lr, total_steps, pct_start)
    done_steps = 0
    history = []
    ch, cw = cfg.crop
    base_set = list(train_set)

    def mine() -> None:
        nonlocal train_set, steps_per_epoch
        pool = clean_items if n_pool >= len(clean_items) else [clean_items[int(i)] for i in np.sort(rng.choice(len(clean_items), n_pool, replace=False))]
        hard = mine_hard_negatives(model, pool, cfg.hard_share, device)
        train_set = base_set + [(it, None) for it in hard for _ in range(cfg.hard_repeat)]
        steps_per_epoch = max(1, math.ceil((len(train_set) + drawn) / cfg.batch))
        durations.clear()
        say(f"hard negatives: {len(hard)} of {len(pool)} clean pictures scored x {cfg.hard_repeat} (by the model after {epoch} epochs)")

    # The cap is on training: the data set is built once per recipe and cached, and a first build (minutes on 2
    # cores: 11 for the key-frame decodes and the training split's whole decodes added to an existing build) is
    # reported apart. The validation pass after training takes about a
    # tenth of an epoch per 500 frames; keep room for it.
    t_train = time.monotonic()
    deadline = t_train + cfg.minutes * 60 - 30
    durations: list[float] = []  # of the epochs since the training set last changed size
    stopped_early = False
    epochs = cfg.epochs
    epoch = 0
    while epoch < epochs:
        if cfg.hard_share > 0 and epoch == mine_at:
            mine()
        t_epoch = time.monotonic()
        model.train()
        epoch_set = train_set
        if drawn:
            epoch_set = train_set + [(seq_items[int(i)], None) for i in rng.choice(len(seq_items), drawn, replace=False)]
        order = rng.permutation(len(epoch_set))
        total, n, peak = 0.0, 0, 0.0
        for a in range(0, len(order), cfg.batch):
            sel = order[a: a + cfg.batch]
            crops = [_crop(epoch_set[i][0], ch, cw, rng, cfg.offgrid if epoch_set[i][1] is None else 0.0) for i in sel]
            planes = torch.stack([c[0] for c in crops]).to(device)
            blocks = torch.stack([c[1] for c in crops]).to(device)
            fy = torch.tensor([_crop_label(c[1], None if epoch_set[i][1] is None else epoch_set[i][0].label)
                               for c, i in zip(crops, sel, strict=True)], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _loss(model, planes, blocks, fy, cfg.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            peak = max(peak, opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            done_steps += 1
            total += float(loss.detach()) * len(sel)
            n += len(sel)
        rec = {"epoch": epoch + 1, "loss": total / max(1, n), "lr": peak, "seconds": round(time.monotonic() - t_train, 1)}
        history.append(rec)
        say(f"epoch {epoch + 1}/{epochs}: loss {rec['loss']:.4f} ({rec['seconds']:.0f} s)")
        epoch += 1
        durations.append(time.monotonic() - t_epoch)
        # The mean epoch, not the last one: one epoch slowed by other work on the machine must not cut the run.
        took = sum(durations) / len(durations)
        fit = epoch + int(max(0.0, deadline - time.monotonic()) // max(took, 1e-3))
        if fit < epochs:
            # The time cap will cut training short: the one-cycle schedule is laid out again over the epochs that
            # fit, at the step reached, so the run still warms up to its peak rate and anneals to the end. (Up to
            # 2026-12-08 a cosine decay started from the rate reached; the cap's first estimate comes after one
            # epoch, in the warm-up, so a capped run from scratch never went above a tenth of its peak rate:
            # 0.00037 for lr 0.004 when 31 of 44 epochs fit.)
            say(f"the {cfg.minutes:g}-minute cap allows {fit} of {epochs} epochs; the learning-rate schedule is fitted to end there")
            epochs = fit
            stopped_early = True
            if cfg.hard_share > 0 and mine_at > epoch:  # mined half-way through the epochs that fit, not never
                mine_at = max(epoch, epochs // 2)
            left = sum(steps_per_epoch if cfg.hard_share <= 0 or e < mine_at else mined_steps for e in range(epoch, epochs))
            if left > 0:
                sched = one_cycle(opt, cfg.lr, done_steps + left, pct_start, done=done_steps)
    model.eval()
    model.tta = cfg.tta
    threshold, val_f1, val_frame = 0.5, float("nan"), {}
    if len(val_labels) and (val_labels == CORRUPT).any():
        from types import SimpleNamespace

        from models.evaluate import calibrate

        cal = calibrate(model, SimpleNamespace(frame_blocks=recipe.frame_blocks), recipe, folder, tuple(dict.fromkeys(("frame", cfg.decision))))
        threshold, val_f1 = cal[cfg.decision]
        val_frame = {"frame_rule_threshold": cal["frame"][0], "frame_rule_val_f1": cal["frame"][1]}
    say(f"validation ({cfg.decision}): best F1 {val_f1:.4f} at threshold {threshold:.4f}")
    meta = ModelMeta(
        version=cfg.version or dt.datetime.now(dt.UTC).strftime(f"{MODEL_VERSION}.%Y%m%d%H%M%S"),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        recipe_hash=recipe.hash,
        width=width,
        in_channels=model.in_channels,
        frame_blocks=recipe.frame_blocks,
        threshold=threshold,
        decision=cfg.decision,
        tta=cfg.tta,
        train_config={**asdict(cfg), "stopped_early": stopped_early, "epochs_run": epoch, "device_used": str(device),
                      "precision_used": "bf16" if bf16 else "fp32", "peak_lr": max((h["lr"] for h in history), default=0.0),
                      "epoch_frames": len(train_set) + drawn,
                      "seconds": round(time.monotonic() - t_train, 1), "data_seconds": round(t_train - t_start, 1)},
        metrics={"val_f1": val_f1, **val_frame, "final_loss": history[-1]["loss"] if history else None, "evidence": EVIDENCE},
        parent=parent,
        feedback=len(feedback),
    )
    return TrainResult(model.cpu().eval(), meta, history)


def train_and_save(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    res = train(cfg, progress)
    res.path = save(res.model, res.meta, Path(cfg.output))
    return res
