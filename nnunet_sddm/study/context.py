"""What the stages of a study share: the typed configuration, the study folder, the device, the
resolved datasets, and the paths of everything a study reads and writes (layout in ``pipeline``)."""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from nnunet_sddm.diffusion.model_folder import resolve_model_dir
from nnunet_sddm.study import nnunet_steps
from nnunet_sddm.study.config_tree import PSEUDO_LABELLERS, SEGMENTERS, Approach, StudyConfig
from nnunet_sddm.utilities.devices import nnunet_device
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset, parse_dataset_folder_name

NNUNET_VARIABLES = (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results"))
#: The dataset side each kind of segmenter (``KINDS``, and the ``oracle`` of the mask adherence) trains on.
TRAINING_SIDE = {"real": "source", "real_aug": "source", "synthetic": "synthetic", "uda_syn": "merged",
                 "gen_only": "generated", "oracle": "target"}
#: The datasets of the generative rows: side -> (``generative`` id key, name suffix, named after).
GENERATIVE_SIDES = {"pseudo": ("pseudo_id", "PseudoLabel", "target"),
                    "generated": ("generated_id", "SDDMGen", "source"),
                    "merged": ("merged_id", "UDASyn", "source")}


@dataclass(frozen=True)
class Model:
    """One trained segmenter: ``segmenter`` (a ``SEGMENTERS`` key), ``kind`` (what it was trained
    on, ``KINDS``), its training ``seed`` (one per repeat) and its nnU-Net model ``folder``."""

    segmenter: str
    kind: str
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.kind}__{self.segmenter}__seed{self.seed}"


@dataclass(frozen=True)
class Entry:
    """One row of the table: an ``approach`` with one ``segmenter``; ``name`` as in the tables
    (``DA/2D nnU-Net``)."""

    approach: Approach
    segmenter: str
    name: str


def safe_name(text: str) -> str:
    """``text`` as a file-name part (``DA+ens`` -> ``DA_ens``, ``nnU-Net aug`` -> ``nnU_Net_aug``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


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
        """``DatasetXXX_Name`` of ``source``, ``target``, ``synthetic`` or a dataset of the generative
        rows (``GENERATIVE_SIDES``: ``pseudo``, ``generated``, ``merged``)."""
        if side == "synthetic":
            _, src = parse_dataset_folder_name(self.dataset_name("source"))
            return f"Dataset{self.cfg.synthesis.id:03d}_{src}SDDM"
        if side in GENERATIVE_SIDES:
            key, suffix, of = GENERATIVE_SIDES[side]
            _, base = parse_dataset_folder_name(self.dataset_name(of))
            return f"Dataset{getattr(self.cfg.generative, key):03d}_{base}{suffix}"
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
        """The DA-adapted target test images."""
        return self.out / "adapted" / "target"

    def input_images(self, inp: str) -> Path:
        """The target test images a row segments: ``original``, ``adapted`` (SD-DM), ``histmatch``
        or ``fda`` (``ensemble`` has no images: it averages the original's and the adapted's
        probabilities)."""
        if inp == "original":
            return self.target_images
        if inp == "adapted":
            return self.adapted
        if inp in ("histmatch", "fda"):
            return self.out / "adapted" / inp
        raise KeyError(inp)

    def results_root(self, seed: int) -> Path:
        """``nnUNet_results`` of the segmenters trained with ``seed``: the study's (or the user's)
        for the first repeat, ``OUT/repeats/seed<S>/nnUNet_results`` for the others (nnU-Net has
        one model folder per dataset, trainer and configuration)."""
        if seed == self.cfg.seed:
            return self.folders["results"]
        return self.out / "repeats" / f"seed{seed}" / "nnUNet_results"

    def trainer(self, segmenter: str, kind: str) -> str:
        """The nnU-Net trainer class that trains ``segmenter`` on ``kind`` (the plugin's augmented
        family for ``real_aug``, the ``nnU-Net aug`` row)."""
        return self.cfg.trainer(segmenter, augmented=kind == "real_aug")

    def model(self, segmenter: str, kind: str, seed: int) -> Model:
        """``segmenter`` trained with ``seed`` on the dataset of ``kind`` (``TRAINING_SIDE``)."""
        return Model(segmenter, kind, seed,
                     nnunet_steps.model_folder(self.results_root(seed), self.dataset_name(TRAINING_SIDE[kind]),
                                               self.trainer(segmenter, kind), SEGMENTERS[segmenter][0],
                                               self.cfg.nnunet.plans))

    def models(self, kinds: Optional[Sequence[str]] = None) -> List[Model]:
        """Every segmenter to train: seeds (repeats) x segmenters x what the rows need it trained on
        (``kinds``: only models of these kinds)."""
        return [self.model(s, kind, seed) for seed in self.cfg.seeds() for s in self.cfg.segmenters
                for kind in self.cfg.kinds() if kinds is None or kind in kinds]

    def baseline(self) -> Model:
        """The Baseline of the first segmenter: trained on the real source with the first repeat's seed."""
        return self.model(self.cfg.segmenters[0], "real", self.cfg.seed)

    def pseudo_labeller(self) -> Model:
        """The segmenter that pseudo-labels the target for the generative rows
        (``generative.pseudo_labeller``): the first segmenter, trained on the real source (with
        nnU-Net's augmentation for ``aug``) with the first repeat's seed."""
        return self.model(self.cfg.segmenters[0], PSEUDO_LABELLERS[self.cfg.generative.pseudo_labeller][1],
                          self.cfg.seed)

    def oracle(self) -> Model:
        """The segmenter of the mask adherence (never a row): the first segmenter trained on the
        target's labelled cases (its imagesTr with labelsTr) with the first repeat's seed."""
        return self.model(self.cfg.segmenters[0], "oracle", self.cfg.seed)

    def model_side(self, model: Model) -> str:
        """The dataset side a model trains on (``source`` or ``synthetic``)."""
        return TRAINING_SIDE[model.kind]

    def prediction_dir(self, kind: str, segmenter: str, inp: str, seed: int, postprocess: Optional[str] = None) -> Path:
        name = f"{kind}__{segmenter}__{inp}" + (f"__{postprocess}" if postprocess else "")
        return self.out / "predictions" / f"seed{seed}" / name

    def entries(self) -> List[Entry]:
        """Every table row: approach-major, as the paper's Table 1."""
        return [Entry(a, s, f"{a.name}/{SEGMENTERS[s][2]}") for a in self.cfg.approaches() for s in self.cfg.segmenters]

    def entry_predictions(self, entry: Entry, seed: int) -> Path:
        a = entry.approach
        return self.prediction_dir(a.kind, entry.segmenter, a.input, seed, a.postprocess)

    def evaluation_dir(self, approach: str, segmenter: str, seed: int) -> Path:
        return self.out / "evaluation" / f"seed{seed}" / f"{safe_name(approach)}__{segmenter}"

    def nnunet_env(self, training: bool = False, seed: Optional[int] = None) -> Dict[str, str]:
        """The environment of an nnU-Net subprocess; ``seed``: the training seed (None: the study's)
        and its results folder (``results_root``); training skips nnU-Net's final validation
        (``nnUNet_sddm_final_validation=0``)."""
        seed = self.cfg.seed if seed is None else seed
        folders = dict(self.folders, results=self.results_root(seed))
        # the study predicts and evaluates itself: nnU-Net's final validation is never read
        return nnunet_steps.nnunet_env(folders, self.device, training=training, base=self.user_env,
                                       num_processes=self.cfg.nnunet.num_processes, seed=seed,
                                       final_validation=not training)


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


def open_study(folder: os.PathLike) -> StudyContext:
    """The context of the study in ``folder`` (started or finished) with the configuration of its
    ``study.json``, for reading its outputs; no stage is run. ``SDDMError`` without a record."""
    import json

    from nnunet_sddm.study.config import build_config  # imported here: config imports the stages' peers

    folder = Path(folder)
    record = folder / "study.json"
    if not record.is_file():
        raise SDDMError(f"{folder}: not a study folder (no study.json)")
    ctx = make_context(build_config(json.loads(record.read_text())["config"]), progress=False, log=lambda m: None)
    ctx.out = folder.resolve()
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
