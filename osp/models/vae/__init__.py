"""Open-Sora-Plan v1.0's causal video VAE."""
from .distribution import DiagonalGaussianDistribution
from .model import CausalVideoVAE

__all__ = ["CausalVideoVAE", "DiagonalGaussianDistribution"]
