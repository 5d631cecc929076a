"""What the stages of a study share: the typed configuration, the study folder, the device, the
resolved datasets, and the paths of everything a study reads and writes (layout in ``pipeline``)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from nnunet_sddm.diffusion.model_folder import resolve_model_dir
from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import APPROACHES, SEGMENTERS, StudyConfig
from nnunet_sddm.utilities.devices import nnunet_device
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset, parse_dataset_folder_name

NNUNET_VARIABLES = (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results"))


@dataclass
class StudyContext:
    """Everything the stages share. ``device``: ``cpu``, ``cuda`` or ``mps`` (nnU-Net's device
    types); ``user_env``: the environment the study was started in; ``user_datasets``: side ->
    existing raw dataset folder; ``given_model``: ``diffusion.model`` resolved in the user's
    environment; ``runner``: the stage runner (the report reads stage times from it)."""

    cfg: StudyConfig
    out: Path
    device: str
    progress: bool = True
    log: Callable[[str], None] = print
    user_env: Dict[str, str] = field(default_factory=dict)
    user_datasets: Dict[str, Path] = field(default_factory=dict)
    given_model: Optional[Path] = None
    runner: Any = None

    # ---- nnU-Net folders
    @property
    def folders(self) -> Dict[str, Path]:
        """``raw``, ``preprocessed``, ``results``: the study's own or the user's (``nnunet.folders``)."""
        if self.cfg.nnunet.folders == "study":
            return {k: self.out / v for k, v in NNUNET_VARIABLES}
        try:
            return {k: Path(self.user_env[v]) for k, v in NNUNET_VARIABLES}
        except KeyError as e:
            raise SDDMError(f"nnunet.folders = 'environment' but {e.args[0]} is not set") from None

    @property
    def environment_mode(self) -> bool:
        return self.cfg.nnunet.folders == "environment"

    # ---- datasets
    def dataset_name(self, side: str) -> str:
        """``DatasetXXX_Name`` of ``source``, ``target`` or ``synthetic``."""
        if side == "synthetic":
            _, src = parse_dataset_folder_name(self.dataset_name("source"))
            return f"Dataset{self.cfg.synthesis.id:03d}_{src}SDDM"
        d = self.cfg.side(side)
        if d.phantom:
            return f"Dataset{d.id:03d}_StudyPhantom{d.phantom}{side.capitalize()}"
        return self.user_datasets[side].name

    def dataset_id(self, side: str) -> int:
        return parse_dataset_folder_name(self.dataset_name(side))[0]

    def raw(self, side: str) -> Path:
        return self.folders["raw"] / self.dataset_name(side)

    @property
    def target_images(self) -> Path:
        return self.raw("target") / f"images{self.cfg.target.split}"

    @property
    def target_labels(self) -> Path:
        return self.raw("target") / f"labels{self.cfg.target.split}"

    @property
    def model_dir(self) -> Path:
        return self.given_model if self.given_model is not None else self.out / "diffusion_model"

    @property
    def adapted(self) -> Path:
        return self.out / "adapted" / "target"

    def segmenter_models(self) -> List[Tuple[str, str, Path]]:
        """``(segmenter, trained_on, nnU-Net model folder)`` for every segmenter x {real, synthetic}."""
        out = []
        for s in self.cfg.segmenters:
            for kind, side in (("real", "source"), ("synthetic", "synthetic")):
                out.append((s, kind, nnunet_steps.model_folder(self.folders["results"], self.dataset_name(side),
                                                               self.cfg.trainer(s), SEGMENTERS[s][0])))
        return out

    def prediction_dir(self, kind: str, segmenter: str, inp: str) -> Path:
        return self.out / "predictions" / f"{kind}__{segmenter}__{inp}"

    def entries(self) -> List[Tuple[str, str, str, Path]]:
        """``(approach, segmenter, entry name, prediction folder)`` of every table row."""
        out = []
        for approach, (kind, inp) in APPROACHES.items():  # approach-major, as the paper's Table 1
            for s in self.cfg.segmenters:
                out.append((approach, s, f"{approach}/{SEGMENTERS[s][2]}", self.prediction_dir(kind, s, inp)))
        return out

    def evaluation_dir(self, approach: str, segmenter: str) -> Path:
        return self.out / "evaluation" / f"{approach.replace('+', '_')}__{segmenter}"

    def nnunet_env(self, training: bool = False) -> Dict[str, str]:
        return nnunet_steps.nnunet_env(self.folders, self.device, training=training, base=self.user_env,
                                       num_processes=self.cfg.nnunet.num_processes, seed=self.cfg.seed)


def make_context(cfg: StudyConfig, progress: bool = True, log: Callable[[str], None] = print) -> StudyContext:
    """Resolve the device (``auto``: CUDA, then MPS, then the CPU) and the user's existing datasets
    and diffusion model (in the user's ``$nnUNet_raw`` / ``$nnUNet_results``)."""
    ctx = StudyContext(cfg=cfg, out=Path(cfg.output).resolve(), device=nnunet_device(cfg.device),
                       progress=progress, log=log, user_env=dict(os.environ))
    for side in ("source", "target"):
        if cfg.side(side).dataset is not None:
            ctx.user_datasets[side] = find_raw_dataset(cfg.side(side).dataset)
    if cfg.diffusion.model:
        ctx.given_model = resolve_model_dir(cfg.diffusion.model).resolve()
    if cfg.source.dataset is not None and cfg.target.dataset is not None and \
            ctx.user_datasets["source"].resolve() == ctx.user_datasets["target"].resolve():
        raise SDDMError(f"source and target are the same dataset ({ctx.user_datasets['source']})")
    return ctx


@contextlib.contextmanager
def nnunet_environment(ctx: StudyContext) -> Iterator[None]:
    """Point this process's ``nnUNet_*`` variables at the study's folders (restored afterwards);
    the project's APIs read them at call time."""
    saved = {v: os.environ.get(v) for _, v in NNUNET_VARIABLES}
    for key, var in NNUNET_VARIABLES:
        ctx.folders[key].mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(ctx.folders[key])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
