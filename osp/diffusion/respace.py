"""Timestep respacing (upstream's respace.py, spec A.5): keep a subset of a T-step process."""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def _parse_counts(section_counts: str) -> list:
    try:
        return [int(x) for x in section_counts.split(",")]
    except ValueError:
        raise ValueError(
            f"timestep_respacing={section_counts!r}; expected 'ddimN' or comma-separated step counts "
            "such as '250' or '10,15,20'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> set:
    """The set of original timesteps (0..num_timesteps-1) to keep.

    section_counts: "ddimN" (the smallest integer stride k with len(range(0, T, k)) == N), or step
    counts per equal section: "250", "10,15,20", 250 or [10, 15, 20]. The first T mod n sections are
    one step longer. Inside a section of ``size`` steps and count c, positions are start + round(cur)
    with cur accumulated by repeated addition of (size-1)/(c-1) (Python round: ties to even), so
    "250" of 1000 ends at 999 and "50" is [0, 20, 41, 61, ..., 979, 999].
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"timestep_respacing={section_counts!r}; expected 'ddim' followed by an integer"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing={section_counts!r}: no integer stride gives exactly {desired} "
                f"of {num_timesteps} steps"
            )
        section_counts = _parse_counts(section_counts)
    elif isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        section_counts = [int(section_counts)]
    section_counts = list(section_counts)
    if not section_counts or any(
        isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in section_counts
    ):
        raise ValueError(f"section counts {section_counts!r}; expected a non-empty list of non-negative integers")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    steps = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"section {i} has {size} steps; cannot take {count} steps from it (section counts {section_counts})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride  # accumulated, not i*stride: the float error decides rounding ties
        start += size
    if not steps:
        raise ValueError(f"section counts {section_counts!r} keep no timestep; expected at least one step")
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of another's timesteps.

    For the kept steps i (ascending), β'_k = 1 - ᾱ_i / ᾱ_(previous kept) (from 1.0), so ᾱ' is ᾱ at
    the kept steps; even keeping every step recomputes β this way (upstream does too). Indices t of
    this process run 0..len(kept)-1; the model is shown ``timestep_map[t]``, the original index,
    as int64 on t's device.
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas, model_mean_type, model_var_type, loss_type):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas of shape {betas.shape}; expected a non-empty 1-D array")
        self.original_num_steps = int(betas.shape[0])
        self.use_timesteps = {int(i) for i in use_timesteps}
        bad = sorted(i for i in self.use_timesteps if not 0 <= i < self.original_num_steps)
        if bad or not self.use_timesteps:
            raise ValueError(
                f"use_timesteps {sorted(self.use_timesteps)[:8]}...; expected a non-empty set within "
                f"[0, {self.original_num_steps - 1}]"
            )
        # The same float64 ops as building the base GaussianDiffusion: α = 1 - β, ᾱ = cumprod(α).
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.timestep_map = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        self._identity_map = self.timestep_map == list(range(self.original_num_steps))
        self._map_cache: dict = {}
        super().__init__(
            betas=np.array(new_betas),
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
        )

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self._identity_map:
            return t.long()
        table = self._map_cache.get(t.device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._map_cache[t.device] = table
        return table[t]
