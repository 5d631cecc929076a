"""Timestep samplers for training: uniform, and loss-aware importance sampling.

``sample(batch_size, device, generator)`` returns indices ``t`` (LongTensor (B,)) and importance
weights ``w`` (float (B,)) such that ``E[w * L_t]`` is the uniform average of ``L_t``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch


class ScheduleSampler:
    """Base: draws t with probabilities ``weights() / sum``."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights ``(T,)``, all positive."""
        raise NotImplementedError

    def sample(self, batch_size: int, device, generator: Optional[torch.Generator] = None):
        """``t`` ``(B,)`` long and importance weights ``1 / (T p_t)`` ``(B,)`` float on ``device``."""
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (no-op unless loss-aware)."""

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class UniformSampler(ScheduleSampler):
    """p_t = 1/T."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentResampler(ScheduleSampler):
    """Improved DDPM's importance sampling of L_vb: p_t proportional to sqrt(E[L_t^2]) over the
    last ``history_per_term`` losses of each t (uniform until every t has a full history),
    mixed with ``uniform_prob`` of uniform. Under DDP, pass the losses of ALL ranks to
    ``update`` (gathered by the trainer) so that every rank keeps the same history."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term, self.uniform_prob = int(history_per_term), float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().float().cpu().tolist()):
            if self.loss_counts[ti] == self.history_per_term:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, self.loss_counts[ti]] = li
                self.loss_counts[ti] += 1

    def state_dict(self) -> Dict:
        return {"loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state: Dict) -> None:
        self.loss_history = state["loss_history"].numpy().astype(np.float64)
        self.loss_counts = state["loss_counts"].numpy().astype(np.int64)


def create_named_schedule_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    """``"uniform"`` or ``"loss-second-moment"``."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r} (uniform or loss-second-moment)")
