"""Reference-guided iterative refinement: Algorithm 1 of the paper (docs/explanation/algorithm.md).

Notation: ``y0`` the reference batch in [-1, 1], ``(B, 1, H, W)``; the sampler runs on the
respaced chain of ``K`` steps (indices ``0 .. K-1``, ``K = settings.steps``); ``N`` is the diffusion
range in respaced steps, ``D`` the low-pass factor, ``tau`` the guidance step.

    phi_D(x) = up_D(down_D(x))                             (lowpass.LowPass)
    y = q_sample(y0, t = N - 1)                            (one fresh noise draw)
    for i = N-1, ..., 0:
        mean, log_var, x0_hat = p_mean_variance(model, y, i)      # x0_hat clamped to [-1, 1]
        loss = sum_b || phi_D(y0_b) - phi_D(x0_hat_b) ||_2          # per-sample L2 norms, not squared
        g = d loss / d y                                            # through the network
        y = mean + [i > 0] exp(log_var / 2) z_i - tau g             # z_i ~ N(0, I)
    return y                                                        # not clamped

Definition of the first step (this project): a range of N means N reverse steps, i = N-1 .. 0,
and the reference is noised to exactly the level the first network call is told, x_{N-1}
(respaced index N-1, i.e. original timestep ``timesteps[N-1]``). N = 0 returns ``y0`` unchanged;
N = K starts from the chain's last level. DDA's reference noises to level N but starts the loop
at N-1 (the network is told a level one step lower than the noise it sees); that offset is kept
only under ``reference_behaviour``.

Per-sample guidance (default): the loss is the SUM of per-sample norms, so each slice's gradient
depends on that slice alone and results do not depend on batch size or batch neighbours.
``reference_behaviour=True`` reproduces DDA exactly: ONE norm over the whole batch tensor (each
sample's guidance shrinks as the batch grows), the N / N-1 offset above, and a zero-padded
filter. N = 0 returns ``y0`` in both modes; the reference mode needs N < K.

Clamp caveat: x0_hat is clamped to [-1, 1] before the loss (as in the reference), and the clamp
has zero gradient outside its range, so pixels whose prediction saturates receive no guidance at
that step (they are pulled back only through the unsaturated pixels' receptive fields).

Randomness: every slice has its own CPU ``torch.Generator`` seeded from ``(seed, key)``. Per slice
the stream is consumed in a fixed order (the q_sample noise, then one draw per step with i > 0),
so a slice's output depends only on (model, y0 slice, settings, key), on any batch size, device
or number of processes (up to floating-point differences of batched kernels).

Cost: one forward and one backward pass of the network per step; the network's parameters are
frozen during sampling (only the input gradient is computed); with tau = 0 (SDEdit) there is no
backward pass at all.

Projection guidance (``guidance="projection"``, ILVR, Choi et al. 2021): no gradient; after each
reverse step the sample's low-frequency content is replaced by the reference's, noised to the
level the step reached:

    y' = mean + [i > 0] exp(log_var / 2) z_i                      # the ordinary proposal
    y  = y' - phi_D(y') + phi_D(q_sample(y0, i - 1))   for i > 0  # fresh noise from the slice's stream
    y  = y' - phi_D(y') + phi_D(y0)                    for i = 0  # the clean reference at the end

It needs one forward pass per step under ``torch.no_grad()`` and ignores ``tau``. With D = 1
(phi_D the identity) every step returns the noised reference exactly, and the output is ``y0``.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Sequence, Tuple, Union

import torch

from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion

from nnunet_sddm.sampling.lowpass import PADDINGS, LowPass
from nnunet_sddm.utilities.errors import SDDMError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: How the sampler conditions on the reference: DDA's gradient step (the paper's) or ILVR's projection.
GUIDANCE_MODES = ("gradient", "projection")


@dataclass
class SamplerSettings:
    """Settings of the guided sampler (validated on construction; ``SDDMError`` if invalid).

    D: low-pass factor (power of 2; 1 = no filtering); N: diffusion range in respaced steps
    (0 <= N <= steps); tau: guidance step (>= 0; 0 = unguided SDEdit); steps: respaced chain
    length K; seed: base seed of the per-slice random streams; reference_behaviour: DDA's exact
    behaviour (see the module docstring); padding: border handling of phi_D (default: "zero" in
    reference mode, else "reflect"); clip_denoised: clamp x0_hat to [-1, 1]; guidance:
    ``"gradient"`` (DDA, the paper's; default) or ``"projection"`` (ILVR: no backward pass, tau
    unused; see the module docstring).
    """

    D: int = 2
    N: int = 25
    tau: float = 6.0
    steps: int = 100
    seed: int = 0
    reference_behaviour: bool = False
    padding: Optional[str] = None
    clip_denoised: bool = True
    guidance: str = "gradient"

    def __post_init__(self) -> None:
        for name in ("D", "N", "steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SDDMError(f"sampler setting {name} must be an integer, got {value!r}")
        self.tau = float(self.tau)
        if self.D < 1 or self.D & (self.D - 1):
            raise SDDMError(f"low-pass factor D must be a power of 2 (1, 2, 4, 8, ...), got {self.D}")
        if self.steps < 1:
            raise SDDMError(f"--steps (respaced chain length K) must be >= 1, got {self.steps}")
        if self.N < 0:
            raise SDDMError(f"diffusion range N must be >= 0, got {self.N}")
        if self.N > self.steps:
            raise SDDMError(f"diffusion range N={self.N} exceeds the respaced chain length K={self.steps}")
        if self.reference_behaviour and self.N == self.steps:
            raise SDDMError(f"the reference behaviour noises to level N, so it needs N < K "
                            f"(got N = K = {self.steps})")
        if not self.tau >= 0.0 or self.tau == float("inf"):
            raise SDDMError(f"guidance step tau must be a finite number >= 0, got {self.tau}")
        if self.seed < 0:
            raise SDDMError(f"seed must be >= 0, got {self.seed}")
        if self.guidance not in GUIDANCE_MODES:
            raise SDDMError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.guidance!r}")
        if self.reference_behaviour and self.guidance != "gradient":
            raise SDDMError("the reference behaviour reproduces DDA's gradient guidance: it cannot be combined "
                            "with --guidance projection")
        if self.padding is None:
            self.padding = "zero" if self.reference_behaviour else "reflect"
        if self.padding not in PADDINGS:
            raise SDDMError(f"low-pass padding must be one of {PADDINGS}, got {self.padding!r}")

    def check_model(self, image_size: int, num_timesteps: int, name: str = "model") -> None:
        """Raise ``SDDMError`` if these settings do not fit a model of side ``image_size``
        trained with ``num_timesteps`` diffusion steps."""
        if self.D >= image_size:
            raise SDDMError(f"low-pass factor D={self.D} must be smaller than the {name}'s image size "
                            f"{image_size}")
        if image_size % self.D:
            raise SDDMError(f"the {name}'s image size {image_size} is not divisible by D={self.D}")
        if self.steps > num_timesteps:
            raise SDDMError(f"--steps {self.steps} exceeds the {name}'s {num_timesteps} diffusion steps")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def replace(self, **changes) -> "SamplerSettings":
        """A validated copy with some fields changed."""
        d = self.to_dict()
        if "reference_behaviour" in changes and "padding" not in changes:
            d["padding"] = None
        d.update(changes)
        return SamplerSettings(**d)


def slice_seed(seed: int, key: str) -> int:
    """The 63-bit seed of the random stream of slice ``key`` under base ``seed``."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SliceNoise:
    """Per-slice Gaussian streams: ``draw()`` returns ``(B, *shape)`` with row b from stream b.

    Drawn on the CPU (identical on every device) and moved to ``device`` in one copy.
    """

    def __init__(self, seed: int, keys: Sequence[str], shape: Tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(slice_seed(seed, k)) for k in keys]
        self.shape, self.device = tuple(shape), device
        self._buffer = torch.empty((len(keys),) + self.shape)

    def draw(self) -> torch.Tensor:
        for b, g in enumerate(self.generators):
            torch.randn(self.shape, generator=g, out=self._buffer[b])
        return self._buffer.to(self.device, copy=True)  # synchronous: the buffer is reused


class SamplingModel(Protocol):
    """What the sampler needs of a trained model (``diffusion.model_folder.LoadedModel`` is one):
    the denoiser, its full T-step diffusion, and the chain respaced to K steps."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion

    def spaced_diffusion(self, num_steps: Optional[int] = None) -> GaussianDiffusion: ...


#: A ``SamplingModel``, or a ``(network, diffusion)`` pair whose diffusion is already the K-step chain.
ModelAndChain = Union[SamplingModel, Tuple[torch.nn.Module, GaussianDiffusion]]


def _model_and_diffusion(loaded_or_pair: ModelAndChain, steps: int) -> Tuple[torch.nn.Module, GaussianDiffusion]:
    """The network and the K-step chain: a ``SamplingModel`` respaced to ``steps``, or a
    ``(model, diffusion)`` pair whose diffusion is already the K-step chain."""
    if isinstance(loaded_or_pair, (tuple, list)):
        model, diffusion = loaded_or_pair
        if diffusion.num_timesteps != steps:
            raise SDDMError(f"the diffusion has {diffusion.num_timesteps} steps but settings.steps = {steps}")
        return model, diffusion
    loaded = loaded_or_pair
    if steps == loaded.diffusion.num_timesteps:
        return loaded.model, loaded.diffusion
    key = (id(loaded.diffusion), steps)
    if key not in _SPACED or _SPACED[key][0] is not loaded.diffusion:
        _SPACED[key] = (loaded.diffusion, loaded.spaced_diffusion(steps))
    return loaded.model, _SPACED[key][1]


#: Respaced chains built so far, keyed by (id of the full diffusion, K); the full diffusion is
#: kept in the value so that its id cannot be reused while the entry exists.
_SPACED: Dict[Tuple[int, int], Tuple[GaussianDiffusion, GaussianDiffusion]] = {}


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no parameter gradients for the duration (restored afterwards)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise SDDMError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if device.type == "cpu" and amp != "bf16":
        raise SDDMError("on the CPU only --amp bf16 is supported")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def guided_sample(loaded_or_model_diffusion: ModelAndChain, y0: torch.Tensor, settings: SamplerSettings,
                  keys: Sequence[str], amp: Optional[str] = None, channels_last: bool = True,
                  on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Algorithm 1 on a batch of reference slices.

    Args:
        loaded_or_model_diffusion: a ``SamplingModel`` (e.g. a ``LoadedModel``) or a ``(model, diffusion)`` pair whose
            diffusion already has ``settings.steps`` steps.
        y0: ``(B, 1, H, W)`` reference slices in [-1, 1] (any device; the model's is used).
        settings: validated sampler settings.
        keys: ``B`` unique strings naming the slices (e.g. ``"case/z"``): their random streams.
        amp: None (fp32), ``"bf16"`` or ``"fp16"`` autocast of the network (fp16: CUDA only).
        channels_last: run the network in channels-last memory format (faster convolutions on
            CUDA and with oneDNN on the CPU; converts the model's parameters in place).
        on_step: called as ``on_step(i, y)`` after reverse step ``i`` (``y`` the sample at level
            ``i - 1``; at ``i = 0`` the output), for inspection; must not modify ``y``.

    Returns:
        ``(B, 1, H, W)`` float32 adapted slices on ``y0``'s device (not clamped).
    """
    if y0.ndim != 4 or y0.shape[1] != 1:
        raise SDDMError(f"guided_sample expects (B, 1, H, W) reference slices, got {tuple(y0.shape)}")
    if len(keys) != y0.shape[0]:
        raise SDDMError(f"{len(keys)} keys for {y0.shape[0]} slices")
    if len(set(keys)) != len(keys):
        raise SDDMError("slice keys must be unique within a batch")
    if settings.N == 0:
        return y0.detach().float().clone()
    model, diffusion = _model_and_diffusion(loaded_or_model_diffusion, settings.steps)
    device = next(model.parameters()).device
    out_device = y0.device
    B, _, H, W = y0.shape
    y0 = y0.detach().to(device=device, dtype=torch.float32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        y0 = y0.contiguous(memory_format=torch.channels_last)
    noise = SliceNoise(settings.seed, list(keys), (1, H, W), device)
    lowpass = LowPass.get(H, W, settings.D, settings.padding, device)
    target = lowpass(y0)
    reference = settings.reference_behaviour
    start = settings.N if reference else settings.N - 1
    t = torch.full((B,), start, dtype=torch.long, device=device)
    y = diffusion.q_sample(y0, t, noise=noise.draw())
    project = settings.guidance == "projection"
    guide = settings.tau > 0.0 and not project
    autocast = _autocast(device, amp)
    with frozen(model):
        for i in range(settings.N - 1, -1, -1):
            t.fill_(i)
            with torch.set_grad_enabled(guide):
                if guide:
                    y.requires_grad_(True)
                with autocast:
                    out = diffusion.p_mean_variance(model, y, t, clip_denoised=settings.clip_denoised)
                if guide:
                    residual = target - lowpass(out["pred_xstart"].float())
                    if reference:
                        loss = torch.linalg.vector_norm(residual)
                    else:
                        loss = torch.linalg.vector_norm(residual.flatten(1), dim=1).sum()
                    grad = torch.autograd.grad(loss, y)[0]
            with torch.no_grad():
                y_next = out["mean"].detach().float()
                if i > 0:
                    y_next = y_next + torch.exp(0.5 * out["log_variance"].detach().float()) * noise.draw()
                if guide:
                    y_next = y_next - settings.tau * grad
                if project:
                    if i > 0:
                        t.fill_(i - 1)
                        reference_low = lowpass(diffusion.q_sample(y0, t, noise=noise.draw()))
                    else:
                        reference_low = target
                    y_next = y_next - lowpass(y_next) + reference_low
            y = y_next
            if on_step is not None:
                on_step(i, y)
    return y.detach().float().contiguous().to(out_device)
