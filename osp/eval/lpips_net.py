"""LPIPS v0.1 (Zhang et al. 2018) in plain torch: AlexNet and VGG16 backbones, no torchvision.

Upstream evaluates with ``LPIPS(net="alex", spatial=True)`` and reports the spatial mean
(spec F.3, :func:`lpips`); its VAE training loss is the VGG16 variant, one value per frame
(spec E.2, ``LPIPS(net="vgg")`` on frames in [-1, 1], gradients flowing to the input).

Network, per image pair (N, 3, H, W) in [-1, 1]:
  x -> (x - shift) / scale, shift (-.030, -.088, -.188), scale (.458, .448, .450)
  -> backbone taps (AlexNet: after the 5 ReLUs, features[0:2], [2:5], [5:8], [8:10], [10:12];
     VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = features[0:4], [4:9], [9:16], [16:23], [23:30])
  -> per tap: x / (sqrt(sum_c x^2) + 1e-10), squared difference of the two images,
     1x1 conv to one channel (no bias; dropout in front as upstream, inactive: the module stays in eval)
  -> spatial=False: spatial mean of each map, summed over the 5 layers -> (N, 1, 1, 1);
     spatial=True: each map bilinearly upsampled (align_corners=False) to (H, W), summed -> (N, 1, H, W).

Weights are local files; nothing is downloaded. Default folder: ``$OSP_WEIGHTS_DIR``, else
``~/.cache/osp/weights``, with these file names:

  ``lpips_v0.1_alex.pth``        AlexNet lin weights: the lpips package's ``lpips/weights/v0.1/alex.pth``
  ``alexnet-owt-7be5be79.pth``   AlexNet backbone: torchvision's ImageNet file of that name
                                 (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)
  ``vgg_lpips.pth``              VGG lin weights, looked for first: taming-transformers' ``vgg.pth``
                                 ("vgg_lpips", md5 d507d7349b931f0638a25a48a722f98a), upstream's loss
  ``lpips_v0.1_vgg.pth``         VGG lin weights, else: the lpips package's ``lpips/weights/v0.1/vgg.pth``
  ``vgg16-397923af.pth``         VGG16 backbone: torchvision's ImageNet file of that name
                                 (https://download.pytorch.org/models/vgg16-397923af.pth)

File formats (``torch.load`` state dicts):
  - lin weights (``weights=``): ``lin{0..4}.model.1.weight`` of shape (1, C_l, 1, 1) (lpips v0.1;
    ``lin{k}.model.0.weight`` of a dropout-free save is accepted too). A full LPIPS state dict (the
    lpips package's or taming's LPIPS module) is accepted as well: its backbone keys
    ``net.slice{s}.{n}.weight|bias`` keep torchvision's layer index n, so they map to
    ``features.{n}.weight|bias``; its ``scaling_layer.shift|scale`` buffers are ignored (constants).
    ``LPIPS.state_dict()`` (keys ``net.features.{n}.*``, ``lin{k}.model.1.weight``) loads the same way.
  - backbone (``backbone_weights=``): torchvision's ``features.{n}.weight|bias``; ``classifier.*``
    keys are ignored. When given, it takes precedence over backbone keys inside ``weights``.
Loading is strict: a missing or unexpected backbone or lin key, or a wrong shape, is an error naming it.

``pretrained=False`` gives a random backbone (Kaiming-normal convs, small random biases, from torch's
global RNG) and lin weights of ones (the lpips package's ``lpips=False`` baseline: an unweighted sum
over channels); explicitly given files are still loaded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

PathLike = Union[str, os.PathLike]

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# torchvision `features` layouts: ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool",)
_ALEX_LAYERS = (
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool",),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool",),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
)
_VGG_LAYERS = tuple(
    layer
    for block in ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512), (512, 512, 512, 512))
    for layer in [
        item for c_in, c_out in zip(block[:-1], block[1:]) for item in (("conv", c_in, c_out, 3, 1, 1), ("relu",))
    ] + [("pool",)]
)[:-1]  # the last max-pool follows relu5_3 and is not used

NETS = {
    # name: (layers, tap indices (the ReLU after which each layer's features are taken), channels)
    "alex": (_ALEX_LAYERS, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (_VGG_LAYERS, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}

WEIGHTS_ENV = "OSP_WEIGHTS_DIR"
LIN_FILES = {"alex": ("lpips_v0.1_alex.pth",), "vgg": ("vgg_lpips.pth", "lpips_v0.1_vgg.pth")}
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_ORIGINS = {
    "lpips_v0.1_alex.pth": "the lpips package's lpips/weights/v0.1/alex.pth",
    "vgg_lpips.pth": "taming-transformers' vgg.pth ('vgg_lpips', md5 d507d7349b931f0638a25a48a722f98a)",
    "lpips_v0.1_vgg.pth": "the lpips package's lpips/weights/v0.1/vgg.pth",
    "alexnet-owt-7be5be79.pth": "torchvision's AlexNet ImageNet weights, "
                                "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg16-397923af.pth": "torchvision's VGG16 ImageNet weights, "
                          "https://download.pytorch.org/models/vgg16-397923af.pth",
}


def default_weights_dir() -> Path:
    """The folder local weight files are read from: ``$OSP_WEIGHTS_DIR``, else ``~/.cache/osp/weights``."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osp" / "weights"


def load_weights_file(path: PathLike, what: str) -> Dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from a torch.load file; FileNotFoundError / ValueError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {what} file {path} with torch.load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} file {path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class Backbone(nn.Module):
    """torchvision's ``features`` Sequential of AlexNet or VGG16 (state-dict keys ``features.N.*``),
    returning the 5 LPIPS taps. Stops after the last tap."""

    def __init__(self, net: str):
        super().__init__()
        layers, self.taps, self.channels = NETS[net]
        mods = []
        for spec in layers:
            if spec[0] == "conv":
                _, c_in, c_out, k, s, p = spec
                mods.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
            elif spec[0] == "relu":
                mods.append(nn.ReLU())
            else:
                mods.append(nn.MaxPool2d(kernel_size=2 if net == "vgg" else 3, stride=2))
        self.features = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class _Lin(nn.Module):
    """lpips' NetLinLayer: dropout then a 1x1 conv to one channel without bias (keys ``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_channels(x: torch.Tensor) -> torch.Tensor:
    """x / (sqrt(sum over C of x^2) + 1e-10) on (N, C, h, w)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + EPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between two image batches.

    Args:
        net: "alex" (upstream's metric) or "vgg" (upstream's VAE training loss).
        spatial: forward returns the (N, 1, H, W) map instead of the (N, 1, 1, 1) value.
        pretrained: load the lin and backbone weights (from ``weights`` / ``backbone_weights`` or the
            default folder, see the module docstring); False: random backbone, lin weights of ones.
        weights: lin-weight file (lpips v0.1 format) or a full LPIPS state dict.
        backbone_weights: torchvision backbone file (``features.N.*``).

    The parameters are frozen and the module stays in eval mode (``.train()`` leaves dropout off, as
    upstream's loss does), but gradients flow to the inputs, so it serves as a training loss.
    """

    def __init__(self, net: str = "alex", *, spatial: bool = False, pretrained: bool = True,
                 weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net={net!r}: expected one of {sorted(NETS)}")
        self.net_name = net
        self.spatial = bool(spatial)
        self._scaling: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.net = Backbone(net)
        for k, c in enumerate(self.net.channels):
            setattr(self, f"lin{k}", _Lin(c))
        self._random_init()
        self.load_files(weights=weights, backbone_weights=backbone_weights, defaults=pretrained)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    @property
    def lins(self) -> List[_Lin]:
        return [getattr(self, f"lin{k}") for k in range(len(self.net.channels))]

    def train(self, mode: bool = True) -> "LPIPS":
        """A fixed metric: stays in eval mode (dropout off) whatever ``mode`` says."""
        return super().train(False)

    @torch.no_grad()
    def _random_init(self) -> None:
        for m in self.net.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.normal_(0.0, 0.01)
        for lin in self.lins:
            lin.model[1].weight.fill_(1.0)

    # ---------------------------------------------------------------------------------- loading

    def load_files(self, *, weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
                   defaults: bool = True) -> "LPIPS":
        """Load lin and backbone weights from files; with ``defaults``, parts not given are taken from
        the default folder, and a missing file is a FileNotFoundError saying what to put where."""
        lin_path = Path(weights).expanduser() if weights is not None else None
        bb_path = Path(backbone_weights).expanduser() if backbone_weights is not None else None
        for path, what in ((lin_path, "LPIPS weights"), (bb_path, "LPIPS backbone weights")):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{what} file not found: {path}")
        lin_state = load_weights_file(lin_path, "LPIPS weights") if lin_path is not None else None
        has_backbone = lin_state is not None and any(k.startswith("net.") for k in lin_state)
        if defaults:
            folder = default_weights_dir()
            missing = []
            if lin_path is None:
                found = [folder / n for n in LIN_FILES[self.net_name] if (folder / n).is_file()]
                if found:
                    lin_path = found[0]
                    lin_state = load_weights_file(lin_path, "LPIPS weights")
                    has_backbone = any(k.startswith("net.") for k in lin_state)
                else:
                    missing.append(" or ".join(LIN_FILES[self.net_name]) + " ("
                                   + "; or ".join(_ORIGINS[n] for n in LIN_FILES[self.net_name]) + ")")
            if bb_path is None and not has_backbone:
                name = BACKBONE_FILES[self.net_name]
                if (folder / name).is_file():
                    bb_path = folder / name
                else:
                    missing.append(f"{name} ({_ORIGINS[name]})")
            if missing:
                raise FileNotFoundError(
                    f"LPIPS(net={self.net_name!r}) needs local weight files (nothing is downloaded); missing in "
                    f"{folder}: " + ", ".join(missing) + f". Put them there (set {WEIGHTS_ENV} to use another "
                    "folder), pass weights=/backbone_weights=, or use pretrained=False for random weights.")
        if lin_state is not None:
            self.load_lpips_state_dict(lin_state, source=str(lin_path))
        if bb_path is not None:
            self.load_backbone_state_dict(load_weights_file(bb_path, "LPIPS backbone weights"), source=str(bb_path))
        return self

    @torch.no_grad()
    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load torchvision ``features.N.weight|bias`` keys (``classifier.*`` ignored), strictly."""
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        unexpected = [k for k in state if not k.startswith(("features.", "classifier."))]
        self._load_part(self.net.features, features, "backbone", source, prefix="features.", unexpected=unexpected)

    @torch.no_grad()
    def load_lpips_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load lin weights (``lin{k}.model.1.weight``), optionally with backbone keys
        ``net.slice{s}.{n}.*`` (mapped to ``features.{n}.*``; osp's own ``net.features.{n}.*`` too);
        ``scaling_layer.*`` ignored. Strict."""
        lins, backbone, unexpected = {}, {}, []
        for key, value in state.items():
            m_lin = re.fullmatch(r"(lin\d+)\.model\.[01]\.weight", key)
            m_net = re.fullmatch(r"net\.(?:slice\d+|features)\.(\d+\.(?:weight|bias))", key)
            if m_lin:
                lins[f"{m_lin.group(1)}.model.1.weight"] = value
            elif m_net:
                backbone[m_net.group(1)] = value
            elif key not in ("scaling_layer.shift", "scaling_layer.scale"):
                unexpected.append(key)
        lin_module = nn.ModuleDict({f"lin{k}": lin for k, lin in enumerate(self.lins)})
        self._load_part(lin_module, lins, "lin", source, unexpected=unexpected)
        if backbone:
            self._load_part(self.net.features, backbone, "backbone", source, prefix="net.slice*.")

    def _load_part(self, module: nn.Module, state: Dict[str, torch.Tensor], what: str, source: str,
                   prefix: str = "", unexpected: Sequence[str] = ()) -> None:
        own = module.state_dict()
        missing = [prefix + k for k in own if k not in state]
        unexpected = list(unexpected) + [prefix + k for k in state if k not in own]
        if missing or unexpected:
            parts = ([f"missing {what} keys {_listing(missing)}"] if missing else []) + (
                [f"unexpected keys {_listing(unexpected)}"] if unexpected else [])
            raise ValueError(f"LPIPS(net={self.net_name!r}) weights {source}: " + "; ".join(parts))
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"LPIPS(net={self.net_name!r}) weights {source}: {prefix}{k} has shape "
                                 f"{tuple(v.shape)}, expected {tuple(own[k].shape)}")
        module.load_state_dict(state, strict=True)

    # ---------------------------------------------------------------------------------- forward

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images (N, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")

    def layer_maps(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> List[torch.Tensor]:
        """The 5 per-layer lin maps (N, 1, h_l, w_l): lin_l((n(f_l(x)) - n(f_l(y)))^2).

        x, y: (N, 3, H, W) in [-1, 1] (in [0, 1] with ``normalize=True``). Both images go through the
        backbone in one batch. Computed in the parameters' dtype, on their device."""
        self._check(x, y)
        weight = self.lin0.model[1].weight
        dtype = weight.dtype
        xy = torch.cat([x, y]).to(device=weight.device, dtype=dtype)
        if normalize:
            xy = 2 * xy - 1
        shift, scale = self._scaling_constants(dtype, xy.device)
        xy = (xy - shift) / scale
        n = x.shape[0]
        maps = []
        for feat, lin in zip(self.net(xy), self.lins):
            feat = normalize_channels(feat)
            maps.append(lin((feat[:n] - feat[n:]) ** 2))
        return maps

    def _scaling_constants(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        # made from the Python constants in the working dtype (a float32 buffer cast to float64 would
        # carry float32 rounding into a float64 run)
        key = (dtype, device)
        if key not in self._scaling:
            self._scaling[key] = (torch.tensor(SHIFT, dtype=dtype, device=device).view(1, 3, 1, 1),
                                  torch.tensor(SCALE, dtype=dtype, device=device).view(1, 3, 1, 1))
        return self._scaling[key]

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """LPIPS(x, y): (N, 1, 1, 1), or (N, 1, H, W) when ``spatial``. See :meth:`layer_maps`."""
        maps = self.layer_maps(x, y, normalize=normalize)
        if self.spatial:
            size = tuple(x.shape[-2:])
            return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)
        return sum(m.mean(dim=(2, 3), keepdim=True) for m in maps)


_CACHE: Dict[Tuple, LPIPS] = {}


def cached_lpips(net: str = "alex", weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
                 device: Union[str, torch.device] = "cpu") -> LPIPS:
    """A pretrained LPIPS kept per (net, files, folder, device), so repeated metric calls load once."""
    key = (net, str(weights), str(backbone_weights), str(default_weights_dir()), str(torch.device(device)))
    model = _CACHE.get(key)
    if model is None:
        model = LPIPS(net, weights=weights, backbone_weights=backbone_weights).to(device)
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = model
    return model


def check_videos(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """a, b: (B, T, C, H, W) of equal shape; ValueError naming the shapes otherwise."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{name} expects tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 5:
        raise ValueError(f"{name} expects videos (B, T, C, H, W), got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: the two video batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[2] != 3:
        raise ValueError(f"{name} expects RGB frames (C = 3), got C = {a.shape[2]} in shape {tuple(a.shape)}")


def lpips(a: torch.Tensor, b: torch.Tensor, *, net: str = "alex", model: Optional[LPIPS] = None,
          weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
          batch_frames: Optional[int] = None) -> torch.Tensor:
    """Upstream's per-video LPIPS (spec F.3): the spatial LPIPS map's mean over H x W, per frame,
    averaged over the frames.

    a, b: (B, T, 3, H, W) in [0, 1] (mapped to [-1, 1]). All frames run as one batch, or in chunks
    of ``batch_frames`` frames. ``model`` (an :class:`LPIPS`) is used as given, else a pretrained
    ``LPIPS(net)`` from ``weights`` / ``backbone_weights`` or the default folder, on a's device.
    Returns (B,) in the model's dtype (float32 unless the model was cast)."""
    check_videos(a, b, "lpips")
    if batch_frames is not None and (not isinstance(batch_frames, int) or batch_frames < 1):
        raise ValueError(f"lpips batch_frames={batch_frames!r}: expected a positive int or None")
    if model is None:
        model = cached_lpips(net, weights, backbone_weights, a.device)
    bsz, t = a.shape[:2]
    fa, fb = a.reshape(bsz * t, *a.shape[2:]), b.reshape(bsz * t, *b.shape[2:])
    step = batch_frames or fa.shape[0]
    size = tuple(a.shape[-2:])
    values = []
    with torch.no_grad():
        for i in range(0, fa.shape[0], step):
            maps = model.layer_maps(fa[i:i + step], fb[i:i + step], normalize=True)
            total = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)
            values.append(total.mean(dim=(1, 2, 3)))
    return torch.cat(values).view(bsz, t).mean(dim=1)
