"""Optical flow for FloLPIPS: the estimator protocol and PWC-Net in plain torch.

A flow estimator is any callable ``flow(a, b) -> (N, 2, H, W)`` taking two frame batches
(N, 3, H, W), RGB in [0, 1], and returning the flow from a to b in pixels (channel 0: x, 1: y).
:class:`PWCNet` is one; a RAFT model wrapped to this signature is another.

:class:`PWCNet` is the architecture of sniklaus' pytorch-pwc ("default" weights, file
``network-default.pytorch``), written here without the CUDA/cupy correlation:

- extractor ``netExtractor.net{One,Two,Thr,Fou,Fiv,Six}``: per level, three 3x3 convs (the first
  with stride 2), LeakyReLU(0.1), 16/32/64/96/128/196 channels;
- decoders ``net{Two,...,Six}`` (levels 2..6, coarse to fine): cost volume = LeakyReLU(0.1) of the
  correlation of the two levels' features over displacements -4..4 in y and x (81 channels,
  channel (dy + 4) * 9 + (dx + 4), mean over feature channels, zero padding); below level 6 the
  second image's features are backward-warped by the upsampled flow times 0.625/1.25/2.5/5.0, and
  the volume is concatenated with the first image's features, the upsampled flow (``netUpflow``,
  a 4x4 stride-2 deconv) and upsampled features (``netUpfeat``). Five densely connected 3x3 convs
  (128, 128, 96, 64, 32 channels, each output prepended to its input) and a 3x3 conv to 2 channels;
- refiner ``netRefiner.netMain``: 3x3 convs with dilation 1, 2, 4, 8, 16, 1 (128, 128, 128, 96, 64,
  32 channels) and a final conv to 2, its output added to level 2's flow; the sum x 20.

The original file's keys are spelled ``moduleExtractor.moduleOne.0.weight`` etc.; as sniklaus'
loader does, "module" is replaced by "net" on loading, so both spellings load.

Input handling (spec F.3, upstream FloLPIPS): frames are fed as RGB as given (the network was
trained on BGR; ``channel_order="bgr"`` flips them first), bilinearly resized (align_corners=False)
to multiples of 64, the network's quarter-resolution flow x 20 is resized back to (H, W) and its
x and y components are scaled by W / W' and H / H'.

Weights file: ``pwc-net-default.pytorch`` in ``$OSP_WEIGHTS_DIR`` (else ``~/.cache/osp/weights``),
a copy of sniklaus' http://content.sniklaus.com/github/pytorch-pwc/network-default.pytorch.
Nothing is downloaded.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from .lpips_net import WEIGHTS_ENV, _listing, default_weights_dir, load_weights_file

PathLike = Union[str, os.PathLike]
PWC_FILE = "pwc-net-default.pytorch"
PWC_ORIGIN = "sniklaus' pytorch-pwc network-default.pytorch, " \
             "http://content.sniklaus.com/github/pytorch-pwc/network-default.pytorch"


class FlowEstimator(Protocol):
    """``flow(a, b)``: a, b (N, 3, H, W) RGB in [0, 1] -> flow from a to b (N, 2, H, W) in pixels."""

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...


def correlation(one: torch.Tensor, two: torch.Tensor, max_displacement: int = 4) -> torch.Tensor:
    """PWC-Net's cost volume: out[n, (dy + d) * (2d + 1) + (dx + d), y, x] =
    mean_c one[n, c, y, x] * two[n, c, y + dy, x + dx], with ``two`` zero outside the image.

    one, two: (N, C, H, W) -> (N, (2d + 1)^2, H, W). Shifted products of the padded second map,
    one channel mean per displacement (no custom kernel)."""
    d = max_displacement
    h, w = one.shape[-2:]
    padded = F.pad(two, (d, d, d, d))
    out = [(one * padded[:, :, dy:dy + h, dx:dx + w]).mean(dim=1)
           for dy in range(2 * d + 1) for dx in range(2 * d + 1)]
    return torch.stack(out, dim=1)


def backwarp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """sniklaus' backward warp: sample x (N, C, H, W) at pixel p + flow(p) * W / (W - 1) (x) and
    p + flow(p) * H / (H - 1) (y) (the flow is normalised by (size - 1) / 2 on an align_corners=False
    grid, as in the original), bilinear, zeros outside; output pixels whose sampling footprint is not
    fully inside (the warped ones-channel < 0.999) are set to 0."""
    n, _, h, w = flow.shape
    hor = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=flow.device, dtype=flow.dtype)
    ver = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=flow.device, dtype=flow.dtype)
    grid = torch.stack([hor.view(1, w).expand(h, w), ver.view(h, 1).expand(h, w)], dim=-1)
    offset = torch.stack([flow[:, 0] / ((x.shape[3] - 1.0) / 2.0), flow[:, 1] / ((x.shape[2] - 1.0) / 2.0)], dim=-1)
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], 1), grid.unsqueeze(0) + offset, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    mask = (out[:, -1:] > 0.999).to(x.dtype)
    return out[:, :-1] * mask


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.1)


class _Extractor(nn.Module):
    CHANNELS = (3, 16, 32, 64, 96, 128, 196)
    NAMES = ("netOne", "netTwo", "netThr", "netFou", "netFiv", "netSix")

    def __init__(self):
        super().__init__()
        for name, c_in, c_out in zip(self.NAMES, self.CHANNELS[:-1], self.CHANNELS[1:]):
            setattr(self, name, nn.Sequential(_conv(c_in, c_out, stride=2), _lrelu(), _conv(c_out, c_out), _lrelu(),
                                              _conv(c_out, c_out), _lrelu()))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for name in self.NAMES:
            x = getattr(self, name)(x)
            out.append(x)
        return out


_DENSE = (128, 128, 96, 64, 32)
# decoder input channels per level: cost volume (81) + features + upsampled flow (2) + upsampled feature flow (2)
_CURRENT = {2: 81 + 32 + 4, 3: 81 + 64 + 4, 4: 81 + 96 + 4, 5: 81 + 128 + 4, 6: 81}
_BACKWARP_SCALE = {2: 5.0, 3: 2.5, 4: 1.25, 5: 0.625}


class _Decoder(nn.Module):
    def __init__(self, level: int):
        super().__init__()
        current = _CURRENT[level]
        if level < 6:
            previous = _CURRENT[level + 1] + sum(_DENSE)
            self.netUpflow = nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)
            self.netUpfeat = nn.ConvTranspose2d(previous, 2, 4, stride=2, padding=1)
            self.backwarp_scale = _BACKWARP_SCALE[level]
        c = current
        for name, c_out in zip(("netOne", "netTwo", "netThr", "netFou", "netFiv"), _DENSE):
            setattr(self, name, nn.Sequential(_conv(c, c_out), _lrelu()))
            c += c_out
        self.netSix = nn.Sequential(_conv(c, 2))

    def forward(self, one: torch.Tensor, two: torch.Tensor,
                previous: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if previous is None:
            feat = F.leaky_relu(correlation(one, two), 0.1)
        else:
            flow = self.netUpflow(previous["flow"])
            upfeat = self.netUpfeat(previous["feat"])
            volume = F.leaky_relu(correlation(one, backwarp(two, flow * self.backwarp_scale)), 0.1)
            feat = torch.cat([volume, one, flow, upfeat], 1)
        for name in ("netOne", "netTwo", "netThr", "netFou", "netFiv"):
            feat = torch.cat([getattr(self, name)(feat), feat], 1)
        return {"flow": self.netSix(feat), "feat": feat}


class _Refiner(nn.Module):
    def __init__(self):
        super().__init__()
        chans = (_CURRENT[2] + sum(_DENSE), 128, 128, 128, 96, 64, 32)
        layers: List[nn.Module] = []
        for c_in, c_out, dil in zip(chans[:-1], chans[1:], (1, 2, 4, 8, 16, 1)):
            layers += [_conv(c_in, c_out, dilation=dil), _lrelu()]
        layers.append(_conv(32, 2))
        self.netMain = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netMain(x)


class PWCNet(nn.Module):
    """PWC-Net (sniklaus pytorch-pwc "default") as a :class:`FlowEstimator`.

    ``PWCNet()`` is randomly initialised (PyTorch's default init); ``PWCNet.from_file(path)`` loads
    weights. ``forward(a, b)``: a, b (N, 3, H, W) RGB in [0, 1] -> flow a -> b (N, 2, H, W) in pixels,
    computed in float32 (or the parameters' dtype) and returned in that dtype.
    """

    def __init__(self, channel_order: str = "rgb"):
        super().__init__()
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"PWCNet channel_order={channel_order!r}: expected 'rgb' (frames fed as given, "
                             "as upstream FloLPIPS does) or 'bgr' (flipped to the order the weights were trained on)")
        self.channel_order = channel_order
        self.netExtractor = _Extractor()
        for level, name in zip((2, 3, 4, 5, 6), ("netTwo", "netThr", "netFou", "netFiv", "netSix")):
            setattr(self, name, _Decoder(level))
        self.netRefiner = _Refiner()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: Optional[PathLike] = None, *, channel_order: str = "rgb",
                  map_location: Union[str, torch.device] = "cpu") -> "PWCNet":
        """Load sniklaus' state dict (keys ``module*`` or ``net*``); default
        ``$OSP_WEIGHTS_DIR/pwc-net-default.pytorch``. Missing file: FileNotFoundError saying where to put it."""
        if path is None:
            folder = default_weights_dir()
            path = folder / PWC_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"PWC-Net weights not found: put {PWC_FILE} ({PWC_ORIGIN}) in {folder} (set {WEIGHTS_ENV} to "
                    "use another folder), or pass the file's path; any flow callable (e.g. RAFT) can be used instead")
        model = cls(channel_order=channel_order)
        model.load_pwc_state_dict(load_weights_file(path, "PWC-Net weights"), source=str(path))
        return model.to(map_location)

    @torch.no_grad()
    def load_pwc_state_dict(self, state: Dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load after renaming "module" -> "net"; ValueError naming missing/unexpected/misshapen keys."""
        state = {k.replace("module", "net"): v for k, v in state.items()}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = ([f"missing keys {_listing(missing)}"] if missing else []) + (
                [f"unexpected keys {_listing(unexpected)}"] if unexpected else [])
            raise ValueError(f"PWC-Net weights {source}: " + "; ".join(parts)
                             + " (expected sniklaus pytorch-pwc 'default' keys such as netExtractor.netOne.0.weight)")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"PWC-Net weights {source}: {k} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=True)

    def estimate(self, one: torch.Tensor, two: torch.Tensor) -> torch.Tensor:
        """The network proper: (N, 3, H', W') with H', W' multiples of 64 -> flow (N, 2, H'/4, W'/4),
        already x 20 (in pixels of the H' x W' input)."""
        f1, f2 = self.netExtractor(one), self.netExtractor(two)
        est = None
        for k, name in enumerate(("netSix", "netFiv", "netFou", "netThr", "netTwo")):
            est = getattr(self, name)(f1[-1 - k], f2[-1 - k], est)
        return (est["flow"] + self.netRefiner(est["feat"])) * 20.0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or a.shape[1] != 3 or a.shape != b.shape:
            raise ValueError(f"PWCNet expects two frame batches (N, 3, H, W) of equal shape, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        dtype = self.netRefiner.netMain[0].weight.dtype
        a, b = a.to(dtype), b.to(dtype)
        if self.channel_order == "bgr":
            a, b = a.flip(1), b.flip(1)
        h, w = a.shape[-2:]
        h64, w64 = int(math.ceil(h / 64.0) * 64), int(math.ceil(w / 64.0) * 64)
        a = F.interpolate(a, size=(h64, w64), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(h64, w64), mode="bilinear", align_corners=False)
        flow = F.interpolate(self.estimate(a, b), size=(h, w), mode="bilinear", align_corners=False)
        scale = torch.tensor([w / w64, h / h64], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
        return flow * scale
