"""The VAE posterior: a diagonal Gaussian over (mean, logvar) (numerics spec B.3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class DiagonalGaussianDistribution:
    """Diagonal Gaussian from the moments (B, 2*Z, T, h, w): mean = channels [0, Z), logvar =
    channels [Z, 2Z) clamped to [-30, 20]. Same interface as diffusers' posterior (``mean``,
    ``logvar``, ``std``, ``var``, ``mode()``, ``sample(generator)``, ``kl()``, ``nll()``), with the
    sums over every non-batch dim so that 5-D video latents are summed over time too.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(
                f"DiagonalGaussianDistribution: parameters have shape {tuple(parameters.shape)}; expected (B, 2*Z, ...)"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def _dims(self, dims: Optional[Sequence[int]]):
        return list(range(1, self.mean.dim())) if dims is None else list(dims)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) drawn in float32 on ``generator``'s device, or, when None, from
        the default CPU generator as upstream does (so a seed gives upstream's noise on any device),
        then moved to the latents' device and dtype."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None, dims: Optional[Sequence[int]] = None) -> torch.Tensor:
        """KL(self || other), other = N(0, I) when None; summed over ``dims`` (default: all but batch)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._dims(dims)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims`` (default: all but batch)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        logtwopi = 1.8378770664093453  # log(2*pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=self._dims(dims))
