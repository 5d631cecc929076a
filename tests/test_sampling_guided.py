"""The guided sampler (Algorithm 1): settings validation, N = 0, tau = 0 = SDEdit, per-slice
streams (batch-size independence), the reference behaviour's batch coupling and N / N-1 offset,
and that guidance pulls the sample towards the reference."""
from __future__ import annotations

import pytest
import torch
from _micro_model import MICRO, one_torch_thread

from nnunet_sddm.sampling.guided import SamplerSettings, SliceNoise, guided_sample, slice_seed
from nnunet_sddm.sampling.lowpass import LowPass
from nnunet_sddm.utilities.errors import SDDMError


def micro_model(folder):
    """An untrained 32 x 32 model whose (zero-initialised) output layer is randomised, so the
    network's output and its gradient are not trivially zero."""
    from nnunet_sddm.diffusion.model_folder import create_model_folder, load_model

    loaded = load_model(create_model_folder(folder, "tiny", overrides=MICRO, seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.startswith("out."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return loaded


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    with one_torch_thread():  # tiny tensors: one thread is faster and immune to oversubscription
        yield micro_model(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def refs():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    base = torch.where(yy ** 2 + xx ** 2 < 0.5, 0.6, -0.6)
    return (base + 0.2 * torch.randn(16, 1, 32, 32, generator=g)).clamp(-1, 1)


KEYS = [f"case{i // 4}/{i % 4}" for i in range(16)]


@pytest.mark.parametrize("kwargs,match", [
    ({"D": 3}, "power of 2"), ({"D": 0}, "power of 2"), ({"N": 101}, "exceeds"), ({"N": -1}, ">= 0"),
    ({"tau": -1.0}, "tau"), ({"tau": float("nan")}, "tau"), ({"steps": 0}, "steps"),
    ({"N": 100, "reference_behaviour": True}, "N < K"), ({"padding": "wrap"}, "padding"),
    ({"D": 2.0}, "integer"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(SDDMError, match=match):
        SamplerSettings(**kwargs)


def test_settings_against_model(loaded):
    with pytest.raises(SDDMError, match="smaller than"):
        SamplerSettings(D=32).check_model(loaded.image_size, loaded.diffusion.num_timesteps)
    with pytest.raises(SDDMError, match="diffusion steps"):
        SamplerSettings(steps=100).check_model(loaded.image_size, loaded.diffusion.num_timesteps)
    SamplerSettings(D=16, steps=50).check_model(loaded.image_size, loaded.diffusion.num_timesteps)
    assert SamplerSettings().padding == "reflect"
    assert SamplerSettings(reference_behaviour=True).padding == "zero"
    assert SamplerSettings(N=99, steps=100).replace(reference_behaviour=True, N=10).padding == "zero"


def test_n0_is_identity(loaded, refs):
    out = guided_sample(loaded, refs, SamplerSettings(N=0, steps=10), KEYS)
    assert torch.equal(out, refs)


def unguided_chain(loaded, diffusion, y0, noise: SliceNoise, noise_level: int, first_step: int) -> torch.Tensor:
    """Plain SDEdit: ``y0`` noised to ``noise_level``, then the diffusion's own p_sample from
    ``first_step`` down to 0, with the per-slice noise streams in the sampler's order."""
    b = y0.shape[0]
    x = diffusion.q_sample(y0, torch.full((b,), noise_level), noise=noise.draw())
    with torch.no_grad():
        for i in range(first_step, -1, -1):
            x = diffusion.p_sample(loaded.model, x, torch.full((b,), i),
                                   noise=noise.draw() if i > 0 else None)["sample"]
    return x


def test_tau0_is_sdedit(loaded, refs):
    """tau = 0: noise to level N-1, then N plain reverse steps of the diffusion's own p_sample,
    with the same per-slice noise streams."""
    s = SamplerSettings(N=3, steps=10, tau=0.0, seed=5)
    got = guided_sample(loaded, refs[:4], s, KEYS[:4])
    diffusion = loaded.spaced_diffusion(10)
    x = unguided_chain(loaded, diffusion, refs[:4], SliceNoise(5, KEYS[:4], (1, 32, 32), torch.device("cpu")),
                       noise_level=2, first_step=2)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=0)
    guided = guided_sample(loaded, refs[:4], s.replace(tau=6.0), KEYS[:4])
    assert (guided - got).abs().max() > 1e-3


def test_same_seed_same_output_for_batch_1_and_16(loaded, refs):
    s = SamplerSettings(N=3, steps=10, seed=3)
    batched = guided_sample(loaded, refs, s, KEYS)
    single = torch.cat([guided_sample(loaded, refs[i:i + 1], s, KEYS[i:i + 1]) for i in range(16)])
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=0)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = guided_sample(loaded, refs[perm], s, [KEYS[i] for i in perm])
    torch.testing.assert_close(shuffled, batched[perm], atol=2e-5, rtol=0)
    other_seed = guided_sample(loaded, refs[:2], s.replace(seed=4), KEYS[:2])
    assert (other_seed - batched[:2]).abs().max() > 1e-3


def test_reference_behaviour_couples_the_batch_and_offsets_n(loaded, refs):
    s = SamplerSettings(N=3, steps=10, seed=1, reference_behaviour=True)
    alone = guided_sample(loaded, refs[:1], s, KEYS[:1])
    in_batch = guided_sample(loaded, refs[:4], s, KEYS[:4])[:1]
    assert (alone - in_batch).abs().max() > 1e-4  # one norm over the batch: neighbours matter
    # reference noising: level N, first network call at N-1
    s0 = s.replace(tau=0.0)
    diffusion = loaded.spaced_diffusion(10)
    x = unguided_chain(loaded, diffusion, refs[:2], SliceNoise(1, KEYS[:2], (1, 32, 32), torch.device("cpu")),
                       noise_level=3, first_step=2)
    torch.testing.assert_close(guided_sample(loaded, refs[:2], s0, KEYS[:2]), x, atol=1e-5, rtol=0)


def test_guidance_pulls_towards_the_reference(loaded, refs):
    s = SamplerSettings(N=5, steps=10, seed=2, D=2)
    phi = LowPass(32, 32, 2, "reflect")

    def distance(out):
        return torch.linalg.vector_norm((phi(out) - phi(refs[:8])).flatten(1), dim=1).mean()

    free = distance(guided_sample(loaded, refs[:8], s.replace(tau=0.0), KEYS[:8]))
    guided = distance(guided_sample(loaded, refs[:8], s, KEYS[:8]))
    assert guided < 0.9 * free


def test_bad_calls(loaded, refs):
    s = SamplerSettings(N=1, steps=10)
    with pytest.raises(SDDMError, match="keys"):
        guided_sample(loaded, refs[:2], s, KEYS[:3])
    with pytest.raises(SDDMError, match="unique"):
        guided_sample(loaded, refs[:2], s, ["a", "a"])
    with pytest.raises(SDDMError, match=r"\(B, 1, H, W\)"):
        guided_sample(loaded, refs[:2, 0], s, KEYS[:2])
    with pytest.raises(SDDMError, match="bf16"):
        guided_sample(loaded, refs[:2], s, KEYS[:2], amp="fp16")
    fp32 = guided_sample(loaded, refs[:2], s, KEYS[:2])
    bf16 = guided_sample(loaded, refs[:2], s, KEYS[:2], amp="bf16")
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1
    assert slice_seed(0, "a/1") != slice_seed(0, "a/2") != slice_seed(1, "a/1")
