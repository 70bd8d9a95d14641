"""Upstream's CausalVideoVAE training loss (spec E.2): LPIPSWithDiscriminator and its 2-D PatchGAN.

Everything is per frame: clips (b, c, t, h, w) are reshaped to frames (b*t, c, h, w) first.

- Reconstruction: rec = |x - x_hat| (L1 per pixel and channel, on [-1, 1]) plus
  ``perceptual_weight`` x LPIPS (one value per frame, broadcast to every pixel).
- nll = rec / exp(logvar) + logvar, with ``logvar`` a scalar Parameter that no optimiser holds (it
  stays at its loaded value); nll_loss = sum(nll) / (b*t): the sum over pixels over the frame count.
- kl = posterior.kl() (0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) over every latent element) summed
  over the batch and divided by b (not b*t).
- Generator: g = -mean(D(x_hat)); the adaptive weight lambda = ||grad_W nll_loss|| / (||grad_W g|| +
  1e-4), clamped to [0, 1e4], detached, times ``disc_weight``, with W the decoder's last conv weight
  (``decoder.conv_out.conv.weight`` in CausalVideoVAE); f = disc_factor once global_step >= disc_start
  (else 0); loss = nll_loss + kl_weight * kl + lambda * f * g. lambda is computed even while f = 0.
- Discriminator: d = f * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) on detached inputs.

Step counting is upstream's: ``global_step`` and ``disc_start`` are in Lightning's units, which
count optimiser steps, two per batch. Batch k's generator loss sees global_step 2k and its
discriminator loss 2k + 1 (``lightning_step``), so with disc_start 2001 the generator's adversarial
term starts at batch 1001 and the discriminator one batch earlier, at batch 1000.
``osp train-vae`` counts batches and converts (``disc_start_from_batches``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DISC_LOSSES = ("hinge", "vanilla")


def lightning_step(batch_index: int, discriminator: bool) -> int:
    """Upstream's Lightning global_step seen by batch ``batch_index`` (0-based): 2k in its
    generator loss, 2k + 1 in its discriminator loss (the generator's optimiser stepped in between)."""
    return 2 * int(batch_index) + int(bool(discriminator))


def disc_start_from_batches(batches: int) -> int:
    """The Lightning-unit threshold under which the generator's adversarial term starts at batch
    ``batches`` and the discriminator at batch ``batches - 1``, as upstream's 2001 does for 1001:
    2 * batches - 1."""
    return 2 * int(batches) - 1


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` once global_step >= threshold, else ``value`` (taming's adopt_weight)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))) (upstream's unused option)."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def weights_init(m: nn.Module) -> None:
    """taming's init: conv weights ~ N(0, 0.02) (their biases keep PyTorch's default init); BatchNorm
    weight ~ N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """The 2-D PatchGAN of taming (pix2pix), applied to frames (N, C, H, W) -> logits (N, 1, h', w').

    Conv C->64 k4 s2 p1 (bias) + LeakyReLU 0.2; then for n = 1 .. n_layers-1 conv k4 s2 p1 (no bias)
    + BatchNorm2d + LeakyReLU to 64*min(2^n, 8) channels; conv k4 s1 p1 (no bias) + BN + LeakyReLU to
    64*min(2^n_layers, 8); conv k4 s1 p1 (bias) to 1. Parameter names (``main.<i>.*``) are upstream's
    ``loss.discriminator.main.<i>.*``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers={n_layers!r}; expected an int >= 1")
        kw, padw = 4, 1
        seq = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def frames(x: torch.Tensor) -> torch.Tensor:
    """(b, c, t, h, w) -> (b*t, c, h, w) (upstream's rearrange "b c t h w -> (b t) c h w"); 4-D input as is."""
    if x.dim() == 4:
        return x
    if x.dim() != 5:
        raise ValueError(f"expected a clip (b, c, t, h, w) or frames (n, c, h, w); got shape {tuple(x.shape)}")
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """lambda = ||grad nll_loss|| / (||grad g_loss|| + 1e-4) w.r.t. ``last_layer``, clamped to [0, 1e4],
    detached, times ``disc_weight`` (both gradients taken with retain_graph)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class LPIPSWithDiscriminator(nn.Module):
    """Upstream's VAE loss (losses/perceptual_loss.py; see the module docstring for every term).

    Args:
        disc_start: Lightning global_step from which the adversarial terms count (2001 in
            release.json; see ``disc_start_from_batches`` for a threshold in batches).
        logvar_init: the initial (and, since no optimiser holds it, lasting) value of ``logvar``.
        kl_weight, disc_factor, disc_weight, perceptual_weight: the weights of the terms.
        pixelloss_weight: stored and never used (as upstream).
        disc_num_layers, disc_in_channels: the PatchGAN's depth and input channels.
        disc_loss: "hinge" (upstream's) or "vanilla".
        perceptual: a module (x, y) -> (N, 1, 1, 1) on frames (N, 3, H, W) in [-1, 1]; None with
            perceptual_weight > 0 builds ``osp.eval.LPIPS(net="vgg", weights=lpips_weights,
            backbone_weights=lpips_backbone_weights)`` (taming's VGG16 LPIPS). It is kept in eval
            mode with frozen parameters.
    """

    def __init__(self, disc_start: int = 2001, logvar_init: float = 0.0, kl_weight: float = 1e-6,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 0.5, perceptual_weight: float = 1.0,
                 perceptual: Optional[nn.Module] = None, disc_loss: str = "hinge",
                 lpips_weights: Optional[str] = None, lpips_backbone_weights: Optional[str] = None):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss={disc_loss!r}; expected one of {DISC_LOSSES}")
        for name, v in (("kl_weight", kl_weight), ("disc_factor", disc_factor), ("disc_weight", disc_weight),
                        ("perceptual_weight", perceptual_weight)):
            if not v >= 0:
                raise ValueError(f"{name}={v!r}; expected a number >= 0")
        self.disc_start = int(disc_start)
        self.kl_weight, self.pixel_weight = float(kl_weight), float(pixelloss_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.disc_factor, self.discriminator_weight = float(disc_factor), float(disc_weight)
        self.logvar = nn.Parameter(torch.ones(()) * float(logvar_init))
        self.discriminator = NLayerDiscriminator(disc_in_channels, n_layers=disc_num_layers)
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        if perceptual is None and self.perceptual_weight > 0:
            from ..eval import LPIPS

            perceptual = LPIPS(net="vgg", weights=lpips_weights, backbone_weights=lpips_backbone_weights)
        self.perceptual_loss = perceptual
        if perceptual is not None:
            perceptual.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # upstream's LPIPS stays in eval mode (its dropout off)
        return self

    def disc_factor_at(self, global_step: int) -> float:
        return adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)

    def reconstruction(self, inputs: torch.Tensor, reconstructions: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rec (b*t, c, h, w), nll_loss, p_loss (b*t, 1, 1, 1) or None) of clips or frames."""
        x, xr = frames(inputs).contiguous(), frames(reconstructions).contiguous()
        rec = torch.abs(x - xr)
        p = None
        if self.perceptual_weight > 0:
            p = self.perceptual_loss(x, xr)
            rec = rec + self.perceptual_weight * p
        nll = rec / torch.exp(self.logvar) + self.logvar
        return rec, torch.sum(nll) / nll.shape[0], p

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior, global_step: int,
                       last_layer: Optional[torch.Tensor] = None,
                       discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, log) of upstream's optimizer_idx 0 for clips (b, c, t, h, w) in [-1, 1].

        ``posterior``: the encoder's DiagonalGaussianDistribution (its ``kl()`` is per clip);
        ``last_layer``: the weight the adaptive weight differentiates (lambda is 0 when None or when
        gradients are off, as upstream's eval path); ``discriminator``: replaces
        ``self.discriminator`` for this call (e.g. a frozen or unwrapped copy)."""
        disc = self.discriminator if discriminator is None else discriminator
        rec, nll_loss, _ = self.reconstruction(inputs, reconstructions)
        kl = posterior.kl()
        kl_loss = torch.sum(kl) / kl.shape[0]
        logits_fake = disc(frames(reconstructions).contiguous())
        g_loss = -torch.mean(logits_fake)
        if self.disc_factor > 0.0 and last_layer is not None and torch.is_grad_enabled():
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
        else:
            d_weight = torch.zeros((), device=nll_loss.device)
        disc_factor = self.disc_factor_at(global_step)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {"total_loss": loss.detach(), "logvar": self.logvar.detach(), "kl_loss": kl_loss.detach(),
               "nll_loss": nll_loss.detach(), "rec_loss": rec.detach().mean(), "d_weight": d_weight.detach(),
               "disc_factor": torch.tensor(disc_factor), "g_loss": g_loss.detach()}
        return loss, log

    def generator_loss_fused(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior, global_step: int,
                             last_layer: torch.Tensor,
                             discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """``generator_loss`` with each loss network's backward run once: (loss value (detached), log,
        surrogate), where ``surrogate.backward()`` gives the autoencoder exactly the gradients of
        upstream's loss (to rounding).

        Upstream back-propagates nll_loss and g through LPIPS and the discriminator twice: once for the
        adaptive weight's gradients w.r.t. W, once more in the loss's backward. Here the two terms are
        differentiated w.r.t. the reconstruction x_hat once each (their graphs are then freed); the W
        gradients are those x_hat-gradients pulled back through the decoder's last conv alone (the
        chain rule upstream's autograd applies), and the surrogate is sum(x_hat * (dnll/dx_hat +
        lambda * f * dg/dx_hat)) + kl_weight * kl, whose gradient is the loss's."""
        disc = self.discriminator if discriminator is None else discriminator
        r = reconstructions.detach().requires_grad_(True)
        rec, nll_loss, _ = self.reconstruction(inputs, r)
        kl = posterior.kl()
        kl_loss = torch.sum(kl) / kl.shape[0]
        g_loss = -torch.mean(disc(frames(r).contiguous()))
        grad_nll = torch.autograd.grad(nll_loss, r)[0]
        grad_g = torch.autograd.grad(g_loss, r)[0]
        if self.disc_factor > 0.0:
            w_nll = torch.autograd.grad(reconstructions, last_layer, grad_nll, retain_graph=True)[0]
            w_g = torch.autograd.grad(reconstructions, last_layer, grad_g, retain_graph=True)[0]
            d_weight = torch.clamp(torch.norm(w_nll) / (torch.norm(w_g) + 1e-4), 0.0, 1e4) * self.discriminator_weight
        else:
            d_weight = torch.zeros((), device=nll_loss.device)
        disc_factor = self.disc_factor_at(global_step)
        loss = (nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss).detach()
        dtype = torch.promote_types(reconstructions.dtype, torch.float32)  # bf16 under autocast: add in fp32
        grad = grad_nll.to(dtype)
        if disc_factor:
            grad = grad + (d_weight * disc_factor).to(dtype) * grad_g.to(dtype)
        surrogate = torch.sum(reconstructions.to(dtype) * grad.detach()) + self.kl_weight * kl_loss
        log = {"total_loss": loss, "logvar": self.logvar.detach(), "kl_loss": kl_loss.detach(),
               "nll_loss": nll_loss.detach(), "rec_loss": rec.detach().mean(), "d_weight": d_weight.detach(),
               "disc_factor": torch.tensor(disc_factor), "g_loss": g_loss.detach()}
        return loss, log, surrogate

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                           pair: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]
                           = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, log) of upstream's optimizer_idx 1: f * disc_loss(D(x), D(x_hat)) on detached frames.
        D runs on the real frames, then on the reconstructions (two calls, as upstream's BatchNorm
        sees them); ``pair(real, fake) -> (logits_real, logits_fake)`` replaces both calls (one module
        call, e.g. under DDP), ``discriminator`` replaces ``self.discriminator``."""
        real = frames(inputs).contiguous().detach()
        fake = frames(reconstructions).contiguous().detach()
        if pair is not None:
            logits_real, logits_fake = pair(real, fake)
        else:
            disc = self.discriminator if discriminator is None else discriminator
            logits_real, logits_fake = disc(real), disc(fake)
        disc_factor = self.disc_factor_at(global_step)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
               "logits_fake": logits_fake.detach().mean()}
        return d_loss, log
