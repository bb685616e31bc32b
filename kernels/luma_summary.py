"""Everything the detectors need from a full-size luma plane, taken in one read while the frame is fresh.

A decoded 1080p plane is 2 MB; keeping it in a stream's queue until the next scoring tick is what made GPU
memory per stream grow with the queue. Instead, right after decoding, each plane is reduced to:

- the small plane (area average to SMALL_H x SMALL_W), for differences, freeze, glitch and thumbnails;
- a 256-bin histogram, which gives the black fraction exactly for any pixel threshold;
- every `row_stride`-th row, which is what the blockiness/blur kernel reads anyway.

`luma_summary` is the torch reference (any device). On CUDA, `luma_summary_fused` computes the small plane
and the histogram in a single pass over the plane with one CuPy kernel (shared-memory histogram per block),
which avoids the float copy of the whole batch that the torch pooling makes; tests check that they agree.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine.media import SMALL_H, SMALL_W

log = logging.getLogger(__name__)

ROWS = 54  # the spatial family's default number of analysed rows


def row_stride(height: int, rows: int = ROWS) -> int:
    return max(1, height // rows)


def area_small_torch(luma: torch.Tensor) -> torch.Tensor:
    x = luma.unsqueeze(1).to(torch.float32)
    return F.adaptive_avg_pool2d(x, (SMALL_H, SMALL_W)).squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


def histogram_torch(luma: torch.Tensor) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 256) int32 counts."""
    n = luma.shape[0]
    out = torch.empty((n, 256), dtype=torch.int32, device=luma.device)
    for i in range(n):
        out[i] = torch.bincount(luma[i].reshape(-1), minlength=256).to(torch.int32)
    return out


def luma_summary(luma: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: (small (N, SMALL_H, SMALL_W) uint8, hist (N, 256) int32, rows (N, R, W) uint8)."""
    return area_small_torch(luma), histogram_torch(luma), luma[:, ::stride].contiguous()


_KERNEL = r"""
extern "C" __global__
void luma_small_hist(const unsigned char* __restrict__ src, const long long frame_stride, const int pitch,
                     const int fh, const int fw, const int out_h, const int out_w,
                     unsigned char* __restrict__ small, unsigned int* __restrict__ hist) {
    __shared__ unsigned int bins[256];
    const int f = blockIdx.z;
    const int threads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int i = tid; i < 256; i += threads) bins[i] = 0;
    __syncthreads();
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox < out_w && oy < out_h) {
        const unsigned char* p = src + (long long)f * frame_stride + (long long)oy * fh * pitch + (long long)ox * fw;
        unsigned int sum = 0;
        for (int y = 0; y < fh; ++y) {
            const unsigned char* row = p + (long long)y * pitch;
            for (int x = 0; x < fw; ++x) {
                const unsigned int v = row[x];
                sum += v;
                atomicAdd(&bins[v], 1u);
            }
        }
        const unsigned int n = (unsigned int)(fh * fw);
        // Round half to even, like the torch reference (round() of the float mean).
        unsigned int q = sum / n, r = sum - q * n;
        if (2 * r > n || (2 * r == n && (q & 1u))) q += 1;
        small[((long long)f * out_h + oy) * out_w + ox] = (unsigned char)q;
    }
    __syncthreads();
    for (int i = tid; i < 256; i += threads)
        if (bins[i]) atomicAdd(&hist[f * 256 + i], bins[i]);
}
"""

_compiled = None
_cupy_error: str | None = None


def _kernel():
    global _compiled, _cupy_error
    if _compiled is None and _cupy_error is None:
        try:
            import cupy

            _compiled = cupy.RawKernel(_KERNEL, "luma_small_hist")
        except Exception as exc:  # no CuPy: the torch reference does the work
            _cupy_error = f"{type(exc).__name__}: {exc}"
            log.info("CuPy kernel unavailable, using torch for luma summaries: %s", _cupy_error)
    return _compiled


def fused_available(luma: torch.Tensor) -> bool:
    h, w = luma.shape[-2:]
    return luma.is_cuda and h % SMALL_H == 0 and w % SMALL_W == 0 and _kernel() is not None


def luma_summary_fused(luma: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same results as `luma_summary` for CUDA (N, H, W) uint8 whose size is a whole multiple of the small
    plane (720p, 1080p, 2160p...); one read of each plane for both the small plane and the histogram."""
    import cupy

    luma = luma.contiguous()
    n, h, w = luma.shape
    fh, fw = h // SMALL_H, w // SMALL_W
    small = torch.empty((n, SMALL_H, SMALL_W), dtype=torch.uint8, device=luma.device)
    hist = torch.zeros((n, 256), dtype=torch.int32, device=luma.device)
    block = (32, 8, 1)
    grid = ((SMALL_W + 31) // 32, (SMALL_H + 7) // 8, n)
    stream = torch.cuda.current_stream(luma.device)
    with cupy.cuda.Device(luma.device.index or 0), _external_stream(cupy, stream.cuda_stream):
        src, dst, bins = (cupy.from_dlpack(t) for t in (luma, small, hist))
        _kernel()(grid, block, (src, cupy.int64(h * w), cupy.int32(w), cupy.int32(fh), cupy.int32(fw),
                                cupy.int32(SMALL_H), cupy.int32(SMALL_W), dst, bins))
    return small, hist, luma[:, ::stride].contiguous()


def summarize(luma: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel where it applies, else the reference."""
    if fused_available(luma):
        return luma_summary_fused(luma, stride)
    return luma_summary(luma, stride)



def _external_stream(cupy, handle: int):
    """CuPy's view of torch's current stream. ExternalStream is what ran on the GPU check (CuPy 14 marks it
    deprecated in favour of Stream.from_external, which wants a stream-protocol object, not a handle)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(handle)
