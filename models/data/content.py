"""Clean source clips: generated moving content with natural texture, and the real Debian sample clips.

Generated content is what makes the data set large and seeded; the real clips are what keeps the model honest
on pictures nobody here drew. Both come out as lists of (H, W, 3) uint8 RGB frames at an even size.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def samples_dir() -> Path:
    home = os.environ.get("HOME", "/tmp")
    return Path(os.environ.get("FRAMEWATCH_SAMPLES", f"{home}/.cache/framewatch/samples"))


class SourceError(ValueError):
    """A source file that is there but cannot be read as what its kind says (a damaged clip, not a picture)."""


@dataclass(frozen=True)
class SourceSpec:
    """One clean clip. `kind` is "generated" (seeded synthetic content), "sample" (a clip in the samples cache,
    named by `name`) or "photo" (a camera moving over a real photograph in the samples cache's photos/, named
    by `name`: photo_frames). `split` is train / val / test: data are split by source clip, never by frame."""

    name: str
    kind: str
    split: str
    seed: int = 0
    width: int = 1280
    height: int = 720
    seconds: float = 8.0
    fps: int = 25
    style: str = "mixed"  # generated content: "mixed" (textured scene) or "facade" (lit buildings at night)


def _in_float64(make):
    """Runs a content maker with float64 as torch's default dtype. In float32 other CPUs round otherwise (torch's
    randn, sin, exp, convolution and interpolation vectorise per instruction set: 708 pixels of 30 frames came
    out one level apart between its AVX2 and its portable code), and one level moved changes the encode; in
    float64 a difference reaching half a level is vanishingly rare, so every CPU makes the same frames."""

    @functools.wraps(make)
    def run(spec: SourceSpec) -> list[np.ndarray]:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return make(spec)
        finally:
            torch.set_default_dtype(prev)

    return run


def _fractal(gen: torch.Generator, h: int, w: int, octaves: int = 6, beta: float = 1.0) -> torch.Tensor:
    """1/f-like noise: random grids at doubling sizes, bicubically upsampled and summed with falling weights.
    Natural pictures have about this spectrum, so the encoder spends its bits the way it does on real video."""
    out = torch.zeros(1, 1, h, w)
    for o in range(octaves):
        gh, gw = max(2, h >> (octaves - o)), max(2, w >> (octaves - o))
        g = torch.randn(1, 1, gh, gw, generator=gen)
        out += F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False) * (0.5 ** (o * beta))
    out -= out.mean()
    return out[0, 0] / (out.std() + 1e-6)


def _canvas(gen: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A large RGB picture (3, h, w) in 0..1: textured background, soft colour regions, hard-edged shapes
    with their own texture, and fine stripes (the kind of detail blocking breaks visibly)."""
    base = _fractal(gen, h, w)
    hue = torch.stack([_fractal(gen, h, w, octaves=4, beta=1.4) for _ in range(3)])
    img = 0.5 + 0.16 * base + 0.10 * hue
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.get_default_dtype()), torch.arange(w, dtype=torch.get_default_dtype()), indexing="ij")
    for _ in range(int(torch.randint(12, 24, (1,), generator=gen))):
        cy, cx = float(torch.rand(1, generator=gen)) * h, float(torch.rand(1, generator=gen)) * w
        ry, rx = (8 + float(torch.rand(1, generator=gen)) * h * 0.12), (8 + float(torch.rand(1, generator=gen)) * w * 0.12)
        colour = torch.rand(3, 1, 1, generator=gen)
        if float(torch.rand(1, generator=gen)) < 0.5:
            mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
        else:
            mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
        tex = 0.08 * _fractal(gen, h, w, octaves=5, beta=0.7)
        img = torch.where(mask, colour + tex, img)
    period = 3 + float(torch.rand(1, generator=gen)) * 6
    band = (yy > h * 0.8) & (yy < h * 0.85)
    stripes = 0.5 + 0.35 * torch.sin(xx * (2 * math.pi / period))
    img = torch.where(band, stripes, img)
    return img.clamp(0, 1)


def _man_made(gen: torch.Generator, img: torch.Tensor) -> torch.Tensor:
    """Sharp structure drawn at full resolution on an RGB (3, h, w) picture."""
    h, w = img.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.get_default_dtype()), torch.arange(w, dtype=torch.get_default_dtype()), indexing="ij")
    # Regular man-made structure (facades, tiles, text, fences): grids of every period and phase, so that a
    # grid is not evidence of corruption by itself. Real corruption follows the codec's grid; these do not
    # have to, but some do by chance, as in real pictures.
    for _ in range(int(torch.randint(4, 11, (1,), generator=gen))):
        y0, x0 = int(torch.randint(0, max(1, h - 16), (1,), generator=gen)), int(torch.randint(0, max(1, w - 16), (1,), generator=gen))
        gh = int(torch.randint(16, max(17, h // 2), (1,), generator=gen))
        gw = int(torch.randint(16, max(17, w // 3), (1,), generator=gen))
        py, px = (int(torch.randint(3, 26, (1,), generator=gen)) for _ in range(2))
        fy, fx = (0.3 + 0.5 * float(torch.rand(1, generator=gen)) for _ in range(2))
        region = (yy >= y0) & (yy < y0 + gh) & (xx >= x0) & (xx < x0 + gw)
        cells = (((yy - y0) % py) < fy * py) & (((xx - x0) % px) < fx * px)
        lit = torch.rand(h // 10 + 1, w // 10 + 1, generator=gen)
        lit = F.interpolate(lit[None, None], size=(h, w), mode="nearest")[0, 0] > 0.4
        dark, light = float(torch.rand(1, generator=gen)) * 0.4, 0.5 + float(torch.rand(1, generator=gen)) * 0.5
        pattern = torch.where(cells & lit, torch.tensor(light), torch.tensor(dark)) + 0.05 * _fractal(gen, h, w, octaves=4)
        img = torch.where(region, pattern, img)
    # Text-like rows: small dark glyph boxes on a light band (captions, tickers, credits).
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        y0 = int(torch.randint(0, max(1, h - 12), (1,), generator=gen))
        size = int(torch.randint(5, 14, (1,), generator=gen))
        rowmask = (yy >= y0) & (yy < y0 + size + 4)
        glyphs = torch.rand(1, w // size + 1, generator=gen) > 0.35
        g = F.interpolate(glyphs[None, None].float(), size=(1, w), mode="nearest")[0, 0, 0].bool()
        inner = (((xx.long() % size) < size * 0.7) & ((yy - y0 - 2) >= 0) & ((yy - y0 - 2) < size)) & g
        img = torch.where(rowmask, torch.where(inner, torch.tensor(0.1), torch.tensor(0.9)), img)
    return img.clamp(0, 1)


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """A camera's softness: separable Gaussian blur of a (3, h, w) picture."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.get_default_dtype()) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    x = F.pad(img[None], (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k, groups=3)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.transpose(-1, -2), groups=3)[0]


def _facade_canvas(gen: torch.Generator, h: int, w: int) -> torch.Tensor:
    """Lit buildings at night seen from the street (3, h, w) in 0..1: dark sky, towers narrowing upwards, and on
    each a dense regular grid (window cells, mullions, balcony bands) with high contrast. Such facades are grids
    of every period, phase and slant, and some line up with the codec's macroblock grid for a moment as the
    camera moves: the clean pictures that look most like concealed blocks, so the model must see them as clean."""
    rnd = lambda: float(torch.rand(1, generator=gen))  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.get_default_dtype()), torch.arange(w, dtype=torch.get_default_dtype()), indexing="ij")
    sky = torch.tensor([0.08 + 0.1 * rnd(), 0.05 + 0.08 * rnd(), 0.15 + 0.2 * rnd()]).view(3, 1, 1)
    img = sky * (0.6 + 0.4 * yy / h) + 0.03 * _fractal(gen, h, w, octaves=4)
    palette = torch.tensor([[0.55, 1.0, 0.85], [0.9, 0.95, 1.0], [1.0, 0.85, 0.5], [0.4, 0.8, 1.0], [0.75, 1.0, 0.6]])
    for _ in range(int(torch.randint(7, 14, (1,), generator=gen))):
        cx, half = rnd() * w, (0.05 + 0.14 * rnd()) * w
        top = rnd() * 0.55 * h
        narrow = 0.35 * rnd()  # keystone: looking up, a tower narrows towards its top
        lean = (rnd() - 0.5) * 0.3
        centre = cx + lean * (h - yy)
        width = half * (1 - narrow * (h - yy) / h)
        u = (xx - centre) / width  # -1..1 across the facade
        inside = (u.abs() <= 1) & (yy >= top)
        body = torch.tensor([0.04 + 0.2 * rnd() for _ in range(3)]).view(3, 1, 1)
        cols = int(torch.randint(6, 40, (1,), generator=gen))
        pv = 4.0 + 20.0 * rnd()  # row period in pixels
        slant = (rnd() - 0.5) * 0.2
        v = (yy - top) + slant * (xx - centre)
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        if kind == 2:  # balcony bands: curved horizontal stripes
            v = v + pv * 0.8 * torch.sin(u * (1 + 4 * rnd()) + 6.3 * rnd())
        ci = torch.floor((u + 1) * cols / 2)
        ri = torch.floor(v / pv)
        fu, fv = 0.35 + 0.5 * rnd(), 0.3 + 0.55 * rnd()
        if kind == 1:  # curtain wall: thin mullions, whole rows of glass
            fu = 0.8 + 0.15 * rnd()
        if kind == 2:
            fu = 1.0
        cell = ((u + 1) * cols / 2 - ci < fu) & (v / pv - ri < fv)
        table = torch.rand(257, 263, generator=gen)
        r_idx, c_idx = ri.long().remainder(257), ci.long().remainder(263)
        lit_level = table[r_idx, c_idx]
        lit = lit_level < 0.3 + 0.6 * rnd()
        tint = palette[int(torch.randint(0, len(palette), (1,), generator=gen))].view(3, 1, 1)
        glow = (0.35 + 0.65 * (lit_level / 0.9).clamp(0, 1)) * tint
        windows = torch.where(cell & lit, glow, body * 1.6)
        facade = torch.where(cell, windows, body + 0.02 * _fractal(gen, h, w, octaves=3))
        img = torch.where(inside, facade, img)
    return img.clamp(0, 1)


@_in_float64
def generated_frames(spec: SourceSpec) -> list[np.ndarray]:
    """A camera panning and zooming slowly over a textured canvas, with a few sprites moving across it and an
    occasional cut to another part of the canvas: motion of every kind an encoder predicts. The canvas is a
    textured scene with man-made structure (style "mixed") or lit towers at night (style "facade")."""
    if spec.style not in ("mixed", "facade"):
        raise ValueError(f"unknown content style {spec.style!r} (mixed or facade)")
    gen = torch.Generator().manual_seed(spec.seed)
    h, w = spec.height, spec.width
    ch, cw = int(h * 1.8) // 2 * 2, int(w * 1.8) // 2 * 2
    if spec.style == "facade":
        canvas = _blur(_facade_canvas(gen, ch, cw), 0.5 + 0.6 * float(torch.rand(1, generator=gen))).clamp(0, 1)
    else:
        # Build the canvas at a third of its size, then upsample: fractal noise at full size is slow on 2 cores.
        canvas = F.interpolate(_canvas(gen, ch // 3, cw // 3)[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        canvas = (canvas + 0.05 * _fractal(gen, ch, cw, octaves=7, beta=0.5)).clamp(0, 1)
        canvas = _man_made(gen, canvas)
    sprites = []
    for _ in range(3):
        sh, sw = int(h * (0.1 + 0.15 * float(torch.rand(1, generator=gen)))), int(w * (0.08 + 0.12 * float(torch.rand(1, generator=gen))))
        tex = _canvas(gen, sh, sw)
        v = (torch.rand(2, generator=gen) - 0.5) * torch.tensor([h, w]) * 0.02
        p = torch.rand(2, generator=gen) * torch.tensor([h - sh, w - sw])
        sprites.append((tex, p, v))
    n = int(round(spec.seconds * spec.fps))
    vel = (torch.rand(2, generator=gen) - 0.5) * 6.0
    pos = torch.tensor([(ch - h) / 2, (cw - w) / 2])
    cut_every = int(spec.fps * (2.5 + 2 * float(torch.rand(1, generator=gen))))
    frames = []
    for i in range(n):
        if i and i % cut_every == 0:
            pos = torch.rand(2, generator=gen) * torch.tensor([ch - h, cw - w])
            vel = (torch.rand(2, generator=gen) - 0.5) * 6.0
        pos = pos + vel
        for d, lim in ((0, ch - h), (1, cw - w)):
            if not 0 <= pos[d] <= lim:
                vel[d] = -vel[d]
                pos[d] = pos[d].clamp(0, lim - 1e-3)  # the bilinear pan reads one row/column beyond
        # Sub-pixel pan through bilinear sampling of the crop, as a real camera gives.
        y0, x0 = float(pos[0]), float(pos[1])
        iy, ix = int(y0), int(x0)
        fy, fx = y0 - iy, x0 - ix
        crop = canvas[:, iy:iy + h + 1, ix:ix + w + 1]
        frame = ((1 - fy) * (1 - fx) * crop[:, :h, :w] + (1 - fy) * fx * crop[:, :h, 1:w + 1]
                 + fy * (1 - fx) * crop[:, 1:h + 1, :w] + fy * fx * crop[:, 1:h + 1, 1:w + 1])
        frame = frame.clone()
        for tex, p, v in sprites:
            q = p + v * i
            sh, sw = tex.shape[-2:]
            qy = int(abs(((float(q[0]) % (2 * (h - sh))) + 2 * (h - sh)) % (2 * (h - sh)) - (h - sh)))
            qx = int(abs(((float(q[1]) % (2 * (w - sw))) + 2 * (w - sw)) % (2 * (w - sw)) - (w - sw)))
            frame[:, qy:qy + sh, qx:qx + sw] = tex
        frames.append((frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return frames


def sample_frames(spec: SourceSpec) -> list[np.ndarray]:
    """Decoded frames of a real sample clip (cropped to even size), at most `seconds` long."""
    import av

    from models.data.codec import i420_to_rgb

    path = samples_dir() / spec.name
    if not path.is_file():
        raise FileNotFoundError(f"sample clip {path} not found: run tests/fetch_samples.sh (make samples) first")
    frames = []
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            # The C IDCT, not whichever SIMD one this CPU gets: the data set is the same bytes on every machine.
            s.codec_context.options = {"idct": "simple"}
            limit = int(spec.seconds * float(s.average_rate or spec.fps))
            for f in c.decode(s):
                h, w = f.height // 16 * 16, f.width // 16 * 16
                if f.format.name in ("yuv420p", "yuvj420p"):
                    # In integers (codec.i420_to_rgb), not through swscale (see codec.rgb_to_i420).
                    y, u, v = (np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in f.planes[:3])
                    rgb = i420_to_rgb(y[:h, :w], u[: h // 2, : w // 2], v[: h // 2, : w // 2])
                else:  # an RGB codec (Cinepak) converts nothing here
                    rgb = f.to_ndarray(format="rgb24")[:h, :w]
                frames.append(np.ascontiguousarray(rgb))
                if len(frames) >= limit:
                    break
    except (av.error.FFmpegError, IndexError) as exc:
        raise SourceError(f"sample clip {path} cannot be decoded: {exc}") from None
    if not frames:
        raise SourceError(f"sample clip {path} holds no picture")
    return frames


@_in_float64
def photo_frames(spec: SourceSpec) -> list[np.ndarray]:
    """A camera panning and zooming slowly over a real photograph (Debian's opencv-doc sample pictures, placed
    in the samples cache's photos/ by tests/fetch_samples.sh), with a little sensor noise: real textures,
    real edges and real JPEG history at every phase of the codec grid, in motion an encoder predicts. A
    photograph smaller than the frame plus a margin to move in is enlarged, as SD material is upconverted.
    Seeded by `spec.seed`."""
    from PIL import Image

    path = samples_dir() / "photos" / spec.name
    if not path.is_file():
        raise FileNotFoundError(f"sample photo {path} not found: run tests/fetch_samples.sh (make samples) first")
    try:
        with Image.open(path) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64).copy()).permute(2, 0, 1) / 255.0
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise SourceError(f"sample photo {path} is not a readable picture: {exc}") from None
    gen = torch.Generator().manual_seed(spec.seed)
    h, w = spec.height, spec.width
    ih, iw = img.shape[-2:]
    scale = max(1.0, 1.3 * h / ih, 1.3 * w / iw)
    if scale > 1.0:
        img = F.interpolate(img[None], scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    ih, iw = img.shape[-2:]
    n = int(round(spec.seconds * spec.fps))
    r = torch.rand(5, generator=gen)
    zoom = 1.0 + 0.12 * (float(r[0]) - 0.5)  # in or out by up to 6 % over the clip
    canvas = torch.tensor([ih, iw], dtype=torch.get_default_dtype())
    # The window (canvas pixels) moves between two random places the margin allows, its size shrinking or
    # growing with the zoom; the largest window it takes must fit.
    biggest = torch.tensor([h, w], dtype=torch.get_default_dtype()) * max(1.0, 1.0 / zoom)
    room = (canvas - biggest).clamp(min=0)
    start, end = r[1:3] * room, r[3:5] * room
    frames = []
    for i in range(n):
        t = i / max(1, n - 1)
        size = torch.tensor([h, w], dtype=torch.get_default_dtype()) / (1.0 + (zoom - 1.0) * t)
        centre = start + (end - start) * t + biggest / 2
        cy, cx = (centre / canvas * 2 - 1).tolist()  # affine_grid's [-1, 1] coordinates of the canvas
        sy, sx = (size / canvas).tolist()
        theta = torch.tensor([[[sx, 0.0, cx], [0.0, sy, cy]]])
        grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
        frame = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        frame = (frame + torch.randn(frame.shape, generator=gen) * (1.2 / 255.0)).clamp(0, 1)
        frames.append((frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return frames


def source_frames(spec: SourceSpec) -> list[np.ndarray]:
    if spec.kind == "generated":
        return generated_frames(spec)
    if spec.kind == "photo":
        return photo_frames(spec)
    return sample_frames(spec)
