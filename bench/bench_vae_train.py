"""CausalVideoVAE training: one whole ``osp train-vae`` step, osp against the upstream-style eager twin.

Op "vae_train_step": one batch of upstream's manual optimisation (spec E.3) as ``osp train-vae``
runs it (``osp.train.vae.TrainStep``): encode, posterior sample, decode; the generator loss (L1 +
LPIPS-VGG, logvar-weighted NLL, KL x 1e-6, the adaptive weight's two gradients w.r.t. the decoder's
last conv, the PatchGAN's hinge term active); backward, clipping at 1.0, Adam (betas 0.5/0.9); then
the discriminator's hinge loss on real and reconstructed frames, backward, clipping, Adam. A
synchronization ends every step (the loop reads the losses).

- backend "auto": osp.models.CausalVideoVAE with osp's dispatch (fused GroupNorm+SiLU forward and
  backward, causal convs without padded copies, the nearest upsample folded into its conv);
  The generator loss goes through ``generator_loss_fused`` (LPIPS and the discriminator
  back-propagated once instead of twice, the same gradients).
- baseline: the same model and weights under bench_vae's ``upstream_style`` (upstream's replicate +
  cat + conv3d, F.interpolate then conv, eager GroupNorm then SiLU) and upstream's loss order (the
  adaptive weight's two autograd.grad calls, then the loss's backward): what upstream computes.
  Its own Adam state over its own copy of the weights. Both sides share the loss's LPIPS-VGG (random
  weights: the cost is the network's, not its values) and start from the same discriminator.

GPU: upstream's release config (hidden 128, mult 1,2,4,4, 2 res blocks), 17x256x256, batch 1, bf16
autocast over fp32 weights (osp train-vae's and Lightning's bf16-mixed); peak memory per side: CUDA
max_memory_allocated above what was allocated before one step, plus its resident weights and Adam
state; "data" holds both and their ratio. CPU: hidden 32, mult 1,1,2,2, 1 res block, fp32, 5x32x32
(--quick) and 9x64x64: they say the machinery works, not how fast a GPU is. "data" also holds each side's first-step loss
(same weights and inputs: they agree to the dtype's rounding).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List

import torch

from .harness import Case, peak_cuda_mib

OP, MODE = "vae_train_step", "gen+disc"
BASELINE = "upstream-style (replicate+cat+conv3d, interpolate then conv, eager GroupNorm, SiLU)"
GPU = [dict(config={}, clip=(1, 3, 17, 256, 256), amp=True)]
_SMALL = dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1)
CPU = [dict(config=_SMALL, clip=(1, 3, 5, 32, 32), amp=False), dict(config=_SMALL, clip=(1, 3, 9, 64, 64), amp=False)]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _perceptual(device: str):
    from osp.eval import LPIPS

    return LPIPS(net="vgg", pretrained=False).to(device)


def build_side(vae, disc_state: Dict[str, torch.Tensor], perceptual, device: str, amp: bool, upstream: bool):
    """(step callable returning the generator loss, resident-bytes function) of one side."""
    from osp.train.vae import Autoencode, DiscriminatorPair, TrainStep, autoencoder_param_groups
    from osp.train.vae_loss import LPIPSWithDiscriminator

    from .bench_vae import upstream_style

    loss = LPIPSWithDiscriminator(disc_start=0, perceptual=perceptual).to(device)
    loss.discriminator.load_state_dict(disc_state)
    loss.logvar.requires_grad_(False)
    vae, loss = vae.train(), loss.train()
    opt_ae = torch.optim.Adam(autoencoder_param_groups(vae, 1e-5, 1e-4), betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-5, betas=(0.5, 0.9))
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    step = TrainStep(Autoencode(vae), vae, loss, DiscriminatorPair(loss.discriminator), opt_ae, opt_d, amp=ctx,
                     fused=not upstream)
    g = torch.Generator()
    x_box: List[torch.Tensor] = []

    def run():
        g.manual_seed(0)
        with upstream_style() if upstream else contextlib.nullcontext():
            out = step(x_box[0], 10, g)
        _sync(device)
        return out["total_loss"]

    def resident() -> int:
        tensors = list(vae.parameters()) + list(loss.discriminator.parameters()) + [
            v for o in (opt_ae, opt_d) for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    return run, resident, x_box


def _peak_mib(fn: Callable[[], object], resident: Callable[[], int]) -> float:
    return resident() / 2**20 + peak_cuda_mib(fn)


def cases(device: str, quick: bool) -> List[Case]:
    cuda = str(device).startswith("cuda")
    specs = (GPU if cuda else CPU)[: 1 if quick else None]
    return [_case(spec, device) for spec in specs]


def _case(spec: Dict, device: str) -> Case:
    from osp.models import CausalVideoVAE
    from osp.train.vae_loss import NLayerDiscriminator

    cuda = str(device).startswith("cuda")
    shape = "x".join(map(str, spec["clip"][2:])) + f" b{spec['clip'][0]}"
    dtype = "bf16 amp" if spec["amp"] else "fp32"
    try:
        perceptual = _perceptual(device)
    except Exception as exc:  # osp.eval not importable: a row that says so
        return Case(op=OP, shape=shape, dtype=dtype, layout="bcthw", backend="auto", mode=MODE, run=lambda: None,
                    baseline=None, baseline_name=BASELINE, bytes=0, skip=f"LPIPS unavailable ({type(exc).__name__}: {exc})")
    torch.manual_seed(0)
    vae = CausalVideoVAE(**spec["config"]).to(device)
    twin = copy.deepcopy(vae)
    disc_state = NLayerDiscriminator().to(device).state_dict()
    x = (torch.rand(spec["clip"], generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    ours, ours_resident, xo = build_side(vae, disc_state, perceptual, device, spec["amp"], upstream=False)
    base, base_resident, xb = build_side(twin, disc_state, perceptual, device, spec["amp"], upstream=True)
    xo.append(x)
    xb.append(x)
    n_params = sum(p.numel() for p in vae.parameters()) + sum(v.numel() for v in disc_state.values())
    data: Dict[str, object] = {"first_loss": {"osp": float(ours()), "upstream-style": float(base())},
                               "params": n_params, "clip": list(spec["clip"]), "lpips": "vgg (random weights)"}
    note = "one generator + discriminator step"
    if cuda:
        peak, peak_twin = _peak_mib(ours, ours_resident), _peak_mib(base, base_resident)
        data.update(peak_mib=peak, twin_peak_mib=peak_twin, peak_ratio=peak / peak_twin)
        note += f"; peak MiB (weights + Adam + step): osp {peak:.0f}, twin {peak_twin:.0f} ({peak / peak_twin:.2f}x)"
    else:
        note += "; peak memory: CUDA only"
    # bytes: fp32 weights read by forward and backward and gradients written, plus Adam's 7 x 4 B
    return Case(op=OP, shape=shape, dtype=dtype, layout="bcthw", backend="auto", mode=MODE, run=ours, baseline=base,
                baseline_name=BASELINE, bytes=n_params * 4 * (3 + 7), note=note, data=data)
