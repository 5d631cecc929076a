"""Stage ``generation`` (generative rows): the two training sets of the generative rows.

* ``generative.generated_id`` (``<source>SDDMGen``): target-style images (domain ``"target"``)
  sampled by the conditional model from the source's training label maps, as they are or
  deformed (``generative.labels``), ``generative.copies`` per map, guidance scale
  ``generative.guidance_scale``, the study sampler's ``steps`` and ``seed``
  (``adaptation.synthesize_labels.synthesize_from_labels``): Gen-only's training set;
* ``generative.merged_id`` (``<source>UDASyn``): the real source training cases plus those
  generated cases (byte copies, one nnU-Net raw dataset, ``splits_final.json`` by subject: a
  generated case belongs to the subject of its label map): UDA-syn's training set.

Each dataset is published atomically; on resume a published one is kept and an unfinished
generation continues from its finished images. Off: not part of the study."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

from nnunet_sddm.adaptation.synthesize import source_record
from nnunet_sddm.adaptation.synthesize_labels import synthesize_from_labels
from nnunet_sddm.data.raw_dataset import FILE_ENDING, RawDatasetBuilder, list_images, list_labels, load_cases_json, \
    load_dataset_json
from nnunet_sddm.study.context import StudyContext
from nnunet_sddm.study.ownership import clean_study_outputs
from nnunet_sddm.study.stage_generative_model import generative_model_dir
from nnunet_sddm.study.stage_pseudo_labels import dataset_paths, generative_rows
from nnunet_sddm.study.stages import Stage
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.nnunet_paths import parse_dataset_folder_name


def build_merged_dataset(ctx: StudyContext) -> Path:
    """UDA-syn's training set: the source's labelled training cases and the generated cases, as
    raw dataset ``generative.merged_id`` (the source's ``dataset.json`` labels and channel; each
    case's ``cases.json`` record with ``generated`` true or false). Returns its folder."""
    src, gen = ctx.raw("source"), ctx.raw("generated")
    dj = load_dataset_json(src)
    if dj["file_ending"] != FILE_ENDING:
        raise SDDMError(f"{src / 'dataset.json'}: file ending {dj['file_ending']!r}; the UDA-syn dataset is written "
                        f"as {FILE_ENDING}")
    parts = []
    for folder, generated in ((src, False), (gen, True)):
        images, labels = list_images(folder / "imagesTr", FILE_ENDING), list_labels(folder / "labelsTr", FILE_ENDING)
        records = {r["case"]: r for r in load_cases_json(folder)}
        parts += [(case, image, labels[case], records, folder.name, generated) for case, image in images.items()
                  if case in labels]
    name = parse_dataset_folder_name(ctx.dataset_name("merged"))[1]
    extra = {"channel_names": dj["channel_names"],
             "sddm_uda_syn": {"source": src.name, "generated": gen.name,
                              "model": str(generative_model_dir(ctx))}}
    with RawDatasetBuilder(ctx.cfg.generative.merged_id, name, labels=dj["labels"], extra_json=extra,
                           description=f"{src.name} (real) plus {gen.name} (generated target-style pairs)") as b:
        for case, image, label, records, dataset, generated in parts:
            shutil.copyfile(image, b.image_path(case, "Tr"))
            shutil.copyfile(label, b.label_path(case, "Tr"))
            rec = source_record(records, case)
            b.add_record({**rec, "case": case, "subject": str(rec.get("subject", case)), "split": "Tr",
                          "from_dataset": dataset, "generated": generated})
    return b.final


def run_generation(ctx: StudyContext, resume: bool) -> Dict[str, Any]:
    """The generated target-style pairs, then the merged source + generated dataset."""
    gen, smp = ctx.cfg.generative, ctx.cfg.sampler
    generated = ctx.raw("generated")
    if not (resume and (generated / "dataset.json").is_file()):
        synthesize_from_labels(ctx.dataset_name("source"), gen.generated_id, generative_model_dir(ctx),
                               labels=gen.labels, domain="target", guidance_scale=float(gen.guidance_scale),
                               copies=gen.copies, steps=smp.settings.steps, seed=smp.settings.seed,
                               name=parse_dataset_folder_name(ctx.dataset_name("generated"))[1], overwrite=False,
                               batch_size=smp.batch_size, device=ctx.device, progress=ctx.progress)
    merged = ctx.raw("merged")
    if not (resume and (merged / "dataset.json").is_file()):
        build_merged_dataset(ctx)
    count = {side: len(list_images(ctx.raw(side) / "imagesTr")) for side in ("generated", "merged")}
    return {"generated": generated.name, "generated_cases": count["generated"], "merged": merged.name,
            "merged_cases": count["merged"]}


def generation_inputs(ctx: StudyContext) -> Any:
    """The generation's settings and the ids of both datasets (the model: the upstream stage)."""
    gen, smp = ctx.cfg.generative, ctx.cfg.sampler.settings
    return {"labels": gen.labels, "copies": gen.copies, "guidance_scale": gen.guidance_scale, "steps": smp.steps,
            "seed": smp.seed, "ids": [gen.generated_id, gen.merged_id]}


def generation_outputs(ctx: StudyContext) -> List[Path]:
    return [ctx.raw("generated"), ctx.raw("merged")]


def generation_clean(ctx: StudyContext) -> None:
    clean_study_outputs(ctx, "generation", dataset_paths(ctx, "generated") + dataset_paths(ctx, "merged"))


STAGE = Stage("generation", "generative rows: target-style pairs from the source's label maps; source + generated",
              run_generation, generation_inputs, generation_outputs, ("data", "generative_model"), generation_clean,
              generative_rows)
