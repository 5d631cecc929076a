"""A study: the paper's experiment (Table 1 and figures) as fourteen resumable stages,
six more with the generative rows (``generative.rows``: UDA-syn, Gen-only):

    data -> diffusion -> synthesis (DG) -> adaptation (DA) -> alternatives (histmatch, FDA)
         -> preprocess -> train
         [-> pseudo_labels -> generative_model -> generation -> generative_preprocess
          -> generative_train -> adherence]
         -> in_domain -> predict -> evaluate -> compare -> quality -> figures -> report

Each stage is its own module (``stage_<name>``); this module assembles them and runs them with
the stage runner (``stages``). Study folder layout (``OUT``)::

    study.json                 the complete configuration + software versions (provenance)
    study_state.json           stage fingerprints, outputs digests, wall times (stages)
    study_created.json         nnunet.folders = environment: the paths the study created in your
                               nnU-Net folders (the only ones it ever deletes there; ownership)
    nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/    (nnunet.folders = "study")
    diffusion_model/           the source diffusion model (config.json, ema.safetensors, samples.png ...)
    adapted/target/            the DA-adapted target test images (nnU-Net names, original geometry)
    adapted/histmatch/ adapted/fda/   the target test images standardised by the alternatives
    repeats/seed<S>/nnUNet_results/   the segmenters of repeats after the first (seed S)
    in_domain/                 the held-out source cases: every segmenter's in-domain Dice and the
                               source round trip (geometry alone, SD-DM) of the baselines; in_domain.csv
    predictions/seed<S>/<trained>__<segmenter>__<input>[__lcc]/   trained on real|synthetic|real_aug
                               (nnU-Net's augmentation)|uda_syn|gen_only (generative rows), input
                               original|adapted|histmatch|fda|ensemble (mean probabilities of original
                               and adapted); __lcc: post-processed
    evaluation/seed<S>/<approach>__<segmenter>/    per_case.csv, summary.json, summary.md
    comparison/                Table-1 tables (md/csv/tex; mean over repeats), tests.csv (paired tests,
                               Holm, bootstrap CIs, repeat agreement), welch.csv (the paper's test),
                               structures.csv (missing/spurious structures), table_finite.*, fig_*.png
    quality/dg/ quality/da/    quality reports (quality.md, CSVs, figures): fidelity, privacy and utility of
                               the DG dataset and of the DA-adapted target images
    figures/                   sweep.png, domain_shift/ (t-SNE), ci_<segmenter>_<metric>.png
    logs/                      output of nnU-Net's commands
    generative_model/          generative rows: the conditional diffusion model (source + pseudo-labelled target)
    adherence/                 generative rows: adherence.json (mask adherence per generated set, or why not
                               measurable) and generated/, dg/ (mask_adherence's outputs)
    report.md
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from nnunet_sddm.study import (STAGE_NAMES, stage_adaptation, stage_adherence, stage_alternatives, stage_compare,
                               stage_data, stage_diffusion, stage_evaluate, stage_figures, stage_generation,
                               stage_generative_model, stage_generative_preprocess, stage_generative_train,
                               stage_in_domain, stage_predict, stage_preprocess, stage_pseudo_labels, stage_quality,
                               stage_report, stage_synthesis, stage_train)
from nnunet_sddm.study.config_tree import StudyConfig
from nnunet_sddm.study.context import make_context, nnunet_environment
from nnunet_sddm.study.provenance import write_record
from nnunet_sddm.study.stages import Stage, StageRunner

STAGES: List[Stage] = [m.STAGE for m in (stage_data, stage_diffusion, stage_synthesis, stage_adaptation,
                                         stage_alternatives, stage_preprocess, stage_train, stage_pseudo_labels,
                                         stage_generative_model, stage_generation, stage_generative_preprocess,
                                         stage_generative_train, stage_adherence, stage_in_domain, stage_predict,
                                         stage_evaluate, stage_compare, stage_quality, stage_figures, stage_report)]
if tuple(s.name for s in STAGES) != STAGE_NAMES:  # pragma: no cover - a stage added in one place only
    raise ImportError(f"study stages {[s.name for s in STAGES]} differ from STAGE_NAMES {STAGE_NAMES}")


def run_study(cfg: StudyConfig, from_stage: Optional[str] = None, until: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print,
              on_stage_start: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run (or resume) the study described by the configuration ``cfg`` (``build_config``).

    from_stage: re-run from this stage on; until: stop after this stage; on_stage_start(name):
    called before a stage runs (a hook for tests). Returns ``{stage: result}``.
    """
    ctx = make_context(cfg, progress=progress, log=log)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_record(ctx, log=log)
    ctx.runner = StageRunner(STAGES, ctx.out, log=log, on_stage_start=on_stage_start)
    with nnunet_environment(ctx):
        return ctx.runner.run(ctx, from_stage=from_stage, until=until)
