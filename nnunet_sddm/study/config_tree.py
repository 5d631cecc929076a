"""The typed, frozen configuration of a study (:class:`StudyConfig`) and the study's design
constants (segmenters, approaches). Built by ``config.build_config`` / ``config.parse_config``
from the validated JSON layers; made of the library's own settings objects (``SamplerSettings``,
``EmptyPolicy``). Mappings inside it are read-only views; ``cfg[key]`` is a copy of a top-level
key's JSON value (as in ``study.json``)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from nnunet_sddm.evaluation.metrics import EmptyPolicy
from nnunet_sddm.sampling.guided import SamplerSettings
from nnunet_sddm.study.nnunet_steps import plans_name

#: Segmenter name -> (nnU-Net configuration, trainer family without augmentation, name in tables,
#: trainer family with nnU-Net's standard augmentation: the ``nnU-Net aug`` row).
SEGMENTERS: Dict[str, tuple] = {
    "2d": ("2d", "nnUNetTrainer_SDDM_NoDA", "2D nnU-Net", "nnUNetTrainer_SDDM_Aug"),
    "3d_fullres": ("3d_fullres", "nnUNetTrainer_SDDM_NoDA", "3D nnU-Net", "nnUNetTrainer_SDDM_Aug"),
    "vanilla": ("2d", "nnUNetTrainer_SDDM_VanillaUNet", "2D U-Net", "nnUNetTrainer_SDDM_VanillaUNetAug"),
}
#: Trainer families whose 250-epoch class is the bare family name (the others: ``<family>_250ep``).
_BARE_250 = ("nnUNetTrainer_SDDM_VanillaUNet", "nnUNetTrainer_SDDM_VanillaUNetAug")

#: What a segmenter is trained on: ``real`` (the source), ``synthetic`` (the DG dataset),
#: ``real_aug`` (the source, with nnU-Net's standard augmentation), and with ``generative.rows``
#: ``uda_syn`` (the source plus the generated target-style pairs) and ``gen_only`` (the generated
#: pairs alone).
KINDS = ("real", "synthetic", "real_aug", "uda_syn", "gen_only")
#: The kinds trained after the generated datasets exist (stage ``generative_train``, not ``train``).
GENERATIVE_KINDS = ("uda_syn", "gen_only")

#: Every row a study can report (Table 1, the ensembles with the original image, and the
#: alternatives a reviewer compares against); name -> (trained on, input). ``Approach`` rows of a
#: configuration: :meth:`StudyConfig.approaches`.
APPROACHES: Dict[str, tuple] = {
    "Baseline": ("real", "original"),
    "nnU-Net aug": ("real_aug", "original"),
    "HistMatch": ("real", "histmatch"),
    "FDA": ("real", "fda"),
    "DA": ("real", "adapted"),
    "DG": ("synthetic", "original"),
    "Mixed": ("synthetic", "adapted"),
    "UDA-syn": ("uda_syn", "original"),
    "Gen-only": ("gen_only", "original"),
    "DA+ens": ("real", "ensemble"),
    "Mixed+ens": ("synthetic", "ensemble"),
}
#: Rows that exist only when their alternative is enabled (``alternatives.<key>``).
OPTIONAL_APPROACHES = {"nnU-Net aug": "nnunet_aug", "HistMatch": "histmatch", "FDA": "fda"}
#: Rows that exist only with ``generative.rows`` (Diffuse-UDA's recipe and SynCMRI's utility test).
GENERATIVE_APPROACHES = ("UDA-syn", "Gen-only")
#: The segmenter that pseudo-labels the target for the generative rows (``generative.pseudo_labeller``)
#: -> (the row it is, what it is trained on): the Baseline, or the one trained with nnU-Net's
#: standard augmentation (needs ``alternatives.nnunet_aug``).
PSEUDO_LABELLERS = {"baseline": ("Baseline", "real"), "aug": ("nnU-Net aug", "real_aug")}
#: Tests behind the table's marks (``evaluation.test``): paired Wilcoxon signed-rank, paired t, Welch (the paper's).
TESTS = ("wilcoxon", "ttest_rel", "welch")
#: Post-processing of predictions (``postprocess``): name -> suffix of its rows.
POSTPROCESSING = {"lcc": "+LCC"}


@dataclass(frozen=True)
class Approach:
    """One row type of the table: ``name`` (e.g. ``DA+LCC``), what its segmenter was trained on
    (``kind``, one of ``KINDS``), the ``input`` it segments (``original``, ``adapted``,
    ``histmatch``, ``fda`` or ``ensemble``) and the ``postprocess`` of its predictions (None or
    ``lcc``)."""

    name: str
    kind: str
    input: str
    postprocess: Optional[str] = None


@dataclass(frozen=True)
class DatasetConfig:
    """``source`` or ``target``: phantoms the study generates (``phantom``: vendor letter, with
    ``subjects``, ``test_subjects``, ``matrix``, ``seed``, dataset ``id`` and ``labels``: the
    structures labelled, None = all) or an existing raw dataset (``dataset``: id, name or folder).
    ``split``: ``Tr`` or ``Ts`` (the target's test images)."""

    phantom: Optional[str]
    dataset: Optional[Union[int, str]]
    subjects: int
    test_subjects: int
    matrix: Optional[int]
    seed: int
    id: int
    split: Optional[str] = None
    labels: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class DiffusionConfig:
    """The source diffusion model: trained from ``preset`` (+ ``iterations``, ``batch_size``,
    ``set`` overrides), or a given ``model`` (folder or ``DATASET[:PRESET]``)."""

    preset: str
    iterations: Optional[int]
    batch_size: Optional[int]
    set: Mapping[str, Any]
    model: Optional[str]


@dataclass(frozen=True)
class SamplerConfig:
    """Algorithm 1's settings (validated ``SamplerSettings``) and how the sampler runs:
    ``batch_size`` slices per batch (None: per device), ``amp`` None, ``bf16`` or ``fp16``."""

    settings: SamplerSettings
    batch_size: Optional[int]
    amp: Optional[str]

    def inputs(self) -> Dict[str, Any]:
        """What a sampling stage's result depends on (its fingerprint): the batch size only in
        the reference behaviour (one guidance norm over the whole batch)."""
        return {"settings": self.settings.to_dict(), "amp": self.amp,
                "batch_size": self.batch_size if self.settings.reference_behaviour else None}


@dataclass(frozen=True)
class SynthesisConfig:
    """The DG dataset: its ``id`` (1..999) and ``copies`` adapted per source training image."""

    id: int
    copies: int


@dataclass(frozen=True)
class NnunetConfig:
    """``folders``: ``study`` (own nnU-Net folders) or ``environment`` (the user's ``$nnUNet_*``);
    ``num_processes`` of nnU-Net's workers; sliding-window ``step_size`` in (0, 1]; ``spacing``:
    the segmenters' target spacing in mm, in-plane (a float) or (z, y, x), planned by nnU-Net under
    its own plans name (None: nnU-Net's own plans); ``batch_size``: the segmenters' batch size set in
    nnU-Net's plans (None: as nnU-Net planned it). ``plans``: the plans identifier of both
    (``nnunet_steps.plans_name``)."""

    folders: str
    num_processes: int
    step_size: float
    spacing: Optional[Union[float, Tuple[float, float, float]]] = None
    batch_size: Optional[int] = None

    @property
    def plans(self) -> str:
        return plans_name(self.spacing, self.batch_size)


@dataclass(frozen=True)
class EvaluationConfig:
    """Significance level ``alpha`` in (0, 1), the distance metrics' ``empty_policy``, the
    evaluation's worker count (None: default) and the ``test`` behind the table's marks
    (``wilcoxon``, ``ttest_rel`` or ``welch``, the paper's)."""

    alpha: float
    empty_policy: EmptyPolicy
    num_processes: Optional[int]
    test: str = "wilcoxon"


@dataclass(frozen=True)
class AlternativesConfig:
    """The rows a reviewer compares SD-DM against: ``histmatch`` (Nyul landmark standardisation
    of the target images to the source training set), ``fda`` (Fourier domain adaptation with
    window ``fda_beta``), ``nnunet_aug`` (the segmenters trained with nnU-Net's standard
    augmentation)."""

    histmatch: bool
    fda: bool
    nnunet_aug: bool
    fda_beta: float


@dataclass(frozen=True)
class GenerativeConfig:
    """The generative rows (``generative``): with ``rows`` the table gains ``UDA-syn`` (a segmenter
    trained on the source plus target-style images generated from the source's label maps by a
    conditional diffusion model trained on the source and the target pseudo-labelled by
    ``pseudo_labeller``, a key of ``PSEUDO_LABELLERS``) and ``Gen-only`` (the same segmenter
    trained on the generated pairs alone). Dataset ids
    ``pseudo_id`` (the pseudo-labelled target), ``generated_id`` (the generated pairs) and
    ``merged_id`` (source + generated, UDA-syn's training set), each 1..999; ``copies`` images per
    source label map; ``labels`` ``"as-is"`` or ``"deformed"`` (the conditioning maps);
    ``guidance_scale`` w >= 0 (classifier-free guidance, 1: none); ``preset`` and ``overrides``
    (``SECTION.KEY``, ``model.condition`` included) of the conditional diffusion model."""

    rows: bool
    pseudo_id: int = 973
    generated_id: int = 974
    merged_id: int = 975
    copies: int = 1
    labels: str = "deformed"
    guidance_scale: float = 1.0
    pseudo_labeller: str = "baseline"
    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    """The sweep figure's grid (D, N and tau values) of one target case (None: the first) and
    slice (None: the middle one)."""

    D: Tuple[int, ...]
    N: Tuple[int, ...]
    tau: Tuple[float, ...]
    case: Optional[str] = None
    slice: Optional[int] = None


@dataclass(frozen=True)
class FiguresConfig:
    """``sweep``: the sweep figure (None: none); ``tsne``: the domain-shift figure."""

    sweep: Optional[SweepConfig]
    tsne: bool


@dataclass(frozen=True)
class StudyConfig:
    """The complete, validated settings of a study (see the module docstring); built by
    :func:`build_config`. ``cfg[key]`` is the JSON value of a top-level key (a copy)."""

    name: str
    output: str
    source: DatasetConfig
    target: DatasetConfig
    segmenters: Tuple[str, ...]
    epochs: Union[int, str]
    iterations_per_epoch: Optional[int]
    trainers: Mapping[str, str]
    fold: Union[int, str]
    diffusion: DiffusionConfig
    sampler: SamplerConfig
    synthesis: SynthesisConfig
    device: str
    nnunet: NnunetConfig
    evaluation: EvaluationConfig
    figures: FiguresConfig
    seed: int
    repeats: int = 1
    alternatives: AlternativesConfig = AlternativesConfig(histmatch=False, fda=False, nnunet_aug=False, fda_beta=0.01)
    postprocess: Optional[str] = None
    generative: GenerativeConfig = GenerativeConfig(rows=False)
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as JSON (what ``study.json`` records and ``--print-config`` prints)."""
        return copy.deepcopy(dict(self.raw))

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self.raw[key])

    def side(self, side: str) -> DatasetConfig:
        """``source`` or ``target``."""
        return {"source": self.source, "target": self.target}[side]

    def trainer(self, segmenter: str, augmented: bool = False) -> str:
        """The nnU-Net trainer class name that trains ``segmenter`` (``augmented``: with nnU-Net's
        standard augmentation, the ``nnU-Net aug`` row)."""
        return trainer_name(segmenter, self.trainers, self.epochs, self.iterations_per_epoch, augmented)

    def seeds(self) -> Tuple[int, ...]:
        """The segmenters' training seeds, one per repeat: ``seed .. seed + repeats - 1``."""
        return tuple(self.seed + r for r in range(self.repeats))

    def approaches(self) -> List[Approach]:
        """The table's rows in order: the enabled ``APPROACHES`` (alternatives, generative rows), then
        the same rows post-processed (``postprocess``)."""
        rows = [Approach(a, kind, inp) for a, (kind, inp) in APPROACHES.items()
                if (a not in OPTIONAL_APPROACHES or getattr(self.alternatives, OPTIONAL_APPROACHES[a]))
                and (a not in GENERATIVE_APPROACHES or self.generative.rows)]
        if self.postprocess is not None:
            rows += [Approach(r.name + POSTPROCESSING[self.postprocess], r.kind, r.input, self.postprocess)
                     for r in list(rows)]
        return rows

    def kinds(self) -> List[str]:
        """What the segmenters are trained on (``KINDS`` the rows need)."""
        used = {r.kind for r in self.approaches()}
        return [k for k in KINDS if k in used]

    def configurations(self) -> List[str]:
        """nnU-Net configurations the segmenters need (for planning and preprocessing)."""
        return list(dict.fromkeys(SEGMENTERS[s][0] for s in self.segmenters))

    def diffusion_overrides(self) -> Dict[str, Any]:
        """The ``SECTION.KEY`` overrides of the diffusion preset (``set`` + iterations/batch/seed)."""
        return diffusion_overrides(self.diffusion.set, self.diffusion.iterations, self.diffusion.batch_size,
                                    self.seed)


def trainer_of(cfg: Union[StudyConfig, Mapping[str, Any]], segmenter: str) -> str:
    """The nnU-Net trainer class name that trains ``segmenter``, of a configuration or of its JSON
    (``study.json``'s ``config``, ``--print-config``)."""
    if isinstance(cfg, StudyConfig):
        return cfg.trainer(segmenter)
    return trainer_name(segmenter, cfg["trainers"], cfg["epochs"], cfg["iterations_per_epoch"])


def trainer_name(segmenter: str, trainers: Mapping[str, str], epochs: Union[int, str],
                  iterations_per_epoch: Optional[int], augmented: bool = False) -> str:
    """The trainer class of ``segmenter``: ``trainers[segmenter]`` if given (not for
    ``augmented``), else the plugin's trainer family (``augmented``: the one with nnU-Net's
    standard augmentation) for ``epochs`` (``"quick"``: the ``_Quick`` test trainer) and
    ``iterations_per_epoch`` (None: nnU-Net's 250)."""
    if segmenter in trainers and not augmented:
        return trainers[segmenter]
    family = SEGMENTERS[segmenter][3 if augmented else 1]
    if epochs == "quick":
        return f"{family}_Quick"
    if iterations_per_epoch is not None:
        return f"{family}_{int(epochs)}ep_{int(iterations_per_epoch)}it"
    if family in _BARE_250 and int(epochs) == 250:
        return family
    return f"{family}_{int(epochs)}ep"


def diffusion_overrides(set_: Mapping[str, Any], iterations: Optional[int], batch_size: Optional[int],
                         seed: int) -> Dict[str, Any]:
    """The ``SECTION.KEY`` overrides of a diffusion preset: ``set``, then ``training.iterations``
    and ``training.batch_size`` if given, ``training.seed`` = the study seed unless ``set`` has one."""
    out = copy.deepcopy(dict(set_ or {}))
    if iterations is not None:
        out["training.iterations"] = int(iterations)
    if batch_size is not None:
        out["training.batch_size"] = int(batch_size)
    out.setdefault("training.seed", int(seed))
    return out


def read_only(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a private deep copy of ``d``."""
    return MappingProxyType(copy.deepcopy(dict(d)))
