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


class CorruptionNet(nn.Module):
    def __init__(self, width: int = 48, in_channels: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
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
        mb = self.s2(self.down(self.stem(x)))
        ctx = self.s3(mb)
        ctx = F.interpolate(ctx, size=mb.shape[-2:], mode="nearest")
        return self.head(torch.cat([mb, ctx], 1))[:, 0, : math.ceil(h / 8), : math.ceil(w / 8)]


def parameters_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
