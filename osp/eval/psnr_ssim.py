"""PSNR and SSIM of videos as Open-Sora-Plan v1.0 evaluates them (spec F.3), batched over all frames.

Both take two videos ``a``, ``b`` of shape (B, T, C, H, W) with values in [0, 1] (any float dtype, any
device) and return a (B,) tensor: each video's mean over its T frames of the per-frame value.
``psnr_frames`` / ``ssim_frames`` return the per-frame values (B, T).

- PSNR, per frame: mse = mean over C*H*W of (a - b)^2; 20*log10(1/sqrt(mse)); mse < 1e-10 gives 100
  (upstream's cap for identical frames).
- SSIM, per frame and per channel (no grayscale conversion), then the mean over the channels: the
  11x11 Gaussian window w = g g^T (sigma 1.5, normalised), statistics mu = w*x, sigma^2 = w*x^2 - mu^2,
  sigma_ab = w*(ab) - mu_a mu_b over the valid region only (no padding: upstream filters with
  borders and crops 5 pixels on each side, which leaves exactly the valid region), C1 = 0.01^2,
  C2 = 0.03^2, and the mean of the SSIM map.

Upstream loops over frames and channels (cv2.filter2D per statistic). Here every plane of a chunk of
frames is filtered at once: the window is two 1-D passes, each a few matrix products of blocks of input
windows (read in place from the strided input) with a banded matrix, in float64 by default
(``dtype=torch.float32`` is faster and agrees to about 1e-6). The chunks bound the memory
(``chunk_elements``).
"""
from __future__ import annotations

from typing import Optional

import torch

WINDOW = 11
SIGMA = 1.5
C1 = 0.01 ** 2
C2 = 0.03 ** 2
PSNR_CAP = 100.0  # upstream's value for mse < 1e-10
_MSE_EPS = 1e-10
# Outputs per block of the 1-D passes and pixels per chunk of planes: small blocks and chunks that stay
# in cache on a CPU (fewer flops per output: 2 * (block + 10)); large ones on a GPU (fewer launches).
_CPU_BLOCK, _CPU_CHUNK = 32, 1 << 18
_GPU_BLOCK, _GPU_CHUNK = 64, 1 << 23


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """The 1-D Gaussian g (size,) normalised to sum 1 (cv2.getGaussianKernel(size, sigma))."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def check_videos(a: torch.Tensor, b: torch.Tensor, name: str, min_size: int = 1) -> None:
    """ValueError unless a and b are float tensors of one shape (B, T, C, H, W), H and W >= min_size,
    with values in [0, 1]."""
    for label, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: {label} is a {type(x).__name__}; expected a float tensor (B, T, C, H, W)")
        if not x.is_floating_point():
            raise ValueError(f"{name}: {label} has dtype {x.dtype}; expected a float tensor in [0, 1] "
                             "(divide uint8 frames by 255)")
        if x.dim() != 5 or 0 in x.shape:
            raise ValueError(f"{name}: {label} has shape {tuple(x.shape)}; expected (B, T, C, H, W), none of them 0")
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; expected two videos of one shape")
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device}, b on {b.device}; expected one device")
    H, W = a.shape[-2:]
    if H < min_size or W < min_size:
        raise ValueError(f"{name}: frames are {H}x{W}; expected at least {min_size}x{min_size}")
    for label, x in (("a", a), ("b", b)):
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{name}: {label} has values in [{lo:g}, {hi:g}]; expected [0, 1] (no NaN)")


# --- PSNR -------------------------------------------------------------------------------------------------


def psnr_frames(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-frame PSNR (B, T) in ``dtype`` of videos (B, T, C, H, W) in [0, 1]."""
    check_videos(a, b, "psnr")
    B, T = a.shape[:2]
    fa, fb = a.reshape(B * T, -1), b.reshape(B * T, -1)
    per_chunk = max(1, (1 << 20) // fa.shape[1])  # frames per chunk: a few MiB of work tensors
    diff = torch.empty(min(per_chunk, B * T), fa.shape[1], dtype=dtype, device=a.device)
    mse = torch.empty(B * T, dtype=dtype, device=a.device)
    for start in range(0, B * T, per_chunk):
        stop = min(B * T, start + per_chunk)
        d = diff[:stop - start]
        d.copy_(fa[start:stop]).sub_(fb[start:stop])
        mse[start:stop] = torch.linalg.vector_norm(d, dim=1).square_() / d.shape[1]
    mse = mse.view(B, T)
    value = -10.0 * torch.log10(mse.clamp_min(_MSE_EPS))  # = 20*log10(1/sqrt(mse))
    return torch.where(mse < _MSE_EPS, torch.full_like(value, PSNR_CAP), value)


def psnr(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Upstream's PSNR (B,): the mean over frames of 20*log10(1/sqrt(mse)), mse over C*H*W, 100 when
    mse < 1e-10. a, b: (B, T, C, H, W) in [0, 1]."""
    return psnr_frames(a, b, dtype=dtype).mean(dim=1)


# --- SSIM -------------------------------------------------------------------------------------------------


def _band(block: int, g: torch.Tensor) -> torch.Tensor:
    """(block + taps - 1, block) matrix K with K[j + k, j] = g[k]: the valid 1-D correlation of a
    window of block + taps - 1 samples with g, as one matrix product."""
    taps = g.numel()
    K = torch.zeros(block + taps - 1, block, dtype=g.dtype, device=g.device)
    for k, gk in enumerate(g.tolist()):
        K.diagonal(-k).fill_(gk)
    return K


class _Plan:
    """Block layout of the two 1-D passes for frames H x W: outputs in blocks of ``block`` along each
    axis (the input padded with zeros to whole blocks; padded outputs are masked out of the mean)."""

    def __init__(self, H: int, W: int, g: torch.Tensor, block: int):
        taps = g.numel()
        self.out_h, self.out_w = H - taps + 1, W - taps + 1
        self.bh = min(block, self.out_h)
        self.bw = min(block, self.out_w)
        self.nh, self.nw = -(-self.out_h // self.bh), -(-self.out_w // self.bw)
        self.Hp, self.Wp = self.nh * self.bh + taps - 1, self.nw * self.bw + taps - 1
        self.Kw = _band(self.bw, g)                      # (bw + taps - 1, bw)
        self.Kh_t = _band(self.bh, g).t().contiguous()   # (bh, bh + taps - 1)
        self.taps = taps
        rows = torch.arange(self.nh * self.bh, device=g.device).view(self.nh, self.bh) < self.out_h
        cols = torch.arange(self.nw * self.bw, device=g.device).view(self.nw, self.bw) < self.out_w
        # (nw, nh, 1, bh, bw): 1 where the tile's output lies in the valid region
        self.mask = (cols.view(self.nw, 1, 1, 1, self.bw) & rows.view(1, self.nh, 1, self.bh, 1)).to(g.dtype)
        self.padded = (self.Hp, self.Wp) != (H, W)
        self.count = self.out_h * self.out_w


class _Buffers:
    """Work tensors of one chunk of planes, allocated once per call and reused by every chunk (fresh
    allocations of this size cost page faults on every chunk)."""

    def __init__(self, n: int, plan: _Plan, dtype: torch.dtype, device: torch.device):
        p = plan
        self.stats = torch.zeros(n, 4, p.Hp, p.Wp, dtype=dtype, device=device)  # the padding stays 0
        self.y = torch.empty(p.nw, n * 4, p.Hp, p.bw, dtype=dtype, device=device)
        self.z = torch.empty(p.nw, p.nh, n * 4, p.bh, p.bw, dtype=dtype, device=device)
        self.t1 = torch.empty(p.nw, p.nh, n, p.bh, p.bw, dtype=dtype, device=device)
        self.t2 = torch.empty_like(self.t1)
        self.Kh = p.Kh_t.expand(n * 4, p.bh, p.bh + p.taps - 1)


def _ssim_planes(a: torch.Tensor, b: torch.Tensor, plan: _Plan, buf: _Buffers) -> torch.Tensor:
    """SSIM map means (N,) of planes a, b (N, H, W) in the buffers' dtype.

    Four filtered statistics suffice: mu_a, mu_b, w*(a^2 + b^2) (only sigma_a^2 + sigma_b^2 enters) and
    w*(ab). Both 1-D passes are matrix products over blocks of windows taken straight from the strided
    input (BLAS reads a window of rows or columns in place), so nothing is copied between the passes."""
    N, H, W = a.shape
    p = plan
    stats = buf.stats[:N]
    stats[:, 0, :H, :W] = a
    stats[:, 1, :H, :W] = b
    sq_in, ab_in = stats[:, 2, :H, :W], stats[:, 3, :H, :W]
    torch.mul(stats[:, 0, :H, :W], stats[:, 0, :H, :W], out=sq_in)
    sq_in.addcmul_(stats[:, 1, :H, :W], stats[:, 1, :H, :W])
    torch.mul(stats[:, 0, :H, :W], stats[:, 1, :H, :W], out=ab_in)
    # pass along W: y[i] = (rows, bw) outputs of column block i
    rows = stats.view(N * 4 * p.Hp, p.Wp)
    span_w, span_h = p.bw + p.taps - 1, p.bh + p.taps - 1
    for i in range(p.nw):
        torch.mm(rows[:, i * p.bw:i * p.bw + span_w], p.Kw, out=buf.y[i, :N * 4].view(N * 4 * p.Hp, p.bw))
    # pass along H: z[i, j] = (N*4, bh, bw) outputs of tile (row block j, column block i)
    Kh = buf.Kh[:N * 4]
    for i in range(p.nw):
        for j in range(p.nh):
            torch.bmm(Kh, buf.y[i, :N * 4, j * p.bh:j * p.bh + span_h], out=buf.z[i, j, :N * 4])
    z = buf.z[:, :, :N * 4].view(p.nw, p.nh, N, 4, p.bh, p.bw)
    mu_a, mu_b, sq, ab = z.unbind(3)
    mu_ab = torch.mul(mu_a, mu_b, out=buf.t1[:, :, :N])
    mu_sq = torch.mul(mu_a, mu_a, out=buf.t2[:, :, :N]).addcmul_(mu_b, mu_b)
    num = ab.sub_(mu_ab).mul_(2).add_(C2).mul_(mu_ab.mul_(2).add_(C1))
    den = sq.sub_(mu_sq).add_(C2).mul_(mu_sq.add_(C1))
    ratio = num.div_(den)
    if p.padded:
        ratio.mul_(p.mask)
    return ratio.sum(dim=(0, 1, 3, 4)) / p.count


def ssim_frames(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float64,
                chunk_elements: Optional[int] = None) -> torch.Tensor:
    """Per-frame SSIM (B, T) in ``dtype`` of videos (B, T, C, H, W) in [0, 1]: the channel mean of
    the per-channel SSIM. ``chunk_elements``: planes are processed in chunks of about this many pixels
    (default 2^18 on a CPU, 2^23 on a GPU; the work tensors take about 13 times that many elements)."""
    check_videos(a, b, "ssim", min_size=WINDOW)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"ssim: dtype {dtype}; expected torch.float64 or torch.float32")
    B, T, C, H, W = a.shape
    cpu = a.device.type == "cpu"
    plan = _Plan(H, W, gaussian_window(dtype=dtype).to(a.device), _CPU_BLOCK if cpu else _GPU_BLOCK)
    planes_a, planes_b = a.reshape(-1, H, W), b.reshape(-1, H, W)
    n = planes_a.shape[0]
    per_chunk = min(n, max(1, (chunk_elements or (_CPU_CHUNK if cpu else _GPU_CHUNK)) // (H * W)))
    buf = _Buffers(per_chunk, plan, dtype, a.device)
    out = torch.empty(n, dtype=dtype, device=a.device)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        out[start:stop] = _ssim_planes(planes_a[start:stop], planes_b[start:stop], plan, buf)
    return out.view(B, T, C).mean(dim=2)


def ssim(a: torch.Tensor, b: torch.Tensor, *, dtype: torch.dtype = torch.float64,
         chunk_elements: Optional[int] = None) -> torch.Tensor:
    """Upstream's SSIM (B,): per frame the mean over channels of the per-channel SSIM (11x11 Gaussian
    window, sigma 1.5, valid region, C1 = 0.01^2, C2 = 0.03^2), then the mean over frames.
    a, b: (B, T, C, H, W) in [0, 1], H and W >= 11."""
    return ssim_frames(a, b, dtype=dtype, chunk_elements=chunk_elements).mean(dim=1)


__all__ = ["psnr", "ssim", "psnr_frames", "ssim_frames", "gaussian_window", "check_videos"]
