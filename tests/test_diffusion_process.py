"""Closed-form checks of the improved-DDPM process, losses and respacing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from nnunet_sddm.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from nnunet_sddm.diffusion.respace import SpacedDiffusion, space_timesteps
from nnunet_sddm.diffusion.timestep_sampler import LossSecondMomentResampler, UniformSampler


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is faster



@pytest.mark.parametrize("T", [1000, 2000, 4000])
def test_linear_schedule_closed_form(T):
    b = get_named_beta_schedule("linear", T)
    s = 1000.0 / T
    assert b.shape == (T,) and b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4 * s) and b[-1] == pytest.approx(0.02 * s)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) * s / (T - 1))


def test_cosine_schedule_closed_form():
    T = 1000
    b = get_named_beta_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 1, 500, 998):
        assert b[i] == pytest.approx(1 - f((i + 1) / T) / f(i / T), rel=1e-12)
    assert b[-1] == 0.999  # clipped
    # abar of the schedule equals the continuous abar(i/T) / abar(0) (before clipping)
    abar = np.cumprod(1 - b)
    assert abar[499] == pytest.approx(f(500 / T) / f(0), rel=1e-9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_moments():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.6)
    for t_val in (0, 300, 999):
        t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
        xt = d.q_sample(x0, t)
        abar = d.alphas_cumprod[t_val]
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar, abs=0.01 + 0.02 * (1 - abar))


def test_posterior_coefficients_closed_form():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    b, abar = d.betas, d.alphas_cumprod
    for t in (1, 50, 99):
        assert d.posterior_variance[t] == pytest.approx(b[t] * (1 - abar[t - 1]) / (1 - abar[t]))
        assert d.posterior_mean_coef1[t] == pytest.approx(b[t] * math.sqrt(abar[t - 1]) / (1 - abar[t]))
        assert d.posterior_mean_coef2[t] == pytest.approx((1 - abar[t - 1]) * math.sqrt(1 - b[t]) / (1 - abar[t]))
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]))
    # the posterior is the product of Gaussians: check against Bayes' rule for one t numerically
    t = 50
    x0, xt = 0.3, -0.7
    prior_mean, prior_var = math.sqrt(abar[t - 1]) * x0, 1 - abar[t - 1]  # q(x_{t-1}|x0)
    a = 1 - b[t]  # q(x_t|x_{t-1}) = N(sqrt(a) x_{t-1}, b)
    post_var = 1 / (1 / prior_var + a / b[t])
    post_mean = post_var * (prior_mean / prior_var + math.sqrt(a) * xt / b[t])
    assert post_var == pytest.approx(d.posterior_variance[t], rel=1e-9)
    assert post_mean == pytest.approx(d.posterior_mean_coef1[t] * x0 + d.posterior_mean_coef2[t] * xt, rel=1e-9)


def test_xstart_eps_roundtrip():
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 50))
    x0, eps = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 10, 30, 40])  # float32: 1/sqrt(abar) amplifies rounding near T
    xt = d.q_sample(x0, t, noise=eps)
    assert torch.allclose(d.predict_xstart_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(d.predict_eps_from_xstart(xt, t, x0), eps, atol=1e-2)


def test_normal_kl_against_analytic():
    m1, m2, s1, s2 = 0.3, -0.5, 0.7, 1.3
    expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = normal_kl(torch.tensor(m1), torch.tensor(2 * math.log(s1)), torch.tensor(m2),
                    torch.tensor(2 * math.log(s2)))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_discretized_likelihood_sums_to_one():
    bins = torch.linspace(-1, 1, 256)
    means, log_scales = torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3))
    p = discretized_gaussian_log_likelihood(bins, means, log_scales).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=2e-3)


class _ConstModel(torch.nn.Module):
    """Returns fixed [eps, v] regardless of the input."""

    def __init__(self, eps, v):
        super().__init__()
        self.eps, self.v = eps, v

    def forward(self, x, t):
        return torch.cat([self.eps.expand_as(x), self.v.expand_as(x)], dim=1)


def test_vb_term_equals_analytic_gaussian_kl():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000), loss_type="hybrid")
    torch.manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    eps_hat, v = torch.tensor(0.2), torch.tensor(-0.4)
    model = _ConstModel(eps_hat, v)
    t = torch.tensor([5, 400, 999])
    xt = d.q_sample(x0, t)
    vb = d.vb_terms_bpd(model, x0, xt, t)["output"]
    for i, ti in enumerate(t.tolist()):
        # true posterior
        mu = d.posterior_mean_coef1[ti] * x0[i].double() + d.posterior_mean_coef2[ti] * xt[i].double()
        var = d.posterior_variance[ti]
        # model: x0_hat (unclipped), mean, learned-range variance
        x0h = (xt[i].double() - math.sqrt(1 - d.alphas_cumprod[ti]) * 0.2) / math.sqrt(d.alphas_cumprod[ti])
        mu_m = d.posterior_mean_coef1[ti] * x0h + d.posterior_mean_coef2[ti] * xt[i].double()
        frac = (-0.4 + 1) / 2
        logvar_m = frac * math.log(d.betas[ti]) + (1 - frac) * math.log(var)
        var_m = math.exp(logvar_m)
        kl = 0.5 * (math.log(var_m / var) + var / var_m + (mu - mu_m) ** 2 / var_m - 1)
        assert vb[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=2e-3)


def test_hybrid_loss_mean_is_stop_gradiented():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100), loss_type="hybrid")
    eps = torch.zeros(1, 1, 1, 1, requires_grad=True)
    v = torch.zeros(1, 1, 1, 1, requires_grad=True)
    model = lambda x, t: torch.cat([eps.expand_as(x), v.expand_as(x)], 1)
    x0, noise = torch.full((2, 1, 4, 4), 0.5), torch.randn(2, 1, 4, 4)
    t = torch.tensor([3, 60])
    out = d.training_losses(model, x0, t, noise=noise)
    assert set(out) >= {"loss", "mse", "vb"} and out["loss"].shape == (2,)
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])
    g_eps_vb = torch.autograd.grad(out["vb"].sum(), eps, retain_graph=True, allow_unused=True)[0]
    assert g_eps_vb is None or g_eps_vb.abs().max() == 0
    assert torch.autograd.grad(out["vb"].sum(), v)[0].abs().item() > 0
    # rescaled variant: vb * T/1000
    d2 = GaussianDiffusion(d.betas, loss_type="rescaled_hybrid")
    out2 = d2.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(out2["vb"], out["vb"] * 0.1)


def test_learned_variance_within_bounds():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    x = torch.randn(5, 1, 2, 2)
    t = torch.tensor([1, 10, 100, 500, 999])
    for v in (-1.0, -0.3, 0.5, 1.0):
        out = d.p_mean_variance(_ConstModel(torch.tensor(0.0), torch.tensor(v)), x, t)
        lo = torch.from_numpy(d.posterior_variance[t.numpy()]).float().reshape(-1, 1, 1, 1)
        hi = torch.from_numpy(d.betas[t.numpy()]).float().reshape(-1, 1, 1, 1)
        assert (out["variance"] >= lo * (1 - 1e-5)).all() and (out["variance"] <= hi * (1 + 1e-5)).all()
    out = d.p_mean_variance(_ConstModel(torch.tensor(0.0), torch.tensor(1.0)), x, t)
    assert torch.allclose(out["variance"][:, 0, 0, 0], torch.from_numpy(d.betas[t.numpy()]).float(), rtol=1e-5)


def test_p_mean_variance_is_differentiable_in_x():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    model = lambda x, t: torch.cat([0.5 * x, torch.zeros_like(x)], 1)
    out = d.p_sample(model, x, torch.tensor([10, 0]), noise=torch.zeros_like(x))
    g = torch.autograd.grad(out["pred_xstart"].sum(), x)[0]
    assert g.abs().sum() > 0


def test_p_sample_no_noise_at_t0():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    model = _ConstModel(torch.tensor(0.0), torch.tensor(0.0))
    x = torch.randn(2, 1, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    a = d.p_sample(model, x, t, noise=torch.randn_like(x))["sample"]
    b = d.p_sample(model, x, t, noise=torch.randn_like(x))["sample"]
    assert torch.equal(a, b)


def test_space_timesteps_guided_rule():
    steps = space_timesteps(1000, 100)
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999
    assert steps[:5] == [0, 10, 20, 30, 40]
    assert steps == sorted({round(i * 999 / 99) for i in range(100)})
    assert space_timesteps(1000, 1000) == list(range(1000))
    # two sections of 50 steps, stride 49/9 = 5.44 each, rounded
    assert space_timesteps(100, "10,10") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49,
                                             50, 55, 61, 66, 72, 77, 83, 88, 94, 99]
    with pytest.raises(ValueError):
        space_timesteps(10, 20)


def _guided_diffusion_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion's ``space_timesteps`` (respace.py), restated: the float stride is added up."""
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def test_space_timesteps_equals_guided_diffusion_where_rounding_k_times_stride_differs():
    # the paper's schedules: round(12 * 1999 / 24) = round(999.5) = 1000, the accumulated sum gives 999
    assert space_timesteps(2000, 25)[12] == 999 and space_timesteps(3000, 25)[12] == 1499
    differing = [K for K in range(2, 1001) if [round(k * (999 / (K - 1))) for k in range(K)]
                 != sorted(_guided_diffusion_space_timesteps(1000, [K]))]  # the rule round(k * stride)
    assert len(differing) > 100 and differing[:3] == [21, 23, 31]
    for T, counts in [(2000, [25]), (3000, [25]), (1000, [21]), (1000, [59]), (1000, [1]), (1000, [10, 21, 7]),
                      (4000, [25, 100])] + [(1000, [K]) for K in differing]:
        assert space_timesteps(T, counts) == sorted(_guided_diffusion_space_timesteps(T, counts)), (T, counts)


def test_spaced_abar_equals_original_and_original_indices():
    betas = get_named_beta_schedule("linear", 1000)
    base = GaussianDiffusion(betas)
    kept = space_timesteps(1000, 25)
    sd = SpacedDiffusion(kept, betas=betas)
    assert sd.num_timesteps == 25
    assert np.allclose(sd.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    seen = []
    model = lambda x, t: (seen.append(t.clone()), torch.zeros(x.shape[0], 2, *x.shape[2:]))[1]
    sd.p_mean_variance(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 12, 24]))
    assert seen[0].tolist() == [kept[0], kept[12], kept[24]]
    # rescaled timesteps are scaled by 1000 / T_original
    sd2 = SpacedDiffusion(space_timesteps(2000, 10), betas=get_named_beta_schedule("linear", 2000),
                          rescale_timesteps=True)
    assert sd2.model_timesteps(torch.tensor([9])).item() == pytest.approx(1999 * 0.5)


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    t, w = UniformSampler(10).sample(1000, "cpu", g)
    assert t.min() >= 0 and t.max() <= 9 and torch.allclose(w, torch.ones(1000))
    s = LossSecondMomentResampler(4, history_per_term=2, uniform_prob=0.0)
    assert np.allclose(s.weights(), 1)
    for _ in range(2):
        s.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    assert s.warmed_up()
    assert np.allclose(s.weights(), [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    t, w = s.sample(20000, "cpu", g)
    assert (t == 3).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # importance weights keep E[w L] unbiased: w = 1 / (T p)
    assert w[t == 3][0].item() == pytest.approx(1 / (4 * 0.5))
    s2 = LossSecondMomentResampler(4, history_per_term=2, uniform_prob=0.0)
    s2.load_state_dict(s.state_dict())
    assert np.allclose(s2.weights(), s.weights())
