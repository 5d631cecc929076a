"""The adaptation methods behind ``--method``: SD-DM and the classical alternatives a reviewer asks for.

``METHODS``:

- ``sddm``: the source-domain diffusion model (``folders.adapt_folder``, ``pipeline.Adapter``);
- ``histmatch``: Nyul-Udupa histogram standardisation fitted on the source training images
  (``histmatch``);
- ``fda``: Fourier domain adaptation with source training slices (``fda``).

The classical two share :class:`ClassicalAdapter` (fitted once on a folder of nnU-Net-named
SOURCE training images, e.g. a raw dataset's ``imagesTr``; arrays ``(z, y, x)`` in, float32 of the
same shape out) and one folder entry point, :func:`adapt_folder_classical`, which writes every
output with the input's file name, shape and geometry into a hidden staging folder renamed into
place when complete, plus the run record ``OUT/adaptation.json``. ``nnUNetv2_sddm_predict`` uses
the same adapter on the arrays nnU-Net's reader gives, keyed by the same case ids, so both routes
give the same images. Source images are always read with the reader nnU-Net picks for their
file ending. Everything is deterministic: the same inputs give byte-identical outputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

import nnunet_sddm
from nnunet_sddm.adaptation import fda as fda_lib
from nnunet_sddm.adaptation import histmatch
from nnunet_sddm.adaptation.record import sha256_file
from nnunet_sddm.data.raw_dataset import list_images, publishable_permissions
from nnunet_sddm.data.slices import IntensityWindow
from nnunet_sddm.data.volumes import image_ndim, read_geometry, read_volume, write_like
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import staging_dir, write_json
from nnunet_sddm.utilities.nnunet_paths import find_raw_dataset
from nnunet_sddm.utilities.progress import progress_bar

PathLike = Union[str, os.PathLike]

#: Every value of ``--method`` (``sddm`` first: the default).
METHODS: Tuple[str, ...] = ("sddm", "histmatch", "fda")

#: The methods without a diffusion model (``ClassicalAdapter``).
CLASSICAL: Tuple[str, ...] = ("histmatch", "fda")

#: Run record of ``adapt_folder_classical`` in the output folder.
RECORD_FILE = "adaptation.json"

#: Default ``beta`` of FDA.
BETA = fda_lib.BETA


def check_method(method: str, classical: bool = False) -> str:
    """``method`` if it is one of ``METHODS`` (``CLASSICAL`` with ``classical``); ``SDDMError`` otherwise."""
    allowed = CLASSICAL if classical else METHODS
    if method not in allowed:
        hint = " (SD-DM adaptation needs a diffusion model: folders.adapt_folder)" if method == "sddm" else ""
        raise SDDMError(f"--method must be one of {', '.join(allowed)}, got {method!r}{hint}")
    return method


def source_images_folder(source: PathLike) -> Path:
    """The folder of source training images named by ``source``: a raw dataset (id,
    ``DatasetXXX_Name`` in ``$nnUNet_raw``, or its folder: its ``imagesTr``) or a folder of
    nnU-Net-named images itself. ``SDDMError`` if there is none."""
    p = Path(str(source))
    if p.is_dir():
        return p / "imagesTr" if (p / "imagesTr").is_dir() else p
    folder = find_raw_dataset(str(source)) / "imagesTr"
    if not folder.is_dir():
        raise SDDMError(f"--source {source}: the dataset has no imagesTr folder ({folder})")
    return folder


def list_source_images(folder: PathLike) -> Dict[str, Path]:
    """``{case: image}`` of a folder of nnU-Net-named source images, sorted by case; ``SDDMError``
    for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SDDMError(f"source image folder {folder} does not exist")
    cases = dict(sorted(list_images(folder).items()))
    if not cases:
        raise SDDMError(f"{folder}: no nnU-Net source images (CASE_0000.nii.gz, ...) found")
    return cases


def source_slice_count(path: Path) -> int:
    """Slices ``z`` of a source image, from its header (``SDDMError`` unless it is 3D)."""
    ndim = image_ndim(path)
    if ndim != 3:
        raise SDDMError(f"{path}: expected a 3D image (x, y, slices), found {ndim}D")
    return int(read_geometry(path)["shape"][2])


def check_volume(volume: np.ndarray, name: str) -> np.ndarray:
    """``volume`` as an array if it is 3D, finite and not constant; ``SDDMError`` naming ``name``."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise SDDMError(f"{name}: expected a 3D volume (z, y, x), got shape {v.shape}")
    IntensityWindow.fit(v, name=name)
    return v


@dataclass(frozen=True)
class ClassicalAdapter:
    """A fitted classical adaptation (histmatch or fda) of target volumes to one source.

    Attributes:
        method: ``"histmatch"`` or ``"fda"``.
        source_images: the folder of source training images it was fitted on.
        source_cases: their case ids, in fitting / pool order.
        beta: FDA's low-frequency fraction (``None`` for histmatch).
        seed: FDA's seed of the source-slice choices (``None`` for histmatch).
        standard: the fitted ``HistogramStandard`` (histmatch).
        pool: the source ``SlicePool`` (fda).
        choices: ``{case: [[source case, source slice], ...]}`` of every volume FDA adapted so far.
    """

    method: str
    source_images: Path
    source_cases: Tuple[str, ...]
    beta: Optional[float] = None
    seed: Optional[int] = None
    standard: Optional[histmatch.HistogramStandard] = None
    pool: Optional[fda_lib.SlicePool] = None
    choices: Dict[str, List[List[Any]]] = field(default_factory=dict, compare=False)

    @classmethod
    def open(cls, method: str, source_images: PathLike, *, beta: float = BETA, seed: int = 0,
             progress: bool = False) -> "ClassicalAdapter":
        """Fit ``method`` on the nnU-Net-named images of the folder ``source_images``: histmatch
        reads every source image (one at a time) and fits the standard; fda reads their headers
        (slice counts) and loads source volumes only when a slice of theirs is drawn."""
        method = check_method(method, classical=True)
        folder = Path(source_images)
        cases = list_source_images(folder)
        names = tuple(cases)
        paths = [cases[c] for c in names]
        if method == "histmatch":
            def volumes() -> Iterator[np.ndarray]:
                for p in progress_bar(paths, desc="fitting histogram standard", unit="image", disable=not progress):
                    yield read_volume(p).data

            standard = histmatch.fit_standard(volumes(), names=[str(p) for p in paths])
            return cls(method, folder, names, standard=standard)
        beta = fda_lib.check_beta(beta)
        counts = tuple(source_slice_count(p) for p in paths)
        pool = fda_lib.SlicePool(names, counts, lambda i: read_volume(paths[i]).data)
        return cls(method, folder, names, beta=beta, seed=int(seed), pool=pool)

    def adapt_volume(self, case: str, volume: np.ndarray, name: Optional[str] = None) -> np.ndarray:
        """Adapt one target volume ``(z, y, x)`` (any units; 3D, finite, not constant) of case id
        ``case``: float32, same shape (histmatch: source units; fda: the target's units).
        ``name``: for error messages (default ``case``)."""
        v = check_volume(volume, name or case)
        if self.method == "histmatch":
            return histmatch.apply_standard(v, self.standard, name=name or case)
        out, chosen = fda_lib.fda_volume(v, self.pool, case, beta=self.beta, seed=self.seed)
        self.choices[case] = [[s, int(k)] for s, k in chosen]
        return out

    def adapt_arrays(self, volumes: Mapping[str, np.ndarray],
                     spacings: Optional[Mapping[str, Sequence[float]]] = None) -> Dict[str, np.ndarray]:
        """``{case: (z, y, x)}`` -> ``{case: (z, y, x) float32}`` (the predictor's ``AdaptFn``;
        ``spacings`` unused: both methods work on the voxel grid)."""
        return {case: self.adapt_volume(case, v) for case, v in volumes.items()}

    def check_images(self, paths: Sequence[PathLike], reader_writer: Any = None) -> None:
        """Read every image as the adaptation will (3D, finite, not constant; ``SDDMError`` naming
        the file otherwise)."""
        for p in paths:
            vol = read_volume(p, reader_writer) if reader_writer is not None else read_volume(p)
            check_volume(vol.data, str(p))
            if self.method == "histmatch":
                histmatch.volume_landmarks(vol.data, self.standard.percentiles, name=str(p))

    def identity(self, **extra: Any) -> Dict[str, Any]:
        """The JSON-able description of the method (package version, method, parameters, seed,
        source folder and cases, the fitted landmarks), plus ``extra``."""
        rec: Dict[str, Any] = {
            "package_version": nnunet_sddm.__version__,
            "method": self.method,
            "parameters": ({"percentiles": list(self.standard.percentiles), "scale": list(self.standard.scale),
                            "foreground": self.standard.foreground} if self.method == "histmatch" else
                           {"beta": self.beta, "window": "centred (2b+1)^2 square, b = floor(beta * min(H, W))",
                            "normalisation": "per volume, 0.5/99.5 percentiles -> [0, 1]"}),
            "seed": self.seed,
            "source": str(Path(self.source_images).resolve()),
            "source_cases": list(self.source_cases),
        }
        if self.method == "histmatch":
            rec["standard"] = self.standard.to_dict()
        rec.update(extra)
        return rec


def adapt_folder_classical(method: str, images: PathLike, output: PathLike, *, source_images: PathLike,
                           beta: float = BETA, seed: int = 0, overwrite: bool = False,
                           progress: bool = True) -> Dict[str, Any]:
    """Adapt every nnU-Net-named image ``CASE_0000<ending>`` of ``images`` with ``method``
    (``"histmatch"`` or ``"fda"``) fitted on the source training images of ``source_images``.

    Args:
        images: folder of target images (3D, single channel, finite, not constant).
        output: the output folder; refused if it exists unless ``overwrite`` (then replaced
            when the new one is complete), and if it is ``images`` or ``source_images``.
        source_images: folder of nnU-Net-named SOURCE training images (e.g. a raw dataset's
            ``imagesTr``), or a raw dataset (id, ``DatasetXXX_Name`` or its folder) whose
            ``imagesTr`` is used (``source_images_folder``).
        beta: FDA's low-frequency fraction in [0, 0.5) (default 0.01); unused by histmatch.
        seed: FDA's seed of the per-slice source choices; unused by histmatch.

    Every output has the input's file name, shape and geometry (the whole NIfTI header; other
    formats: spacing, origin, direction), float32. The folder is built under a hidden staging
    name and renamed into place only when complete. Returns the run record, also written to
    ``output/adaptation.json``: method, parameters, seed, package version, source folder and
    cases, input folder, cases, the fitted landmarks (histmatch) or the per-slice source choices
    (fda), and the SHA-256 of every output.
    """
    method = check_method(method, classical=True)
    images, output, source_images = Path(images), Path(output), source_images_folder(source_images)
    if not images.is_dir():
        raise SDDMError(f"input folder {images} does not exist")
    if output.resolve() in (images.resolve(), source_images.resolve()):
        raise SDDMError(f"output folder {output} is the input or the source folder; choose another one "
                        f"(adapted images keep the input file names)")
    if output.exists() and not output.is_dir():
        raise SDDMError(f"output {output} exists and is not a folder")
    if output.exists() and not overwrite:
        raise SDDMError(f"output folder {output} exists; pass --overwrite to replace it")
    cases = dict(sorted(list_images(images).items()))
    if not cases:
        raise SDDMError(f"{images}: no nnU-Net images (CASE_0000.nii.gz, ...) found")
    adapter = ClassicalAdapter.open(method, source_images, beta=beta, seed=seed, progress=progress)
    digests: Dict[str, str] = {}
    with staging_dir(output, overwrite=overwrite) as tmp:
        for case, path in progress_bar(list(cases.items()), desc=f"adapting ({method})", unit="image",
                                       disable=not progress):
            adapted = adapter.adapt_volume(case, read_volume(path).data, name=str(path))
            digests[path.name] = sha256_file(write_like(adapted, path, tmp / path.name))
        extra: Dict[str, Any] = {"input": str(images.resolve()), "cases": list(cases)}
        if method == "fda":
            extra["choices"] = {c: adapter.choices[c] for c in cases}
        extra["outputs"] = digests
        record = adapter.identity(**extra)
        write_json(record, tmp / RECORD_FILE)
        publishable_permissions(tmp)
    return record
