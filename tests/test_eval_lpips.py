"""LPIPS (AlexNet, VGG16), PWC-Net pieces and FloLPIPS against float64 re-computations written here."""
import re

import pytest
import torch
import torch.nn.functional as F

from osp.eval.flow import PWCNet, backwarp, correlation
from osp.eval.flow_lpips import flolpips
from osp.eval.lpips_net import LPIPS, lpips

SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

# torchvision layouts, written out independently of the module: ("conv", index, stride, padding),
# ("relu+tap",), ("pool", kernel)
ALEX = [("conv", 0, 4, 2), ("tap",), ("pool", 3), ("conv", 3, 1, 2), ("tap",), ("pool", 3),
        ("conv", 6, 1, 1), ("tap",), ("conv", 8, 1, 1), ("tap",), ("conv", 10, 1, 1), ("tap",)]
VGG = []
for block, convs in enumerate([(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]):
    for i, c in enumerate(convs):
        VGG += [("conv", c, 1, 1)] + ([("relu",)] if i < len(convs) - 1 else [("tap",)])
    if block < 4:
        VGG.append(("pool", 2))
LAYOUT = {"alex": ALEX, "vgg": VGG}


def ref_maps(sd, x, y, net):
    """float64 per-layer lin maps from a state dict: plain F.conv2d / relu / max_pool2d."""
    sd = {k: v.double() for k, v in sd.items()}

    def feats(z):
        z = (z.double() - SHIFT) / SCALE
        out = []
        for op in LAYOUT[net]:
            if op[0] == "conv":
                z = F.conv2d(z, sd[f"net.features.{op[1]}.weight"], sd[f"net.features.{op[1]}.bias"],
                             stride=op[2], padding=op[3])
            elif op[0] == "pool":
                z = F.max_pool2d(z, op[1], 2)
            else:
                z = torch.relu(z)
                if op[0] == "tap":
                    out.append(z)
        return out

    maps = []
    for k, (fx, fy) in enumerate(zip(feats(x), feats(y))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lin{k}.model.1.weight"]
        maps.append(((nx - ny) ** 2 * w.view(1, -1, 1, 1)).sum(1, keepdim=True))
    return maps


def ref_lpips(sd, x, y, net, spatial):
    maps = ref_maps(sd, x, y, net)
    if spatial:
        return sum(F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False) for m in maps)
    return sum(m.mean((2, 3), keepdim=True) for m in maps)


def random_lpips(net, seed=0, spatial=False):
    torch.manual_seed(seed)
    model = LPIPS(net, pretrained=False, spatial=spatial)
    with torch.no_grad():
        for lin in model.lins:
            lin.model[1].weight.uniform_(0.0, 1.0)
    return model


SIZE = {"alex": 64, "vgg": 32}


@pytest.mark.parametrize("spatial", [False, True], ids=["mean", "spatial"])
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_float64_reference(net, spatial):
    model = random_lpips(net, seed=1, spatial=spatial)
    g = torch.Generator().manual_seed(2)
    s = SIZE[net]
    x = torch.rand(2, 3, s, s + 3, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = ref_lpips(model.state_dict(), x, y, net, spatial)
    out = model(x, y)
    assert out.shape == ((2, 1, 1, 1) if not spatial else (2, 1, s, s + 3))
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=2e-4, atol=1e-6), (out - ref).abs().max()
    out64 = model.double()(x.double(), y.double())
    assert torch.allclose(out64, ref, rtol=1e-10, atol=1e-12)
    # normalize=True maps [0, 1] to [-1, 1]
    assert torch.allclose(model(x.double() * 0.5 + 0.5, y.double() * 0.5 + 0.5, normalize=True), ref,
                          rtol=1e-10, atol=1e-12)


def test_lazy_exports():
    import osp.eval

    assert osp.eval.LPIPS is LPIPS and osp.eval.lpips is lpips
    assert osp.eval.flolpips is flolpips and osp.eval.PWCNet is PWCNet


def test_lpips_identity_symmetry_and_spatial_mean():
    model = random_lpips("alex", seed=3).double()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(3, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    assert torch.equal(model(x, x), torch.zeros(3, 1, 1, 1, dtype=torch.float64))
    d = model(x, y)
    assert (d > 0).all()
    assert torch.allclose(d, model(y, x), rtol=1e-12, atol=0)
    model.spatial = True
    spatial_mean = model(x, y).mean((1, 2, 3))
    # the spatial form's mean is a different number (bilinear edge weights), but close
    assert not torch.allclose(spatial_mean, d.flatten(), rtol=1e-6, atol=0)
    assert torch.allclose(spatial_mean, d.flatten(), rtol=0.05)


def test_lpips_frozen_eval_but_gradient_reaches_input():
    model = random_lpips("vgg", seed=5).double()
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(6)
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # directional derivative against a central difference (float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        fd = (model(x + h * v, y) - model(x - h * v, y)).item() / (2 * h)
    assert fd == pytest.approx((x.grad * v).sum().item(), rel=1e-5)


def test_lpips_video_metric_is_spatial_mean_over_frames():
    model = random_lpips("alex", seed=7)
    g = torch.Generator().manual_seed(8)
    a = torch.rand(2, 3, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    out = lpips(a, b, model=model)
    assert out.shape == (2,)
    sd = model.state_dict()
    expect = torch.stack([
        torch.stack([ref_lpips(sd, a[i, t:t + 1] * 2 - 1, b[i, t:t + 1] * 2 - 1, "alex", True).mean()
                     for t in range(3)]).mean() for i in range(2)])
    assert torch.allclose(out.double(), expect, rtol=2e-4)
    assert torch.allclose(lpips(a, b, model=model, batch_frames=4), out, rtol=1e-5, atol=1e-7)
    assert torch.equal(lpips(a, a, model=model), torch.zeros(2))


def test_lpips_bad_inputs():
    model = random_lpips("alex")
    a = torch.rand(1, 2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"differ in shape: \(1, 2, 3, 64, 64\) vs \(1, 2, 3, 64, 32\)"):
        lpips(a, a[..., :32], model=model)
    with pytest.raises(ValueError, match=r"expects videos \(B, T, C, H, W\), got shape \(2, 3, 64, 64\)"):
        lpips(a[0], a[0], model=model)
    with pytest.raises(ValueError, match="expects RGB frames .C = 3., got C = 1"):
        lpips(a[:, :, :1], a[:, :, :1], model=model)
    with pytest.raises(ValueError, match="batch_frames=0: expected a positive int"):
        lpips(a, a, model=model, batch_frames=0)
    with pytest.raises(ValueError, match=r"expects images \(N, 3, H, W\), got shape \(1, 1, 64, 64\)"):
        model(a[:, 0, :1], a[:, 0, :1])
    with pytest.raises(ValueError, match=r"net='resnet': expected one of \['alex', 'vgg'\]"):
        LPIPS("resnet", pretrained=False)


def _split_files(model, tmp_path, net):
    """Write the model's weights as torchvision's backbone file and lpips' v0.1 lin file."""
    sd = model.state_dict()
    backbone = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.features.")}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry a classifier
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    names = {"alex": ("alexnet-owt-7be5be79.pth", "lpips_v0.1_alex.pth"),
             "vgg": ("vgg16-397923af.pth", "lpips_v0.1_vgg.pth")}[net]
    torch.save(backbone, tmp_path / names[0])
    torch.save(lin, tmp_path / names[1])
    return tmp_path / names[0], tmp_path / names[1]


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_torchvision_and_lin_files(net, tmp_path, monkeypatch):
    src = random_lpips(net, seed=9)
    bb, lin = _split_files(src, tmp_path, net)
    g = torch.Generator().manual_seed(10)
    x = torch.rand(2, 3, SIZE[net], SIZE[net], generator=g) * 2 - 1
    y = torch.rand(2, 3, SIZE[net], SIZE[net], generator=g) * 2 - 1
    expect = src(x, y)
    loaded = LPIPS(net, weights=lin, backbone_weights=bb)
    assert torch.equal(loaded(x, y), expect)
    # the same files found by name in OSP_WEIGHTS_DIR
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(LPIPS(net)(x, y), expect)
    # the video metric builds (and keeps) its model from the default folder
    a = torch.rand(1, 2, 3, SIZE[net], SIZE[net], generator=g)
    b = torch.rand(1, 2, 3, SIZE[net], SIZE[net], generator=g)
    assert torch.allclose(lpips(a, b, net=net), lpips(a, b, model=src), rtol=1e-6)


def test_lpips_loads_taming_full_state_dict(tmp_path, monkeypatch):
    src = random_lpips("vgg", seed=11)
    slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]
    full = {"scaling_layer.shift": SHIFT.float(), "scaling_layer.scale": SCALE.float()}
    for s, idx in enumerate(slices, start=1):
        for n in idx:
            for p in ("weight", "bias"):
                key = f"net.features.{n}.{p}"
                if key in src.state_dict():
                    full[f"net.slice{s}.{n}.{p}"] = src.state_dict()[key]
    full.update({k: v for k, v in src.state_dict().items() if k.startswith("lin")})
    torch.save(full, tmp_path / "vgg_lpips.pth")
    g = torch.Generator().manual_seed(12)
    x, y = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    # a full state dict needs no backbone file, also through the default folder
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(LPIPS("vgg")(x, y), src(x, y))
    assert torch.equal(LPIPS("vgg", weights=tmp_path / "vgg_lpips.pth")(x, y), src(x, y))
    # osp's own state dict is a full state dict too
    torch.save(src.state_dict(), tmp_path / "own.pth")
    assert torch.equal(LPIPS("vgg", weights=tmp_path / "own.pth")(x, y), src(x, y))


def test_lpips_vgg_prefers_taming_file_then_lpips_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    src = random_lpips("vgg", seed=13)
    _split_files(src, tmp_path, "vgg")  # vgg16-397923af.pth + lpips_v0.1_vgg.pth
    assert torch.equal(LPIPS("vgg").lin2.model[1].weight, src.lin2.model[1].weight)
    taming = {f"lin{k}.model.1.weight": torch.full_like(lin.model[1].weight, 0.5) for k, lin in enumerate(src.lins)}
    torch.save(taming, tmp_path / "vgg_lpips.pth")
    assert (LPIPS("vgg").lin2.model[1].weight == 0.5).all()


def test_lpips_missing_files_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        LPIPS("alex")
    msg = str(err.value)
    for part in ("lpips_v0.1_alex.pth", "lpips/weights/v0.1/alex.pth", "alexnet-owt-7be5be79.pth",
                 str(tmp_path), "OSP_WEIGHTS_DIR", "nothing is downloaded"):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="vgg_lpips.pth or lpips_v0.1_vgg.pth .*"
                                                "d507d7349b931f0638a25a48a722f98a.*vgg16-397923af.pth"):
        LPIPS("vgg")
    src = random_lpips("alex")
    bb, lin = _split_files(src, tmp_path, "alex")
    bb.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in .*: alexnet-owt-7be5be79.pth \(torchvision"):
        LPIPS("alex")
    with pytest.raises(FileNotFoundError, match="LPIPS weights file not found: .*nowhere.pth"):
        LPIPS("alex", weights=tmp_path / "nowhere.pth")
    a = torch.rand(1, 2, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        lpips(a, a)


def test_lpips_strict_keys_and_shapes(tmp_path):
    src = random_lpips("alex")
    bb, lin = _split_files(src, tmp_path, "alex")
    state = torch.load(lin)
    del state["lin3.model.1.weight"]
    state["lin9.model.1.weight"] = torch.ones(1, 8, 1, 1)
    torch.save(state, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match=r"missing lin keys lin3.model.1.weight; unexpected keys lin9.model.1.weight"):
        LPIPS("alex", weights=tmp_path / "bad_lin.pth", backbone_weights=bb)
    state = torch.load(bb)
    del state["features.8.bias"]
    state["features.99.weight"] = torch.ones(1)
    state["head.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "bad_bb.pth")
    with pytest.raises(ValueError, match=r"missing backbone keys features.8.bias; "
                                         r"unexpected keys features.99.weight, head.weight"):
        LPIPS("alex", weights=lin, backbone_weights=tmp_path / "bad_bb.pth")
    state = torch.load(bb)
    state["features.3.weight"] = torch.ones(192, 64, 3, 3)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(ValueError, match=r"features.3.weight has shape \(192, 64, 3, 3\), expected \(192, 64, 5, 5\)"):
        LPIPS("alex", weights=lin, backbone_weights=tmp_path / "bad_shape.pth")
    # a VGG lin file given to AlexNet: shapes name the mismatch
    vgg_lin = {f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg_lin, tmp_path / "vgg_lin.pth")
    with pytest.raises(ValueError, match=r"lin1.model.1.weight has shape \(1, 128, 1, 1\), expected \(1, 192, 1, 1\)"):
        LPIPS("alex", weights=tmp_path / "vgg_lin.pth", backbone_weights=bb)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read LPIPS weights file .*junk.pth"):
        LPIPS("alex", weights=tmp_path / "junk.pth", backbone_weights=bb)


# ------------------------------------------------------------------------------------------ flow

def test_correlation_matches_brute_force():
    g = torch.Generator().manual_seed(14)
    one = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    two = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    out = correlation(one, two)
    assert out.shape == (2, 81, 6, 7)
    ref = torch.zeros(2, 81, 6, 7, dtype=torch.float64)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            for y in range(6):
                for x in range(7):
                    if 0 <= y + dy < 6 and 0 <= x + dx < 7:
                        ref[:, (dy + 4) * 9 + dx + 4, y, x] = (one[:, :, y, x] * two[:, :, y + dy, x + dx]).mean(1)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(correlation(one.float(), two.float()).double(), ref, atol=1e-5)


@pytest.mark.parametrize("sx,sy", [(2, 0), (-1, 3)])
def test_backwarp_integer_shift(sx, sy):
    g = torch.Generator().manual_seed(15)
    n, c, h, w = 2, 3, 8, 11
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64) + 0.5
    # sniklaus normalises the flow by (size - 1) / 2 on an align_corners=False grid, so a flow of
    # s * (W - 1) / W moves exactly s pixels
    flow = torch.empty(n, 2, h, w, dtype=torch.float64)
    flow[:, 0] = sx * (w - 1) / w
    flow[:, 1] = sy * (h - 1) / h
    out = backwarp(x, flow)
    expect = torch.zeros_like(x)
    for yy in range(h):
        for xx in range(w):
            if 0 <= yy + sy < h and 0 <= xx + sx < w:
                expect[:, :, yy, xx] = x[:, :, yy + sy, xx + sx]
    assert torch.allclose(out, expect, atol=1e-9)
    # half a pixel off: the sample's footprint leaves the image at the border -> masked to 0
    flow[:, 0] = 0.5 * (w - 1) / w
    flow[:, 1] = 0
    out = backwarp(x, flow)
    assert torch.allclose(out[..., :-1], 0.5 * (x[..., :-1] + x[..., 1:]), atol=1e-9)
    assert torch.equal(out[..., -1], torch.zeros_like(out[..., -1]))


def test_pwcnet_keys_shapes_and_forward():
    torch.manual_seed(16)
    net = PWCNet()
    sd = net.state_dict()
    expect = {
        "netExtractor.netOne.0.weight": (16, 3, 3, 3), "netExtractor.netSix.4.weight": (196, 196, 3, 3),
        "netSix.netOne.0.weight": (128, 81, 3, 3), "netSix.netSix.0.weight": (2, 81 + 448, 3, 3),
        "netFiv.netUpfeat.weight": (81 + 448, 2, 4, 4), "netFiv.netUpflow.weight": (2, 2, 4, 4),
        "netTwo.netOne.0.weight": (128, 117, 3, 3), "netTwo.netUpfeat.weight": (149 + 448, 2, 4, 4),
        "netRefiner.netMain.0.weight": (128, 565, 3, 3), "netRefiner.netMain.8.weight": (64, 96, 3, 3),
        "netRefiner.netMain.12.weight": (2, 32, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "netSix.netUpflow.weight" not in sd
    assert net.netRefiner.netMain[8].dilation == (16, 16)
    g = torch.Generator().manual_seed(17)
    a = torch.rand(2, 3, 64, 96, generator=g)
    out = net(a, torch.rand(2, 3, 64, 96, generator=g))
    assert out.shape == (2, 2, 64, 96) and torch.isfinite(out).all()


def test_pwcnet_resize_and_rescale_with_stub_network(monkeypatch):
    net = PWCNet()
    seen = {}

    def stub(one, two):
        seen["one"], seen["two"] = one, two
        field = torch.empty(one.shape[0], 2, one.shape[2] // 4, one.shape[3] // 4)
        field[:, 0], field[:, 1] = 8.0, -4.0
        return field

    monkeypatch.setattr(net, "estimate", stub)
    g = torch.Generator().manual_seed(18)
    a, b = torch.rand(2, 3, 70, 96, generator=g), torch.rand(2, 3, 70, 96, generator=g)
    out = net(a, b)
    assert seen["one"].shape == (2, 3, 128, 128)
    assert torch.allclose(seen["one"], F.interpolate(a, size=(128, 128), mode="bilinear", align_corners=False))
    assert torch.allclose(seen["two"], F.interpolate(b, size=(128, 128), mode="bilinear", align_corners=False))
    assert out.shape == (2, 2, 70, 96)
    assert torch.allclose(out[:, 0], torch.full((2, 70, 96), 8.0 * 96 / 128))
    assert torch.allclose(out[:, 1], torch.full((2, 70, 96), -4.0 * 70 / 128))
    bgr = PWCNet(channel_order="bgr")
    monkeypatch.setattr(bgr, "estimate", stub)
    bgr(a, b)
    assert torch.allclose(seen["one"], F.interpolate(a.flip(1), size=(128, 128), mode="bilinear",
                                                     align_corners=False))
    with pytest.raises(ValueError, match="channel_order='rgba': expected 'rgb'"):
        PWCNet(channel_order="rgba")
    with pytest.raises(ValueError, match=r"PWCNet expects two frame batches \(N, 3, H, W\) of equal shape"):
        net(a, b[:, :, :64])


def test_pwcnet_from_file(tmp_path, monkeypatch):
    torch.manual_seed(19)
    src = PWCNet()
    # sniklaus' file spells the modules "module*"; loading renames them as his loader does
    original = {k.replace("net", "module"): v for k, v in src.state_dict().items()}
    assert "moduleExtractor.moduleOne.0.weight" in original
    torch.save(original, tmp_path / "pwc-net-default.pytorch")
    g = torch.Generator().manual_seed(20)
    a, b = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    assert torch.equal(PWCNet.from_file()(a, b), src(a, b))
    state = dict(src.state_dict())
    del state["netRefiner.netMain.12.bias"]
    state["netSeven.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "bad.pytorch")
    with pytest.raises(ValueError, match="missing keys netRefiner.netMain.12.bias; unexpected keys netSeven.weight"):
        PWCNet.from_file(tmp_path / "bad.pytorch")
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"put pwc-net-default.pytorch \(sniklaus.*\) in .*empty .set "
                                                r"OSP_WEIGHTS_DIR"):
        PWCNet.from_file()


# ------------------------------------------------------------------------------------------ FloLPIPS

def stub_flow(x, y):
    """A known field that depends on both frames: a per-frame brightness change times a ramp."""
    n, _, h, w = x.shape
    ramp = torch.linspace(0.0, 1.0, w, dtype=x.dtype).view(1, w).expand(h, w)
    bump = torch.linspace(-1.0, 2.0, h, dtype=x.dtype).view(h, 1).expand(h, w)
    d = (y - x).mean(dim=(1, 2, 3)).view(n, 1, 1)
    s = (x * y).mean(dim=(1, 2, 3)).view(n, 1, 1)
    return torch.stack([10 * d * ramp, 5 * s * bump ** 2], dim=1)


def ref_flolpips(sd, a, b, flow):
    out = []
    for i in range(a.shape[0]):
        vals = []
        for k in range(a.shape[1] - 1):
            delta = (flow(a[i, k:k + 1].double(), a[i, k + 1:k + 2].double())
                     - flow(b[i, k:k + 1].double(), b[i, k + 1:k + 2].double()))
            maps = ref_maps(sd, a[i, k:k + 1] * 2 - 1, b[i, k:k + 1] * 2 - 1, "alex")
            total = 0.0
            for m in maps:
                d = F.interpolate(delta, size=m.shape[-2:], mode="bilinear", align_corners=False)
                mag = d.pow(2).sum(1, keepdim=True).sqrt()
                total = total + (m * mag / mag.sum()).sum()
            vals.append(total)
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


def test_flolpips_matches_float64_per_pair_loop():
    model = random_lpips("alex", seed=21)
    g = torch.Generator().manual_seed(22)
    a = torch.rand(2, 4, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    out = flolpips(a, b, model=model, flow=stub_flow)
    assert out.shape == (2,)
    ref = ref_flolpips(model.state_dict(), a, b, stub_flow)
    assert torch.allclose(out.double(), ref, rtol=2e-4), (out, ref)
    # weighting matters: not the plain LPIPS mean
    assert not torch.allclose(out, lpips(a[:, :-1], b[:, :-1], model=model), rtol=1e-3)
    assert torch.allclose(flolpips(a, b, model=model, flow=stub_flow, batch_pairs=4), out, rtol=1e-5)


def test_flolpips_zero_flow_difference_is_uniform_weighting():
    model = random_lpips("alex", seed=23)
    g = torch.Generator().manual_seed(24)
    a = torch.rand(1, 3, 3, 64, 64, generator=g)
    b = torch.rand(1, 3, 3, 64, 64, generator=g)

    def zero_flow(x, y):
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    out = flolpips(a, b, model=model, flow=zero_flow)
    assert torch.isfinite(out).all()
    # every layer gets weights 1 / (h w): the non-spatial LPIPS of each pair, averaged
    sd = model.state_dict()
    expect = torch.stack([ref_lpips(sd, a[0, k:k + 1] * 2 - 1, b[0, k:k + 1] * 2 - 1, "alex", False).sum()
                          for k in range(2)]).mean()
    assert out.item() == pytest.approx(expect.item(), rel=2e-4)
    assert torch.equal(flolpips(a, a, model=model, flow=stub_flow), torch.zeros(1))


def test_flolpips_bad_inputs(tmp_path, monkeypatch):
    model = random_lpips("alex")
    a = torch.rand(1, 1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"at least 2 frames .*got T = 1 in shape \(1, 1, 3, 64, 64\)"):
        flolpips(a, a, model=model, flow=stub_flow)
    a = torch.rand(1, 2, 3, 64, 64)
    with pytest.raises(ValueError, match=re.escape("returned shape (2, 2, 32, 32), expected (2, 2, 64, 64)")):
        flolpips(a, a, model=model, flow=lambda x, y: torch.zeros(x.shape[0], 2, 32, 32))
    with pytest.raises(ValueError, match="batch_pairs=-1: expected a positive int"):
        flolpips(a, a, model=model, flow=stub_flow, batch_pairs=-1)
    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pwc-net-default.pytorch"):
        flolpips(a, a, model=model)
    with pytest.raises(FileNotFoundError, match="lpips_v0.1_alex.pth"):
        flolpips(a, a, flow=stub_flow)
