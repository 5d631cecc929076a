"""Projection guidance (ILVR): D = 1 returns the noised reference at every step, the output's
low-pass follows the reference's, no backward pass, per-slice streams, settings checks."""
from __future__ import annotations

import pytest
import torch
from _micro_model import one_torch_thread
from test_sampling_guided import KEYS, micro_model, refs  # noqa: F401  (fixture)

from nnunet_sddm.sampling.guided import SamplerSettings, SliceNoise, guided_sample
from nnunet_sddm.sampling.lowpass import LowPass
from nnunet_sddm.utilities.errors import SDDMError

PROJ = SamplerSettings(N=5, steps=10, seed=3, D=2, guidance="projection")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with one_torch_thread():
        yield micro_model(tmp_path_factory.mktemp("micro"))


def test_d1_projection_is_the_noised_reference_at_every_step(loaded, refs):
    s = PROJ.replace(D=1)
    y0 = refs[:3]
    seen = {}
    out = guided_sample(loaded, y0, s, KEYS[:3], on_step=lambda i, y: seen.__setitem__(i, y.clone()))
    assert sorted(seen) == list(range(s.N))
    torch.testing.assert_close(out, y0, atol=1e-5, rtol=0)
    # the same draws, replayed: q_sample noise, then per step i > 0 the proposal's and the reference's noise
    spaced = loaded.spaced_diffusion(s.steps)
    noise = SliceNoise(s.seed, KEYS[:3], (1, 32, 32), torch.device("cpu"))
    noise.draw()
    for i in range(s.N - 1, 0, -1):
        noise.draw()
        t = torch.full((3,), i - 1, dtype=torch.long)
        expected = spaced.q_sample(y0, t, noise=noise.draw())
        torch.testing.assert_close(seen[i], expected, atol=1e-5, rtol=0)


def test_projection_output_follows_the_reference_low_pass(loaded, refs):
    phi = LowPass(32, 32, 2, "reflect")

    def distance(out):
        return float(torch.linalg.vector_norm((phi(out) - phi(refs[:8])).flatten(1), dim=1).mean())

    free = distance(guided_sample(loaded, refs[:8], PROJ.replace(guidance="gradient", tau=0.0), KEYS[:8]))
    projected = distance(guided_sample(loaded, refs[:8], PROJ, KEYS[:8]))
    assert projected < 0.25 * free
    # within the noise level of the last step: the reference's own low-pass deviation under phi twice
    assert projected <= 1.1 * float(torch.linalg.vector_norm((phi(phi(refs[:8])) - phi(refs[:8])).flatten(1),
                                                              dim=1).mean()) + 0.05


def test_projection_needs_no_gradient_and_ignores_tau(loaded, refs):
    calls = []
    hook = loaded.model.register_full_backward_hook(lambda *a: calls.append(1))
    try:
        a = guided_sample(loaded, refs[:2], PROJ, KEYS[:2])
    finally:
        hook.remove()
    assert not calls
    torch.testing.assert_close(guided_sample(loaded, refs[:2], PROJ.replace(tau=0.0), KEYS[:2]), a)
    batched = guided_sample(loaded, refs[:4], PROJ, KEYS[:4])[:2]  # per-slice streams: batch-independent
    torch.testing.assert_close(batched, a, atol=1e-5, rtol=0)
    assert not torch.allclose(guided_sample(loaded, refs[:2], PROJ.replace(seed=9), KEYS[:2]), a)


def test_projection_settings():
    with pytest.raises(SDDMError, match="--guidance must be one of"):
        SamplerSettings(guidance="ilvr")
    with pytest.raises(SDDMError, match="reference behaviour"):
        SamplerSettings(guidance="projection", reference_behaviour=True)
    assert SamplerSettings().guidance == "gradient"
    assert SamplerSettings(guidance="projection").to_dict()["guidance"] == "projection"
