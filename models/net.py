"""The corruption CNN: a small fully convolutional network on the analysis plane (native luma averaged 2x2, so
one 16x16 macroblock is an 8x8 cell), giving a logit per macroblock (the location map) and a frame logit.

Why this shape: concealed packet loss shows as seams along the codec's block grid (displaced, smeared or
flat blocks next to correct ones), so the stem reads each 4x4 cell together with one pixel of its neighbours
(kernel 6, stride 4), keeping the grid in place; most of the work then happens on the macroblock grid
(residual blocks) and on a coarser context grid (a seam is judged against its surroundings). The frame logit is the mean of the k largest block
logits, k being the label rule's minimum number of damaged blocks (kernels.corruption.top_logits), so the two
outputs agree by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sep(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Res(nn.Module):
    """Inverted residual block (expand, depthwise 3x3, project, add): depth without the optimisation trouble of
    a plain stack, at the cost of a few pointwise convolutions on the macroblock grid."""

    def __init__(self, c: int, expand: int = 2) -> None:
        super().__init__()
        e = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU(inplace=True),
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU(inplace=True),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


# Test-time views: the model in eval mode averages its block logits over the picture and these turned copies of it
# (the dims flipped), each map turned back. Padded to whole macroblocks first, a turn maps the codec's block grid onto
# itself, so damage stays where concealment put it while the content around it is seen from another side. Chosen
# on validation: for the model shipped on 2026-12-07, hold+evidence F1 0.956 alone, 0.955 with the left-right
# mirror, 0.961 with the 180-degree turn, 0.955 with both (README, Corruption model).
VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": (), "mirror": ((-1,),), "rot180": ((-2, -1),), "mirror+rot180": ((-1,), (-2, -1))}


class CorruptionNet(nn.Module):
    def __init__(self, width: int = 48, in_channels: int = 2, tta: str = "none") -> None:
        super().__init__()
        if tta not in VIEWS:
            raise ValueError(f"tta must be one of {', '.join(VIEWS)}, not {tta!r}")
        self.in_channels = in_channels
        self.tta = tta  # test-time views (VIEWS); training always sees the picture as it is
        w0, w1, w2 = width // 2, width, width * 2
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 6, stride=4, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.down = _sep(w0, w1, stride=2)  # to the macroblock grid
        self.s2 = nn.Sequential(*(_Res(w1) for _ in range(4)))
        self.s3 = nn.Sequential(_sep(w1, w2, stride=2), *(_Res(w2) for _ in range(3)))  # context, 32x32 pixels
        self.head = nn.Sequential(nn.Conv2d(w1 + w2, w1, 1), nn.ReLU(inplace=True), nn.Conv2d(w1, 1, 1))

    def forward(self, plane: torch.Tensor) -> torch.Tensor:
        """plane: (N, C, H, W) uint8/float analysis planes, C = in_channels: the picture and (with 2) the picture
        shown before it; (N, H, W) for one channel. H and W multiples of 8 ideally.
        Returns block logits (N, ceil(H/8), ceil(W/8)): one per macroblock of the native picture."""
        x = plane if plane.dim() == 4 else plane.unsqueeze(1)
        h, w = x.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        x = x.to(self.stem[0].weight.dtype)
        if self.in_channels == 2:
            # The picture, and what changed since the one before: concealment shows as a change that follows
            # the block grid where the picture around it did not move that way.
            x = torch.cat([(x[:, :1] - 128.0) / 64.0, (x[:, :1] - x[:, 1:2]) / 32.0], 1)
        else:
            x = (x - 128.0) / 64.0
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        turns = VIEWS[self.tta] if not self.training else ()
        if turns:  # one batch for every view: one pass of the model over the weights
            n = x.shape[0]
            y = self._logits(torch.cat([x, *(x.flip(d) for d in turns)]))
            y = (y[:n] + sum(y[(i + 1) * n: (i + 2) * n].flip(d) for i, d in enumerate(turns))) / (len(turns) + 1)
        else:
            y = self._logits(x)
        return y[:, : math.ceil(h / 8), : math.ceil(w / 8)]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        mb = self.s2(self.down(self.stem(x)))
        ctx = self.s3(mb)
        ctx = F.interpolate(ctx, size=mb.shape[-2:], mode="nearest")
        return self.head(torch.cat([mb, ctx], 1))[:, 0]


def parameters_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widen(model: CorruptionNet, width: int, noise: float = 0.01, seed: int = 0) -> CorruptionNet:
    """A copy of `model` at a larger `width` that computes the same function (Net2WiderNet): each new channel
    copies an existing one of the same layer, and the layers reading a copied channel split its weight among the
    copies. Fine-tuning then starts from what the model knows, with room to learn more: a wider model from scratch
    would spend its training re-learning the narrow one (measured: the training split's own pictures are only
    0.84 F1 for the shipped width, so the model underfits). `noise` (relative to each weight tensor's spread) is
    added to the copies' incoming weights, or the copies would stay identical under training."""
    old_w = model.down[2].out_channels
    if width < old_w:
        raise ValueError(f"width must be at least the model's {old_w}, not {width}")
    new = CorruptionNet(width=width, in_channels=model.in_channels, tta=model.tta)
    if width == old_w:
        new.load_state_dict(model.state_dict())
        return new
    gen = torch.Generator().manual_seed(seed)
    src, dst = dict(model.named_modules()), dict(new.named_modules())

    def mapping(n_old: int, n_new: int) -> torch.Tensor:
        extra = torch.randint(0, n_old, (n_new - n_old,), generator=gen)
        return torch.cat([torch.arange(n_old), extra])

    def counts(g: torch.Tensor) -> torch.Tensor:  # how many copies each new channel's original has
        return torch.bincount(g, minlength=int(g.max()) + 1)[g].float()

    @torch.no_grad()
    def norm(bn: str, g: torch.Tensor | None) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(src[bn], k)
            getattr(dst[bn], k).copy_(v if g is None else v[g])

    @torch.no_grad()
    def dense(name: str, go: torch.Tensor | None, *inputs: tuple[torch.Tensor, int, int], bn: str | None = None) -> None:
        """A full convolution to output channels mapped by go (None: not widened) from input channels mapped by
        `inputs`: (mapping, old offset, new offset) per part of a concatenated input (none: not widened)."""
        a, b = src[name], dst[name]
        w = a.weight if go is None else a.weight[go]
        out = w.clone() if not inputs else torch.zeros_like(b.weight)
        for g, off_old, off_new in inputs:
            out[:, off_new: off_new + len(g)] = w[:, off_old + g] / counts(g).view(1, -1, *([1] * (w.dim() - 2)))
        if go is not None and noise > 0:
            fresh = slice(a.weight.shape[0], None)  # the copies; the originals stay as they were
            out[fresh] += noise * float(a.weight.std()) * torch.randn(out[fresh].shape, generator=gen)
        b.weight.copy_(out)
        if a.bias is not None:
            b.bias.copy_(a.bias if go is None else a.bias[go])
        if bn is not None:
            norm(bn, go)

    @torch.no_grad()
    def depthwise(name: str, g: torch.Tensor, bn: str) -> None:
        dst[name].weight.copy_(src[name].weight[g])
        norm(bn, g)

    o0, o1, o2 = model.stem[0].out_channels, old_w, old_w * 2
    n0, n1, n2 = width // 2, width, width * 2
    g0, g1, g2 = mapping(o0, n0), mapping(o1, n1), mapping(o2, n2)  # stem out, macroblock stream, context stream
    dense("stem.0", g0, bn="stem.1")
    depthwise("down.0", g0, "down.1")
    dense("down.2", g1, (g0, 0, 0), bn="down.3")
    def residuals(stage: str, start: int, g: torch.Tensor, o: int, n: int) -> None:
        for i in range(start, len(getattr(model, stage))):
            ge = mapping(o * 2, n * 2)  # the block's own expansion
            p = f"{stage}.{i}.body."
            dense(p + "0", ge, (g, 0, 0), bn=p + "1")
            depthwise(p + "3", ge, p + "4")
            dense(p + "6", g, (ge, 0, 0), bn=p + "7")

    residuals("s2", 0, g1, o1, n1)
    depthwise("s3.0.0", g1, "s3.0.1")
    dense("s3.0.2", g2, (g1, 0, 0), bn="s3.0.3")
    residuals("s3", 1, g2, o2, n2)
    gh = mapping(o1, n1)
    dense("head.0", gh, (g1, 0, 0), (g2, o1, n1))
    dense("head.2", None, (gh, 0, 0))
    return new
