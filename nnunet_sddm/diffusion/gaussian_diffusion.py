"""The improved-DDPM Gaussian diffusion process (Nichol & Dhariwal 2021).

Notation (as in docs/explanation/algorithm.md): ``beta_t``, ``alpha_t = 1 - beta_t``,
``abar_t = prod_{s<=t} alpha_s``, timesteps are 0-based indices ``t = 0 .. T-1``.
Images ``x`` are float tensors ``(B, C, H, W)`` in ``[-1, 1]``; ``t`` is a LongTensor ``(B,)`` of
indices into THIS chain (for a respaced chain, see ``respace.SpacedDiffusion``).
The network is called as ``model(x_t, model_timesteps(t))`` and returns ``(B, C, H, W)``
(fixed variance) or ``(B, 2C, H, W)`` (``[eps_hat, v]``, learned variance).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from nnunet_sddm.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from nnunet_sddm.utilities.progress import progress_bar

MODEL_VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
MODEL_MEAN_TYPES = ("epsilon", "start_x")
LOSS_TYPES = ("hybrid", "rescaled_hybrid", "mse", "kl", "rescaled_kl")


# ----------------------------------------------------------------------------- schedules
def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas of a schedule given by a continuous ``abar(u)``, ``u`` in [0, 1]:
    ``beta_i = min(1 - abar((i + 1)/T) / abar(i/T), max_beta)`` (float64, shape (T,))."""
    return np.array([min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """``"linear"``: ``linspace(1e-4 s, 0.02 s, T)`` with ``s = 1000/T``;
    ``"cosine"``: ``abar(u) = cos^2((u + 0.008)/1.008 * pi/2)``. Returns float64 ``(T,)``."""
    if num_timesteps < 1:
        raise ValueError(f"number of diffusion steps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {name!r} (choose 'linear' or 'cosine')")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the batch dimension: ``(B, ...)`` -> ``(B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``arr[t]`` as float32 on ``t``'s device, shaped ``(B, 1, ..., 1)`` with ``ndim`` dims."""
    out = torch.from_numpy(arr).to(device=t.device)[t].float()
    return out.reshape(out.shape + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------- process
class GaussianDiffusion:
    """Forward process, posterior, model parameterisation, sampling and training losses.

    Args:
        betas: ``(T,)`` noise schedule, each in (0, 1].
        model_var_type: ``"learned_range"`` (interpolate log beta~ and log beta with the
            network's ``v`` in [-1, 1]), ``"learned"`` (network outputs log variance),
            ``"fixed_small"`` (beta~) or ``"fixed_large"`` (beta, with beta~_1 at t = 0).
        loss_type: ``"hybrid"`` (MSE + L_vb), ``"rescaled_hybrid"`` (L_vb times T/1000),
            ``"mse"`` (fixed variance only), ``"kl"`` / ``"rescaled_kl"`` (L_vb only; times T).
        model_mean_type: ``"epsilon"`` (the network predicts the noise) or ``"start_x"``.
        rescale_timesteps: feed the network ``t * 1000 / T`` (float) instead of the index.
    """

    def __init__(self, betas: Sequence[float], model_var_type: str = "learned_range",
                 loss_type: str = "hybrid", model_mean_type: str = "epsilon",
                 rescale_timesteps: bool = False):
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}, got {model_var_type!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if model_mean_type not in MODEL_MEAN_TYPES:
            raise ValueError(f"model_mean_type must be one of {MODEL_MEAN_TYPES}, got {model_mean_type!r}")
        if loss_type == "mse" and self._learned(model_var_type):
            raise ValueError("loss_type 'mse' trains no variance: use 'hybrid' with a learned variance")
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.model_mean_type = model_mean_type
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas = alphas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: "clip" the log by using beta~_1 at index 0
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1 else np.array([betas[0]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _learned(model_var_type: str) -> bool:
        return model_var_type in ("learned", "learned_range")

    @property
    def learns_variance(self) -> bool:
        return self._learned(self.model_var_type)

    # ------------------------------------------------------------------ network timesteps
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is told for chain index ``t``: the index itself, or
        ``t * 1000 / T`` as float if ``rescale_timesteps``."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0), each broadcastable to x_start."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.ndim)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, ``eps ~ N(0, I)``
        (``noise`` if given, same shape as x_start)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean ``c1 x_0 + c2 x_t``, variance beta~_t and clipped log variance of
        q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.ndim)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """Inverse of ``predict_xstart_from_eps``."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True, model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """The model's Gaussian p(x_{t-1} | x_t) and its x_0 prediction.

        Differentiable w.r.t. ``x`` (no ``no_grad`` inside). ``clip_denoised`` clamps x0_hat to
        [-1, 1] before it enters the mean. Returns ``mean``, ``variance``, ``log_variance``
        (broadcastable to x), ``pred_xstart`` and the raw ``model_output``.
        """
        B, C = x.shape[:2]
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        if self.learns_variance:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance model must output {2 * C} channels, "
                                 f"got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == "learned":
                model_log_variance = model_var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x.ndim)
                max_log = _extract(np.log(self.betas), t, x.ndim)
                frac = (model_var_values + 1.0) / 2.0
                model_log_variance = frac * max_log + (1.0 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape[1] != C:
                raise ValueError(f"a fixed-variance model must output {C} channels, got {model_output.shape[1]}")
            if self.model_var_type == "fixed_large":
                var = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
                log_var = np.log(var)
            else:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract(var, t, x.ndim).expand_as(x)
            model_log_variance = _extract(log_var, t, x.ndim).expand_as(x)

        if self.model_mean_type == "epsilon":
            pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
        else:
            pred_xstart = model_output
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "model_output": model_output}

    def p_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, clip_denoised: bool = True,
                 model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """One reverse step: ``x_{t-1} = mean + exp(log_variance / 2) * noise`` (no noise where
        t == 0). ``noise`` (same shape as x) lets the caller own the random stream.
        Returns ``sample`` and ``pred_xstart``."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model: Callable, shape: Sequence[int], noise: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None, progress: bool = False,
                      clip_denoised: bool = True, device: Optional[torch.device] = None,
                      model_kwargs: Optional[dict] = None,
                      draw: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (``noise`` if given) down to x_0.

        Random numbers are drawn on the CPU from ``generator`` (reproducible across devices)
        and moved to ``device`` (default: the model's device); ``draw`` (a callable returning a
        fresh standard-normal tensor of ``shape`` on ``device``, e.g. per-slice streams) replaces
        them. Returns ``(B, C, H, W)``.
        """
        if device is None:
            device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        shape = tuple(shape)

        def randn():
            if draw is not None:
                return draw()
            return torch.randn(shape, generator=generator).to(device)

        x = noise.to(device) if noise is not None else randn()
        steps = list(range(self.num_timesteps))[::-1]
        for i in progress_bar(steps, desc="sampling", disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            x = self.p_sample(model, x, t, noise=randn() if i > 0 else torch.zeros(shape, device=device),
                              clip_denoised=clip_denoised, model_kwargs=model_kwargs)["sample"]
        return x

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(self, model: Callable, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = False, model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """Variational-bound term per sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, the discretised-Gaussian decoder NLL -log p(x_0|x_1) for t == 0.
        Returns ``output`` (B,) and ``pred_xstart``."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        noise: Optional[torch.Tensor] = None,
                        model_kwargs: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """Per-sample training losses at chain indices ``t`` (B,).

        Hybrid: ``loss = mse + vb`` where ``mse = mean (eps - eps_hat)^2`` and ``vb`` is the
        variational-bound term (bits/dim) with the model mean stop-gradiented, so that only the
        variance learns from it; ``rescaled_hybrid`` multiplies ``vb`` by T/1000.
        Returns ``loss``, ``mse`` and ``vb`` (each ``(B,)``; ``vb`` is zeros when unused).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        zeros = torch.zeros(x_start.shape[0], device=x_start.device)

        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            loss = vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb
            return {"loss": loss, "mse": zeros, "vb": vb}

        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        vb = zeros
        C = x_start.shape[1]
        if self.learns_variance:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance model must output {2 * C} channels, "
                                 f"got {model_output.shape[1]}")
            mean_output, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([mean_output.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(lambda *_args, **_kw: frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_hybrid":
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            mean_output = model_output
        target = noise if self.model_mean_type == "epsilon" else x_start
        mse = mean_flat((target - mean_output.float()) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
