"""Randomness of a training step as a function of (seed, step, micro-batch, process).

Every random draw of a step (timesteps t, the noise, posterior samples, caption dropout) comes from
a torch.Generator seeded from these numbers, and the global torch RNG (dropout inside the model, if
any) is reseeded the same way before the step. Nothing random carries over from one step to the
next, so a run resumed at step k draws exactly what an uninterrupted run draws, whatever the number
of DataLoader workers, and no generator state needs saving (accelerate's checkpoint still holds the
global RNG states).
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy's SeedSequence: well spread, stable across
    platforms and versions)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


# Domain tags keep the streams of different uses apart.
STEP = 1
GLOBAL = 2
VALIDATION = 3
EPOCH = 4
INIT = 5


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch (t, noise, posterior samples, caption dropout)."""
    return torch.Generator("cpu").manual_seed(derive_seed(seed, STEP, step, micro, rank))


def seed_global(seed: int, step: int, micro: int, rank: int) -> None:
    """Reseed torch's global generators (CPU and CUDA) for one micro-batch."""
    torch.manual_seed(derive_seed(seed, GLOBAL, step, micro, rank))
