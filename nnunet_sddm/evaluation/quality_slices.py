r"""The image sets of the quality report (``nnUNetv2_sddm_quality``), as 2D slices at one scale.

An image set is an nnU-Net raw dataset (its ``imagesTr``, labels from ``labelsTr``) or a folder
of nnU-Net-named images (``CASE_0000.nii.gz``; labels from the sibling ``labels*`` folder of an
``images*`` folder, e.g. ``imagesTs`` -> ``labelsTs``, when it exists). ``cases.json`` of the
dataset gives each case's ``subject`` and, for synthetic data, ``source_case`` (the real case it
was made from).

The report's scale (stated in every report), for every slice ``z`` of every volume ``V``:

* ``V`` is clipped to its 0.5th-99.5th intensity percentiles and scaled to ``[0, 1]``
  (``image_features.normalize_volume``; the same scaling as the 22 image features);
* each slice is padded with 0 to a centred square and resized bilinearly (antialiased when
  shrinking) to ``S x S`` pixels, ``S = REPORT_SIZE = 128`` (``data.slices.SquareResize``);
* a label map takes the same padding and a nearest-neighbour resize; the heart region is
  ``label > 0`` dilated by ``HEART_MARGIN`` pixels at the report scale.

Pairs (for paired fidelity): a synthetic slice ``(c, z)`` is paired with slice ``z`` of the real
case ``source_case(c)`` (from ``cases.json``) or, without provenance, of the real case with the
same name and slice count (the adapted images of ``nnUNetv2_sddm_adapt`` keep their names).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from nnunet_sddm.data.raw_dataset import list_images, list_labels, load_cases_json, split_ending
from nnunet_sddm.data.slices import SquareResize
from nnunet_sddm.data.volumes import read_volume
from nnunet_sddm.evaluation.evaluate import map_jobs
from nnunet_sddm.evaluation.image_features import FEATURE_NAMES, normalize_volume, slice_features
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar

PathLike = Union[str, os.PathLike]

#: Side of the report's slices in pixels.
REPORT_SIZE = 128
#: Dilation of the label map's foreground that makes the heart region, in report pixels.
HEART_MARGIN = 3


@dataclass(frozen=True)
class ImageCase:
    """One volume of an image set: its case id, image file, label file (or None), subject and
    provenance (``source_case``: the case it was made from, None when unknown)."""

    case: str
    image: Path
    label: Optional[Path]
    subject: str
    source_case: Optional[str]


@dataclass(frozen=True)
class ImageSet:
    """A named set of volumes (``cases`` sorted by case id) read from ``folder``."""

    name: str
    folder: Path
    cases: Tuple[ImageCase, ...]

    @property
    def labelled(self) -> bool:
        """Whether every case has a label map."""
        return bool(self.cases) and all(c.label is not None for c in self.cases)


@dataclass(frozen=True)
class ReportSlices:
    """The slices of an image set at the report scale.

    images: ``(N, S, S)`` float32 in ``[0, 1]``; heart: ``(N, S, S)`` bool heart regions, None when
    the set has no labels; case, subject, source_case: ``(N,)`` str arrays (``source_case`` ""
    when unknown); z: ``(N,)`` int64 slice index within its volume.
    """

    name: str
    images: np.ndarray
    heart: Optional[np.ndarray]
    case: np.ndarray
    subject: np.ndarray
    source_case: np.ndarray
    z: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def image_set(spec: PathLike, name: str) -> ImageSet:
    """The image set at ``spec``: a raw dataset folder (``dataset.json`` + ``imagesTr``) or a folder
    of ``CASE_0000.<ending>`` images. ``name`` is the set's role in messages (e.g. ``-s``).

    Raises ``SDDMError`` naming ``spec`` when it is missing or holds no images."""
    folder = Path(spec)
    if not folder.is_dir():
        raise SDDMError(f"{name} {folder}: not a folder")
    dataset_folder: Optional[Path] = None
    if (folder / "dataset.json").is_file():
        dataset_folder, images_folder = folder, folder / "imagesTr"
        labels_folder: Optional[Path] = folder / "labelsTr"
    else:
        images_folder = folder
        labels_folder = folder.parent / ("labels" + folder.name[len("images"):]) if folder.name.startswith("images") else None
        if (folder.parent / "dataset.json").is_file():
            dataset_folder = folder.parent
    images = list_images(images_folder)
    if not images:
        raise SDDMError(f"{name} {images_folder}: no images")
    ending = split_ending(next(iter(images.values())).name)[1]
    labels = list_labels(labels_folder, ending) if labels_folder is not None else {}
    records: Dict[str, dict] = {r["case"]: r for r in load_cases_json(dataset_folder)} if dataset_folder else {}
    cases = tuple(ImageCase(case=c, image=p, label=labels.get(c), subject=str(records.get(c, {}).get("subject", c)),
                            source_case=records.get(c, {}).get("source_case"))
                  for c, p in sorted(images.items()))
    return ImageSet(name=name, folder=folder, cases=cases)


def _label_to_report(label: np.ndarray, resize: SquareResize) -> np.ndarray:
    fg = resize.forward_labels(torch.from_numpy(label.astype(np.float32))).numpy() > 0
    st = ndimage.generate_binary_structure(2, 1)
    return np.stack([ndimage.binary_dilation(m, st, iterations=HEART_MARGIN) if m.any() else m for m in fg])


def _volume_to_report(case: ImageCase, size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    vol = read_volume(case.image)
    resize = SquareResize(int(vol.data.shape[1]), int(vol.data.shape[2]), int(size), pad_value=0.0)
    x = resize.forward(torch.from_numpy(normalize_volume(vol.data).astype(np.float32)))[:, 0]
    images = x.clamp_(0.0, 1.0).numpy().astype(np.float32)
    heart = None
    if case.label is not None:
        lab = read_volume(case.label).data
        if lab.shape != vol.data.shape:
            raise SDDMError(f"{case.label}: label shape {lab.shape} differs from the image's {vol.data.shape} "
                            f"({case.image})")
        heart = _label_to_report(np.rint(lab), resize)
    return images, heart


def load_report_slices(images: ImageSet, size: int = REPORT_SIZE, progress: bool = True) -> ReportSlices:
    """Every slice of every volume of ``images`` at the report scale (module docstring). Read in
    this process: the resize runs in torch, which must not run in forked workers."""
    parts = [_volume_to_report(c, size) for c in progress_bar(images.cases, desc=f"reading {images.name}",
                                                              unit="volume", disable=not progress)]
    n = [p[0].shape[0] for p in parts]
    rep = lambda values: np.repeat(np.asarray(values, dtype=object).astype(str), n)  # noqa: E731
    heart = np.concatenate([p[1] for p in parts]) if images.labelled else None
    return ReportSlices(name=images.name, images=np.concatenate([p[0] for p in parts]), heart=heart,
                        case=rep([c.case for c in images.cases]), subject=rep([c.subject for c in images.cases]),
                        source_case=rep([c.source_case or "" for c in images.cases]),
                        z=np.concatenate([np.arange(k, dtype=np.int64) for k in n]))


@dataclass(frozen=True)
class SlicePairs:
    """Paired slices: ``synthetic[k]`` of the synthetic set and ``real[k]`` of the real set
    (``(K,)`` int64 indices, synthetic order); ``by_provenance`` / ``by_name``: how many of the K
    pairs were linked by ``cases.json`` provenance / by identical case names."""

    synthetic: np.ndarray
    real: np.ndarray
    by_provenance: int
    by_name: int

    def __len__(self) -> int:
        return int(self.synthetic.shape[0])


def pair_slices(synthetic: ReportSlices, real: ReportSlices) -> SlicePairs:
    """The paired slices of ``synthetic`` and ``real`` (module docstring). A volume paired by name
    only is left unpaired when the slice counts differ (the same name need not mean the same
    scan); one paired by provenance must match.

    Raises ``SDDMError`` when a synthetic volume and the real case its ``source_case`` names have
    different slice counts."""
    where: Dict[Tuple[str, int], int] = {(c, int(z)): i for i, (c, z) in enumerate(zip(real.case, real.z))}
    counts, syn_counts = Counter(real.case.tolist()), Counter(synthetic.case.tolist())
    i_syn: List[int] = []
    i_real: List[int] = []
    by_provenance = 0
    for i, (c, src, z) in enumerate(zip(synthetic.case, synthetic.source_case, synthetic.z)):
        if src:
            if src not in counts:
                continue
            if counts[src] != syn_counts[c]:
                raise SDDMError(f"{synthetic.name} case {c}: {syn_counts[c]} slices, but the case it was made from, "
                                f"{src} ({real.name}), has {counts[src]}")
            partner = src
            by_provenance += 1
        elif counts.get(c) == syn_counts[c]:
            partner = c
        else:
            continue
        i_syn.append(i)
        i_real.append(where[(partner, int(z))])
    return SlicePairs(np.asarray(i_syn, dtype=np.int64), np.asarray(i_real, dtype=np.int64), by_provenance,
                      len(i_syn) - by_provenance)


def merged_set(name: str, sets: Sequence[ImageSet], keep: Optional[Sequence[str]] = None) -> ImageSet:
    """One image set of the cases of ``sets`` (e.g. a dataset's ``imagesTr`` and ``imagesTs``),
    restricted to the case ids ``keep`` when given, sorted by case id."""
    cases = {c.case: c for s in sets for c in s.cases}
    wanted = set(cases) if keep is None else set(keep)
    return ImageSet(name=name, folder=sets[0].folder, cases=tuple(cases[k] for k in sorted(wanted & set(cases))))


def _features_of_slice(img: np.ndarray) -> List[float]:
    f = slice_features(img.astype(np.float64))
    return [f[k] for k in FEATURE_NAMES]


def slice_feature_matrix(slices: ReportSlices, num_processes: int = 1, progress: bool = True) -> np.ndarray:
    """The 22 image features (``image_features.slice_features``, numpy and scipy only, so safe in
    forked workers) of every report slice: ``(N, 22)`` float64, in ``FEATURE_NAMES`` order."""
    rows = map_jobs(_features_of_slice, list(slices.images), num_processes, desc=f"features {slices.name}",
                    unit="slice", progress=progress, chunksize=16)
    return np.asarray(rows, dtype=np.float64).reshape(len(slices), len(FEATURE_NAMES))
