"""IDDPM's GaussianDiffusion as upstream's gaussian_diffusion_t2v.py runs it (spec A.1-A.4, A.6).

Tensors are (B, C, F, h, w) latents (any (B, C, ...) works); a learned-sigma model returns
(B, 2C, ...) whose first C channels are the prediction (ε or x0) and last C the variance values v.
Schedules and derived arrays are float64 numpy; each coefficient is gathered, cast to float32 and
broadcast (upstream's _extract_into_tensor), so every coefficient product is float32 or promotes a
bf16 operand to float32.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Optional

import numpy as np
import torch

from .diffusion_utils import (
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    unwrap_model_output,
)

_LN2 = math.log(2.0)


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}; upstream's p_mean_variance cannot use it, so it is rejected
    START_X = enum.auto()  # x0
    EPSILON = enum.auto()  # the noise ε


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from."""

    LEARNED = enum.auto()  # upstream treats it as LEARNED_RANGE; rejected here to avoid the ambiguity
    FIXED_SMALL = enum.auto()  # posterior variance β̃t
    FIXED_LARGE = enum.auto()  # βt (β̃1 at t = 0)
    LEARNED_RANGE = enum.auto()  # log σ² interpolated between log β̃t and log βt by the model's v


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean prediction (+ VB when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB scaled by T/1000
    KL = enum.auto()  # the variational bound only
    RESCALED_KL = enum.auto()  # the variational bound times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for i in 0..T-1, float64 (T,)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """β for "linear" (Ho et al., scaled by 1000/T) or "squaredcos_cap_v2" (Nichol & Dhariwal): float64 (T,)."""
    T = num_diffusion_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"diffusion_steps={num_diffusion_timesteps!r}; expected a positive integer")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 > 1:
            raise ValueError(
                f"diffusion_steps={num_diffusion_timesteps} with the linear schedule gives β up to {scale * 0.02:g}; "
                "expected diffusion_steps >= 20"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"noise_schedule={schedule_name!r}; expected 'linear' or 'squaredcos_cap_v2'")


class GaussianDiffusion:
    """The IDDPM forward process, its posterior, the training losses and the ancestral/DDIM samplers.

    betas: 1-D, 0 < β <= 1 (T,). The model is any callable ``model(x_t, t, **model_kwargs)`` whose
    result is a tensor, an object with ``.sample`` or a tuple/list (element 0 is used).
    All float64 numpy arrays below have length T = ``num_timesteps``.
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType):
        if model_mean_type not in (ModelMeanType.EPSILON, ModelMeanType.START_X):
            raise ValueError(f"model_mean_type={model_mean_type}; expected ModelMeanType.EPSILON or START_X")
        if model_var_type not in (ModelVarType.LEARNED_RANGE, ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE):
            raise ValueError(f"model_var_type={model_var_type}; expected LEARNED_RANGE, FIXED_SMALL or FIXED_LARGE")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type={loss_type!r}; expected a LossType")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas of shape {betas.shape}; expected a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas in [{betas.min()}, {betas.max()}]; expected every value in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃0 = 0, so index 0 borrows β̃1 before the log (upstream leaves it empty for T = 1).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
            self.fixed_large_variance = np.array([], dtype=np.float64)
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # float32 copies of the arrays per device: one host-to-device copy per array, not per call.
        self._coef_cache: dict = {}

    # ----------------------------------------------------------------------------------------------
    # helpers

    def _extract(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """``getattr(self, name)[t]`` as float32, broadcast to ``shape`` (B, ...) as an expanded view.

        Casting the whole float64 array then gathering equals upstream's gather-then-cast.
        """
        arr = getattr(self, name)
        key = (name, t.device)
        hit = self._coef_cache.get(key)
        if hit is None or hit[0] is not arr:
            hit = (arr, torch.from_numpy(arr).to(t.device).float())
            self._coef_cache[key] = hit
        res = hit[1][t]
        return res.view(-1, *([1] * (len(shape) - 1))).expand(*shape)

    def _check_x(self, x: torch.Tensor, what: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what}: got {got}; expected a tensor (B, C, ...) such as (B, C, F, h, w)")

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        """t must be an integer tensor (B,) with values in [0, num_timesteps)."""
        if (
            not isinstance(t, torch.Tensor)
            or t.dim() != 1
            or t.shape[0] != batch
            or t.is_floating_point()
            or t.is_complex()
            or t.dtype == torch.bool
        ):
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t: got {got}; expected an integer tensor of shape ({batch},)")
        if t.numel():
            lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one device sync for both bounds
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(f"t in [{lo}, {hi}]; expected timesteps in [0, {self.num_timesteps - 1}]")

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is shown for index t (the identity here; SpacedDiffusion maps it)."""
        return t

    def _run_model(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict]):
        """Call the model and split its output: (prediction (B, C, ...), variance values v or None)."""
        out = unwrap_model_output(model(x, self._model_timesteps(t), **(model_kwargs or {})))
        return self._split_output(out, x)

    def _split_output(self, out: torch.Tensor, x: torch.Tensor):
        B, C = x.shape[:2]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            expected = (B, 2 * C, *x.shape[2:])
            if tuple(out.shape) != expected:
                raise ValueError(
                    f"model output of shape {tuple(out.shape)}; expected {expected} (prediction and variance "
                    "values on axis 1, learn_sigma=True)"
                )
            pred, var_values = torch.split(out, C, dim=1)
            return pred, var_values
        if out.shape != x.shape:
            raise ValueError(f"model output of shape {tuple(out.shape)}; expected {tuple(x.shape)} (learn_sigma=False)")
        return out, None

    @staticmethod
    def _randn(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Standard normal noise like x: from the global RNG as upstream (randn_like) or from ``generator``."""
        if generator is None:
            return torch.randn_like(x)
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)

    # ----------------------------------------------------------------------------------------------
    # forward process and posterior

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x0): (mean, variance, log_variance), each (B, C, ...) like x_start."""
        self._check_x(x_start, "x_start")
        self._check_t(t, x_start.shape[0])
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(ᾱt)·x0 + sqrt(1-ᾱt)·ε. x_start, noise: (B, C, ...); t: int (B,).

        Without noise, ε = randn_like(x_start) from the global RNG, as upstream.
        """
        self._check_x(x_start, "x_start")
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)}; expected x_start's shape {tuple(x_start.shape)}")
        return self._q_sample(x_start, t, noise)

    def _q_sample(self, x_start, t, noise):
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x0): (mean, variance β̃t, clipped log β̃t), each (B, C, ...) like x_t."""
        self._check_x(x_t, "x_t")
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start of shape {tuple(x_start.shape)}; expected x_t's shape {tuple(x_t.shape)}")
        self._check_t(t, x_t.shape[0])
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start, x_t, t):
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------------------------------------
    # reverse process

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def p_mean_variance(
        self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False, model_kwargs: Optional[dict] = None
    ) -> dict:
        """Run the model once and return p(x_{t-1} | x_t).

        x: (B, C, ...) at step t; t: int (B,) indices of this (possibly respaced) process.
        Returns {"mean", "variance", "log_variance", "pred_xstart"}, each (B, C, ...); pred_xstart is
        clamped to [-1, 1] only if clip_denoised (upstream's callers pass False).
        """
        self._check_x(x)
        self._check_t(t, x.shape[0])
        pred, var_values = self._run_model(model, x, t, model_kwargs)
        return self._p_mean_variance(pred, var_values, x, t, clip_denoised)

    def _p_mean_variance(self, pred, var_values, x, t, clip_denoised):
        """p_mean_variance from an already split model output (pred (B, C, ...), v (B, C, ...) or None)."""
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            # v in [-1, 1] spans [β̃t, βt]; it is not clamped. In bf16 frac stays bf16 (spec G2).
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x.shape)
            log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            variance = self._extract("posterior_variance", t, x.shape)
            log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = pred
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, pred)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self._q_posterior(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ----------------------------------------------------------------------------------------------
    # losses

    def _vb_terms_bpd(self, pred, var_values, x_start, x_t, t) -> torch.Tensor:
        """Per-sample VB term in bits (B,): decoder NLL where t == 0, else KL(q(x_{t-1}|x_t,x0) || pθ)."""
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, t)
        out = self._p_mean_variance(pred, var_values, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        # Both terms are computed for every sample, as upstream; the where picks per sample.
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """Per-sample training losses for one timestep per sample.

        x_start: (B, C, F, h, w) clean latents (F may include use_image_num image frames; every frame
        counts in the means); t: int (B,); noise: ε like x_start, drawn with randn_like if None.
        Returns (B,) tensors: "loss", and for MSE losses "mse" (against ε, or x0 for predict_xstart)
        and, with a learned variance, "vb" (bits, gradients reach only the variance channels).
        """
        self._check_x(x_start, "x_start")
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)}; expected x_start's shape {tuple(x_start.shape)}")
        x_t = self._q_sample(x_start, t, noise)
        pred, var_values = self._run_model(model, x_t, t, model_kwargs)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(pred, var_values, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if var_values is not None:
            # The mean is frozen: the VB term trains only the variance values v.
            terms["vb"] = self._vb_terms_bpd(pred.detach(), var_values, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        terms["mse"] = mean_flat((target - pred) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ----------------------------------------------------------------------------------------------
    # samplers

    def p_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """One ancestral step x_t -> x_{t-1} = μθ + 1[t≠0]·σθ·z. x: (B, C, ...); t: int (B,).

        Returns {"sample": x_{t-1}, "pred_xstart": x̂0}, each (B, C, ...).
        """
        self._check_x(x)
        self._check_t(t, x.shape[0])
        return self._p_sample(model, x, t, clip_denoised, model_kwargs, generator)

    def _p_sample(self, model, x, t, clip_denoised, model_kwargs, generator):
        pred, var_values = self._run_model(model, x, t, model_kwargs)
        out = self._p_mean_variance(pred, var_values, x, t, clip_denoised)
        noise = self._randn(x, generator)  # drawn at t = 0 too, so the RNG stream matches upstream
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """One DDIM step x_t -> x_{t-1} (deterministic for eta = 0). x: (B, C, ...); t: int (B,).

        Returns {"sample": x_{t-1}, "pred_xstart": x̂0}, each (B, C, ...).
        """
        self._check_x(x)
        self._check_t(t, x.shape[0])
        return self._ddim_sample(model, x, t, clip_denoised, model_kwargs, eta, generator)

    def _ddim_sample(self, model, x, t, clip_denoised, model_kwargs, eta, generator):
        pred, var_values = self._run_model(model, x, t, model_kwargs)
        out = self._p_mean_variance(pred, var_values, x, t, clip_denoised)
        # ε is re-derived from x̂0 so that clipping and x0-prediction are honoured.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = self._randn(x, generator)  # drawn even for eta = 0, as upstream
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop_start(self, model, shape, noise, device, generator):
        """Resolve the loop's device and starting x_T (B, C, ...)."""
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) < 2
            or not all(isinstance(s, int) and s > 0 for s in shape)
        ):
            raise ValueError(f"shape={shape!r}; expected a tuple of positive ints (B, C, ...) such as (B, C, F, h, w)")
        shape = tuple(shape)
        if device is None:
            if noise is not None:
                device = noise.device
            else:
                params = getattr(model, "parameters", None)
                first = next(iter(params()), None) if callable(params) else None
                device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise of shape {tuple(noise.shape)}; expected shape {shape}")
            return noise.to(device), device
        if generator is None:
            return torch.randn(*shape, device=device), device
        return torch.randn(shape, generator=generator, device=generator.device).to(device), device

    def _loop(self, step, model, shape, noise, clip_denoised, model_kwargs, progress, generator, device, **extra):
        img, device = self._loop_start(model, shape, noise, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, clip_denoised, model_kwargs, **extra, generator=generator)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=False,
        model_kwargs=None,
        progress=False,
        generator=None,
        device=None,
    ):
        """Yield p_sample's dict at every step, from t = T-1 down to 0."""
        return self._loop(self._p_sample, model, shape, noise, clip_denoised, model_kwargs, progress, generator, device)

    def p_sample_loop(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
        device=None,
    ) -> torch.Tensor:
        """Ancestral sampling over all num_timesteps steps, without gradients.

        shape: (B, C, F, h, w). noise: x_T of that shape, else drawn from ``generator`` (all
        per-step draws use it too, so the loop is reproducible) or the global RNG. device: where
        the loop runs; default noise's device, else the model's first parameter's, else CPU.
        Returns x_0 (B, C, F, h, w).
        """
        final = None
        for out in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, progress, generator, device
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=False,
        model_kwargs=None,
        eta=0.0,
        progress=False,
        generator=None,
        device=None,
    ):
        """Yield ddim_sample's dict at every step, from t = T-1 down to 0."""
        return self._loop(
            self._ddim_sample, model, shape, noise, clip_denoised, model_kwargs, progress, generator, device, eta=eta
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
        device=None,
    ) -> torch.Tensor:
        """DDIM sampling over all num_timesteps steps (respace with "ddimN" for fewer), without gradients.

        Arguments as p_sample_loop, plus eta (0: deterministic given x_T). Returns x_0 of ``shape``.
        """
        final = None
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, model_kwargs, eta, progress, generator, device
        ):
            final = out
        return final["sample"]
