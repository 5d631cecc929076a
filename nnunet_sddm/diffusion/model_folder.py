"""Model folders: one directory per trained (or imported) diffusion model.

Layout::

    MODEL_DIR/config.json            model, diffusion, data and training settings + package version
    MODEL_DIR/ema.safetensors        EMA weights (used for sampling)
    MODEL_DIR/model.safetensors      raw weights
    MODEL_DIR/training_state.pt      optimizer, sampler, RNG and data-order state (weights_only-loadable)
    MODEL_DIR/log.csv, progress.png, samples.png

Default location for a dataset: ``$nnUNet_results/DatasetXXX_Name/sddm__<preset>/``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

import nnunet_sddm
from nnunet_sddm.diffusion.factory import create_diffusion, create_model
from nnunet_sddm.diffusion.gaussian_diffusion import GaussianDiffusion
from nnunet_sddm.diffusion.presets import DEFAULT_PRESET, apply_overrides, preset_config
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path, read_json, write_json
from nnunet_sddm.utilities.nnunet_paths import (datasets_with_id, parse_dataset_folder_name, raw_root,
                                                results_root)

CONFIG_FILE = "config.json"
EMA_FILE = "ema.safetensors"
RAW_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"


def model_folder_name(preset: str) -> str:
    """``sddm__<preset>``."""
    return f"sddm__{preset}"


def save_weights(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write a state dict as safetensors, atomically (tensors copied to contiguous CPU memory)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_weights(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a safetensors state dict (``SDDMError`` if missing or corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as e:
        raise SDDMError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def save_config(config: Mapping[str, Any], out_dir: Union[str, os.PathLike]) -> Path:
    """Write ``config.json`` (adds ``package_version``)."""
    cfg = dict(config)
    cfg["package_version"] = nnunet_sddm.__version__
    path = Path(out_dir) / CONFIG_FILE
    write_json(cfg, path)
    return path


def load_config(model_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read ``config.json`` of a model folder."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise SDDMError(f"{path}: missing; {Path(model_dir)} is not a model folder")
    cfg = read_json(path)
    for section in ("model", "diffusion"):
        if section not in cfg:
            raise SDDMError(f"{path}: section {section!r} is missing")
    return cfg


def save_model_folder(out_dir: Union[str, os.PathLike], model: torch.nn.Module, config: Mapping[str, Any],
                      ema_state: Optional[Mapping[str, torch.Tensor]] = None,
                      training_state: Optional[Mapping[str, Any]] = None) -> Path:
    """Write config, raw weights, EMA weights (``ema_state``, default: the raw weights) and the
    optional ``training_state`` (saved with ``torch.save``; must hold only tensors, numbers,
    strings, lists and dicts so that ``weights_only`` loading works). Each file is atomic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = _unwrap(model).state_dict()
    save_weights(raw, out_dir / RAW_FILE)
    save_weights(ema_state if ema_state is not None else raw, out_dir / EMA_FILE)
    if training_state is not None:
        with atomic_path(out_dir / STATE_FILE) as tmp:
            torch.save(dict(training_state), tmp)
    save_config(config, out_dir)
    return out_dir


def load_training_state(model_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """``training_state.pt`` loaded with ``weights_only=True`` (None if absent)."""
    path = Path(model_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SDDMError(f"{path}: cannot read training state ({type(e).__name__}: {e})") from None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def create_model_folder(out_dir: Union[str, os.PathLike], preset: str = DEFAULT_PRESET,
                        overrides: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Path:
    """A model folder with a randomly initialised model (seeded): for tests and demos.

    Note that the UNet's output layer is zero-initialised (as in guided-diffusion), so an
    untrained model predicts eps = 0 and v = 0."""
    cfg = apply_overrides(preset_config(preset), overrides)
    torch.manual_seed(seed)
    model = create_model(cfg)
    return save_model_folder(out_dir, model, cfg)


@dataclass
class LoadedModel:
    """A model ready for sampling: ``model`` (eval mode, on ``device``), ``diffusion`` (all
    T steps), ``config`` (the whole ``config.json``), ``image_size`` and ``in_channels``."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    config: Dict[str, Any]
    image_size: int
    in_channels: int
    model_dir: Path

    def spaced_diffusion(self, num_steps: Optional[int] = None) -> GaussianDiffusion:
        """The chain respaced to ``num_steps`` (default: ``diffusion.sample_respacing``)."""
        if num_steps is None:
            num_steps = self.config["diffusion"].get("sample_respacing") or self.diffusion.num_timesteps
        if not 1 <= int(num_steps) <= self.diffusion.num_timesteps:
            raise SDDMError(f"respacing: {num_steps} steps is not in 1..{self.diffusion.num_timesteps}")
        return create_diffusion(self.config, int(num_steps))

    @property
    def data_config(self) -> Dict[str, Any]:
        """Preprocessing settings (percentiles etc.) the model was trained with."""
        return dict(self.config.get("data", {}))


def load_model(model_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
               use_ema: bool = True) -> LoadedModel:
    """Load a model folder (``model_dir`` may also be a ``DATASET[:PRESET]`` spec).

    ``use_ema`` picks ``ema.safetensors`` (falls back to raw weights with a warning if absent).
    Raises ``SDDMError`` if the weights do not match the configuration."""
    model_dir = resolve_model_dir(model_dir)
    cfg = load_config(model_dir)
    try:
        model = create_model(cfg)
    except SDDMError as e:
        raise SDDMError(f"{model_dir / CONFIG_FILE}: {e}") from None
    path = model_dir / (EMA_FILE if use_ema else RAW_FILE)
    if use_ema and not path.is_file() and (model_dir / RAW_FILE).is_file():
        warnings.warn(f"{path} not found; using the raw weights {RAW_FILE}")
        path = model_dir / RAW_FILE
    state = load_weights(path)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise SDDMError(f"{path}: weights do not match {CONFIG_FILE} (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SDDMError(f"{path}: weights do not match {CONFIG_FILE} ({str(e).splitlines()[-1].strip()})") from None
    model.eval().to(device)
    m = cfg["model"]
    return LoadedModel(model=model, diffusion=create_diffusion(cfg), config=cfg,
                       image_size=int(m["image_size"]), in_channels=int(m["in_channels"]), model_dir=model_dir)


def _key_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]):
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def dataset_results_folder(dataset: Union[int, str]) -> Path:
    """``$nnUNet_results/DatasetXXX_Name`` for an id, ``DatasetXXX_Name`` or raw-dataset path;
    the name is looked up in ``$nnUNet_results`` then ``$nnUNet_raw``."""
    s = str(dataset)
    if os.sep in s or Path(s).is_dir():
        parse_dataset_folder_name(Path(s).name)
        return results_root() / Path(s).name
    if s.isdigit():
        found = datasets_with_id(int(s), results_root()) or datasets_with_id(int(s), raw_root())
        if not found:
            raise SDDMError(f"no dataset with id {int(s)} in {results_root()} or {raw_root()}")
        if len(found) > 1:
            raise SDDMError(f"several datasets with id {int(s)}: {[p.name for p in found]}")
        return results_root() / found[0].name
    parse_dataset_folder_name(s)
    return results_root() / s


def default_model_dir(dataset: Union[int, str], preset: str = DEFAULT_PRESET) -> Path:
    """``$nnUNet_results/DatasetXXX_Name/sddm__<preset>``."""
    return dataset_results_folder(dataset) / model_folder_name(preset)


def resolve_model_dir(spec: Union[str, os.PathLike]) -> Path:
    """A model folder from a path, or from ``DATASET[:PRESET]`` (default preset ``tiny``) ->
    ``$nnUNet_results/DatasetXXX_Name/sddm__<preset>/``. ``SDDMError`` if it does not exist."""
    p = Path(spec)
    if p.is_dir():
        if not (p / CONFIG_FILE).is_file():
            raise SDDMError(f"{p}: not a model folder ({CONFIG_FILE} missing)")
        return p
    s = str(spec)
    if os.sep in s and ":" not in s:
        raise SDDMError(f"model folder {p} does not exist")
    dataset, _, preset = s.partition(":")
    folder = default_model_dir(dataset, preset or DEFAULT_PRESET)
    if not (folder / CONFIG_FILE).is_file():
        raise SDDMError(f"no trained model at {folder} (from {s!r}); train one with "
                        f"nnUNetv2_sddm_train {dataset} -p {preset or DEFAULT_PRESET}")
    return folder
