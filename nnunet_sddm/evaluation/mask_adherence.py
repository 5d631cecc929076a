"""Mask adherence of generated image-label pairs: does a generated image show its conditioning labels?

A segmenter trained on REAL data of the generated domain (an :class:`NnUNetModel`) segments every
generated image (``imagesTr`` of a raw dataset of generated pairs); the Dice of its segmentation
against the label map the image was generated from (``labelsTr``) is reported per structure (the
structures of the generated dataset's ``dataset.json`` that the model also predicts, e.g. LV, MYO,
RV; background excluded). A structure absent from both maps does not count for that case (NaN);
absent from the prediction only, it scores 0 (``evaluate.evaluate_folders`` with its default
empty policy). The segmentations are those of ``pseudo_labels``: the class probabilities of every
fold and checkpoint averaged (nnU-Net's ``merge_files``), no post-processing.

Outputs in ``OUT`` (built in a staging folder, renamed when complete): ``adherence.json`` (model,
dataset, per structure ``mean``/``sd``/``n`` of the DSC and the per-case values), ``adherence.csv``
(``case, structure, DSC``), ``adherence.md`` (a short table), ``predictions/`` (the segmentations)
and ``evaluation/`` (``nnUNetv2_sddm_evaluate``'s outputs: every metric).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_sddm import __version__
from nnunet_sddm.adaptation.predictor import list_cases
from nnunet_sddm.adaptation.pseudo_labels import NnUNetModel, predict_members
from nnunet_sddm.data.raw_dataset import list_labels, load_dataset_json
from nnunet_sddm.evaluation.evaluate import EvaluationResults, evaluate_folders
from nnunet_sddm.evaluation.tables import records_to_csv
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import read_json, staging_dir, write_json, write_text
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset

PathLike = Union[str, os.PathLike]


@dataclass
class AdherenceResult:
    """structures: evaluated structure names (label-map order); summary: per structure
    ``{"mean", "sd", "n"}`` of the DSC (NaN-free cases; ``sd`` None for n < 2); rows: per case and
    structure ``{"case", "structure", "DSC"}`` (DSC None where the structure is absent from both
    maps); evaluation: the full ``evaluate_folders`` results; out_dir: the output folder."""

    structures: List[str]
    summary: Dict[str, dict]
    rows: List[dict]
    evaluation: EvaluationResults
    out_dir: Path
    record: dict = field(default_factory=dict)


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def adherence_summary(evaluation: EvaluationResults) -> Dict[str, dict]:
    """Per structure ``{"mean", "sd", "n"}`` of the DSC of ``evaluation`` (the ``describe`` values
    of ``evaluate_folders``' summary; NaN as None)."""
    out = {}
    for s in evaluation.structures:
        d = evaluation.summary["structures"][s]["metrics"]["DSC"]
        out[s] = {"mean": _finite(d["mean"]), "sd": _finite(d["std"]), "n": int(d["n"])}
    return out


def adherence_markdown(result: AdherenceResult) -> str:
    """The short report: one row per structure (mean +- sd of the DSC, n cases)."""
    rec = result.record
    lines = [f"# Mask adherence: {rec['generated_dataset']}", "",
             f"Segmenter: {rec['model']['dataset']} ({rec['model']['trainer']}, {rec['model']['configuration']}, "
             f"folds {rec['model']['folds']}); {rec['n_cases']} generated cases. Dice of the segmentation of each "
             f"generated image against the label map it was generated from (structure absent from both: not "
             f"counted; absent from the segmentation only: 0).", "",
             "| structure | DSC mean | DSC sd | n |", "|---|---|---|---|"]
    for s, d in result.summary.items():
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        lines.append(f"| {s} | {fmt(d['mean'])} | {fmt(d['sd'])} | {d['n']} |")
    return "\n".join(lines) + "\n"


def mask_adherence(generated_dataset: PathLike, model: NnUNetModel, out_dir: PathLike, *, device: str = "cuda",
                   num_processes: int = 0, overwrite: bool = False, progress: bool = True) -> AdherenceResult:
    """Segment the generated images of ``generated_dataset`` (raw dataset id, name or folder; its
    ``imagesTr`` and ``labelsTr``) with ``model`` and score them against their labels (see the module
    docstring). ``num_processes``: nnU-Net's workers and the evaluation's (0: none).
    ``out_dir`` is refused if it exists, unless ``overwrite``. Returns the result also written there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SDDMError(f"{out_dir}: output folder exists (use --overwrite to replace it)")
    gen = find_raw_dataset(str(generated_dataset))
    gen_dj = load_dataset_json(gen)
    folder = model.check()
    model_dj = load_dataset_json(folder)
    ending = model_dj["file_ending"]
    if gen_dj["file_ending"] != ending:
        raise SDDMError(f"{gen / 'dataset.json'}: file ending {gen_dj['file_ending']!r} differs from the model's "
                        f"{ending!r}")
    cases = list_cases(gen / "imagesTr", gen / "imagesTr", ending)
    labels = list_labels(gen / "labelsTr", ending)
    missing = [c.case_id for c in cases if c.case_id not in labels]
    if missing:
        raise SDDMError(f"{gen / 'labelsTr' / (missing[0] + ending)}: the label map of generated case {missing[0]} "
                        f"is missing ({len(missing)} case(s) without labels)")
    plans_manager = PlansManager(read_json(folder / "plans.json"))
    label_manager = plans_manager.get_label_manager(model_dj)
    rw = plans_manager.image_reader_writer_class()

    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".members-", dir=tmp))
        members = predict_members(model, {c.case_id: c.files for c in cases}, work, device=device,
                                  num_processes=num_processes, progress=progress)
        pred_dir = tmp / "predictions"
        pred_dir.mkdir()
        for c in cases:
            merge_files([str(m / f"{c.case_id}.npz") for m in members], str(pred_dir / c.case_id), ending, rw,
                        label_manager, False)
        shutil.rmtree(work)
        evaluation = evaluate_folders(gen / "labelsTr", pred_dir, dataset_json=gen / "dataset.json",
                                      prediction_dataset_json=folder / "dataset.json",
                                      num_processes=max(1, int(num_processes)), out_dir=tmp / "evaluation",
                                      progress=progress)
        summary = adherence_summary(evaluation)
        rows = [{"case": r["case"], "structure": r["structure"], "DSC": _finite(r["DSC"])}
                for r in evaluation.rows]
        record = {"package_version": __version__, "generated_dataset": gen.name,
                  "generated_dataset_folder": str(gen.resolve()), "model": model.to_dict(),
                  "model_folder": str(folder.resolve()), "n_cases": len(cases),
                  "skipped_structures": evaluation.skipped_structures,
                  "structures": summary, "per_case": rows}
        result = AdherenceResult(structures=list(evaluation.structures), summary=summary, rows=rows,
                                 evaluation=evaluation, out_dir=out_dir, record=record)
        write_json(record, tmp / "adherence.json")
        write_text(records_to_csv(rows, ("case", "structure", "DSC")), tmp / "adherence.csv")
        write_text(adherence_markdown(result), tmp / "adherence.md")
    evaluation.out_dir = out_dir / "evaluation"
    return result
