"""Video kernels against naive references: black fraction, frame differences, blockiness and blur."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.sources.synthetic import Generator, parse_spec
from kernels import difference as kd
from kernels import luma as kl
from kernels import spatial as ks
from kernels.masks import region_mask


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _dark_frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Frames with many pixels right around both black thresholds (25 full range, 37 limited) and some bright
    ones (>= 128, where the packed comparison must not be fooled by the high bit)."""
    r = _rng(seed)
    near = r.choice(np.array([0, 16, 24, 25, 26, 36, 37, 38, 60, 126, 127, 128, 129, 200, 255], dtype=np.uint8), size=(n, h, w))
    # Per frame, a different share of dark pixels, so fractions differ between frames of a batch.
    for i in range(n):
        near[i][r.random((h, w)) < i / max(1, n)] = 16
    return torch.from_numpy(near)


def _naive_black(luma: torch.Tensor, th: int, mask: torch.Tensor | None) -> np.ndarray:
    hit = (luma <= th).float()
    if mask is None:
        return hit.flatten(1).mean(-1).numpy()
    m = mask.expand_as(luma).float()
    return ((hit * m).flatten(1).sum(-1) / m.flatten(1).sum(-1)).numpy()


# ------------------------------------------------------------------------------------------- black fraction
def test_black_pixel_thresholds_are_ffmpegs_integers() -> None:
    assert kl.black_pixel_threshold(0.10, full_range=False) == 37  # int(16 + 0.1 * 219) = int(37.9)
    assert kl.black_pixel_threshold(0.10, full_range=True) == 25  # int(0.1 * 255) = int(25.5)
    assert kl.black_pixel_threshold(0.0, full_range=False) == 16
    assert kl.black_pixel_threshold(1.0, full_range=True) == 255


@pytest.mark.parametrize("shape", [(4, 360, 640), (3, 240, 320), (5, 37, 53), (2, 7, 9), (1, 1, 8), (3, 45, 81)])
@pytest.mark.parametrize("full_range", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_black_fraction_matches_naive(shape: tuple[int, int, int], full_range: bool, masked: bool) -> None:
    n, h, w = shape
    luma = _dark_frames(n, h, w, seed=h * w)
    th = kl.black_pixel_threshold(0.10, full_range)
    mask = None
    if masked:
        mask = torch.from_numpy(_rng(h + w).random((h, w)) < 0.7)
        mask[0, 0] = True  # at least one analysed pixel
    got = kl.black_fraction(luma.contiguous(), th, mask)
    assert got.dtype == torch.float32 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), _naive_black(luma, th, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("th", [0, 16, 25, 37, 126, 127, 128, 200, 254, 255])
def test_black_fraction_every_threshold_and_a_per_frame_mask(th: int) -> None:
    luma = torch.from_numpy(_rng(th).integers(0, 256, (3, 64, 96), dtype=np.uint8))
    mask = torch.from_numpy(_rng(th + 1).random((3, 64, 96)) < 0.5)
    np.testing.assert_allclose(kl.black_fraction(luma, th).numpy(), _naive_black(luma, th, None), atol=1e-6)
    np.testing.assert_allclose(kl.black_fraction(luma, th, mask).numpy(), _naive_black(luma, th, mask), atol=1e-6)


def test_black_fraction_on_a_non_contiguous_view() -> None:
    base = _dark_frames(2, 100, 130)
    view = base[:, 10:90, 5:125]  # not contiguous
    np.testing.assert_allclose(kl.black_fraction(view, 37).numpy(), _naive_black(view, 37, None), atol=1e-6)


def test_black_fraction_mask_makes_an_ignored_logo_irrelevant() -> None:
    h, w = 360, 640
    luma = torch.full((1, h, w), 16, dtype=torch.uint8)
    luma[0, 0:54, 512:640] = 220  # bright logo, 3 % of the picture
    full = float(kl.black_fraction(luma, 37)[0])
    assert full == pytest.approx(1 - 54 * 128 / (h * w), abs=1e-6) and full < 0.98
    mask = region_mask(h, w, [_Rect(0.8, 0.0, 0.2, 0.15)])
    assert float(kl.black_fraction(luma, 37, mask)[0]) == 1.0


class _Rect:
    def __init__(self, x: float, y: float, w: float, h: float) -> None:
        self.x, self.y, self.w, self.h = x, y, w, h


# ------------------------------------------------------------------------------------------- differences
def _pair(n: int = 6, h: int = 45, w: int = 80, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    r = _rng(seed)
    a = r.integers(0, 256, (n, h, w), dtype=np.uint8)
    b = np.clip(a.astype(int) + r.integers(-12, 13, (n, h, w)), 0, 255).astype(np.uint8)
    b[0] = a[0]  # identical pair
    b[1] = 255 - a[1]  # large difference (no uint8 wrap allowed)
    return torch.from_numpy(a), torch.from_numpy(b)


def _naive_mafd(a: np.ndarray, b: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64)).astype(np.float64)
    if m is None:
        return d.reshape(d.shape[0], -1).mean(-1)
    m = np.broadcast_to(m, d.shape)
    return (d * m).reshape(d.shape[0], -1).sum(-1) / m.reshape(d.shape[0], -1).sum(-1)


@pytest.mark.parametrize("masked", [False, True])
def test_mafd_matches_numpy(masked: bool) -> None:
    a, b = _pair()
    m = torch.from_numpy(_rng(9).random(a.shape[1:]) < 0.4) if masked else None
    ref = _naive_mafd(a.numpy(), b.numpy(), None if m is None else m.numpy())
    np.testing.assert_allclose(kd.mafd(a, b, m).numpy(), ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(kd.mafd(b, a, m).numpy(), ref, rtol=1e-6, atol=1e-5)  # symmetric
    assert float(kd.mafd(a, b, m)[0]) == 0.0


def test_mafd_broadcasts_one_anchor() -> None:
    a, _ = _pair()
    anchor = a[2:3]
    ref = _naive_mafd(a.numpy(), anchor.numpy(), None)
    np.testing.assert_allclose(kd.mafd(a, anchor).numpy(), ref, rtol=1e-6, atol=1e-5)
    assert float(kd.mafd(a, anchor)[2]) == 0.0


@pytest.mark.parametrize("level", [0, 6, 12, 254])
@pytest.mark.parametrize("masked", [False, True])
def test_changed_fraction_matches_numpy(level: int, masked: bool) -> None:
    a, b = _pair(seed=level)
    m = torch.from_numpy(_rng(level + 1).random(a.shape[1:]) < 0.6) if masked else None
    d = np.abs(a.numpy().astype(int) - b.numpy().astype(int)) > level
    if m is None:
        ref = d.reshape(d.shape[0], -1).mean(-1)
    else:
        mm = np.broadcast_to(m.numpy(), d.shape)
        ref = (d & mm).reshape(d.shape[0], -1).sum(-1) / mm.reshape(d.shape[0], -1).sum(-1)
    np.testing.assert_allclose(kd.changed_fraction(a, b, level, m).numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_glitch_scores_match_numpy(masked: bool) -> None:
    r = _rng(5)
    t, h, w = 9, 36, 64
    base = r.integers(40, 200, (h, w))
    seq = np.stack([np.clip(base + 2 * k + r.integers(-3, 4, (h, w)), 0, 255) for k in range(t)]).astype(np.uint8)
    seq[4] = r.integers(0, 256, (h, w))  # a garbage frame between two agreeing neighbours
    seq[7:] = np.clip(seq[7:].astype(int) + 90, 0, 255)  # a cut: one large step, not a glitch
    m = torch.from_numpy(r.random((h, w)) < 0.5) if masked else None
    mn = None if m is None else m.numpy()
    score, jump = kd.glitch_scores(torch.from_numpy(seq), m)
    d_pc = _naive_mafd(seq[:-2], seq[1:-1], mn)
    d_cn = _naive_mafd(seq[1:-1], seq[2:], mn)
    d_pn = _naive_mafd(seq[:-2], seq[2:], mn)
    np.testing.assert_allclose(jump.numpy(), np.minimum(d_pc, d_cn), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(score.numpy(), np.minimum(d_pc, d_cn) - d_pn, rtol=1e-6, atol=1e-4)
    # the garbage frame (index 4 -> interior position 3) stands out; the cut (6 -> 7) does not
    assert int(np.argmax(score.numpy())) == 3
    assert score[3] > 30 and jump[3] > 30
    assert score[5] < 5 and score[6] < 5


def test_activity_matches_numpy() -> None:
    a, _ = _pair()
    d = np.abs(np.diff(a.numpy().astype(int), axis=-1))
    np.testing.assert_allclose(kd.activity(a).numpy(), d.reshape(d.shape[0], -1).mean(-1), rtol=1e-6)


# ------------------------------------------------------------------------------------------- spatial
@functools.cache
def _canvas(seed: int) -> torch.Tensor:
    return Generator(parse_spec(f"synthetic://k?size=640x360&seed={seed}")).canvas


def _natural(h: int = 360, w: int = 640, seed: int = 1) -> torch.Tensor:
    """Natural-like content: the synthetic canvas (soft shapes, fine texture, hard-edged discs)."""
    return _canvas(seed)[:h, :w].clone()


def _pixelate(y: torch.Tensor, b: int) -> torch.Tensor:
    h, w = y.shape
    p = F.avg_pool2d(y[None, None].float(), b)[0, 0].round().to(torch.uint8)
    out = p.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return F.pad(out[None].float(), (0, w - out.shape[1], 0, h - out.shape[0]), mode="replicate")[0].to(torch.uint8)


def _gauss(y: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    k = torch.exp(-((torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2) / 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    z = y[None, None].float()
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k)
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))
    return z[0, 0].round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blockiness_about_one_on_natural_texture(seed: int) -> None:
    y = _natural(seed=seed)
    st = ks.spatial_stats(y[None], stride=8)
    assert 0.8 < float(st.blockiness[0]) < 1.5


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("seed", [1, 2])
def test_blockiness_high_on_pixelated_content(block: int, seed: int) -> None:
    y = _pixelate(_natural(seed=seed), block)
    st = ks.spatial_stats(y[None], stride=8)
    assert float(st.blockiness[0]) >= 2.5


def test_blockiness_of_a_shifted_grid_is_not_blocky() -> None:
    # 8x8 blocks that do not sit on the coding grid (shifted by 4 px) are edges, not a block grid at 8k+7|8k+8.
    y = _pixelate(_natural(), 8)
    shifted = torch.roll(y, shifts=4, dims=1)
    assert float(ks.spatial_stats(shifted[None], stride=8).blockiness[0]) < 1.5


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blur_low_on_sharp_texture_high_after_gaussian(seed: int) -> None:
    y = _natural(seed=seed)
    sharp = float(ks.spatial_stats(y[None], stride=8).blur[0])
    blurred = float(ks.spatial_stats(_gauss(y, 3.0)[None], stride=8).blur[0])
    assert sharp < 0.5
    assert blurred >= 0.8


def test_blur_is_nan_on_a_flat_picture_and_batches_are_per_frame() -> None:
    y = _natural()
    batch = torch.stack([y, torch.full_like(y, 16), _gauss(y, 3.0), torch.full_like(y, 128)])
    st = ks.spatial_stats(batch, stride=8)
    assert st.blur.shape == st.blockiness.shape == st.activity.shape == (4,)
    assert torch.isnan(st.blur[1]) and torch.isnan(st.blur[3])
    assert not torch.isnan(st.blur[0]) and not torch.isnan(st.blur[2])
    # each frame scores as it does alone
    for i in (0, 2):
        alone = ks.spatial_stats(batch[i : i + 1], stride=8)
        assert float(st.blur[i]) == pytest.approx(float(alone.blur[0]), abs=1e-5)
        assert float(st.blockiness[i]) == pytest.approx(float(alone.blockiness[0]), abs=1e-5)
    # flat pictures: blockiness exactly 1 (floor / floor)
    assert float(st.blockiness[1]) == pytest.approx(1.0) and float(st.blockiness[3]) == pytest.approx(1.0)


def test_spatial_mask_leaves_out_an_ignored_region() -> None:
    y = _natural()
    mixed = y.clone()
    mixed[:, 320:] = _pixelate(y, 16)[:, 320:]  # right half pixelated
    mask = torch.ones(360, 640, dtype=torch.bool)
    mask[:, 320:] = False
    whole = float(ks.spatial_stats(mixed[None], stride=8).blockiness[0])
    left = float(ks.spatial_stats(mixed[None], stride=8, mask=mask).blockiness[0])
    alone = float(ks.spatial_stats(y[None, :, :320].contiguous(), stride=8).blockiness[0])
    assert whole >= 1.8
    assert left == pytest.approx(alone, abs=0.05)


# ------------------------------------------------------------------------------------------- CPU vs CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_kernels_cpu_and_cuda_agree() -> None:
    dev = torch.device("cuda")
    luma = _dark_frames(4, 360, 640)
    mask = torch.from_numpy(_rng(2).random((360, 640)) < 0.7)
    for th in (25, 37, 200):
        for m in (None, mask):
            cpu = kl.black_fraction(luma, th, m)
            gpu = kl.black_fraction(luma.to(dev), th, None if m is None else m.to(dev)).cpu()
            torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(kl.luma_mean(luma.to(dev)).cpu(), kl.luma_mean(luma), rtol=0, atol=1e-4)
    a, b = _pair(n=5, h=180, w=320)
    sm = torch.from_numpy(_rng(4).random((180, 320)) < 0.8)
    for m in (None, sm):
        mg = None if m is None else m.to(dev)
        torch.testing.assert_close(kd.mafd(a.to(dev), b.to(dev), mg).cpu(), kd.mafd(a, b, m), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            kd.changed_fraction(a.to(dev), b.to(dev), 6, mg).cpu(), kd.changed_fraction(a, b, 6, m), rtol=0, atol=1e-4
        )
        s_c, j_c = kd.glitch_scores(a, m)
        s_g, j_g = kd.glitch_scores(a.to(dev), mg)
        torch.testing.assert_close(s_g.cpu(), s_c, rtol=0, atol=1e-4)
        torch.testing.assert_close(j_g.cpu(), j_c, rtol=0, atol=1e-4)
    torch.testing.assert_close(kd.activity(a.to(dev)).cpu(), kd.activity(a), rtol=0, atol=1e-4)
    frames = torch.stack([_natural(), _pixelate(_natural(), 8), _gauss(_natural(), 3.0), torch.full((360, 640), 16, dtype=torch.uint8)])
    smask = torch.ones(360, 640, dtype=torch.bool)
    smask[:40, 500:] = False
    for m in (None, smask):
        c = ks.spatial_stats(frames, stride=8, mask=m)
        g = ks.spatial_stats(frames.to(dev), stride=8, mask=None if m is None else m.to(dev))
        for name in ("blockiness", "blur", "activity"):
            torch.testing.assert_close(getattr(g, name).cpu(), getattr(c, name), rtol=1e-4, atol=1e-4, equal_nan=True)
