"""3D image volumes read the way nnU-Net reads them and written back with their geometry intact.

Array convention (nnU-Net's): ``(z, y, x)`` where ``z`` is the file's third voxel axis, i.e. the
through-plane (slice) axis of a short-axis cine stack. Slices are ``volume[k]``.
Images are written by copying the original file's header (NIfTI: affine, qform/sform codes,
pixdim; other formats: origin, spacing, direction) and replacing only the voxel data.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.files import atomic_path

_NIFTI = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A single-channel 3D image.

    data: float32 array ``(z, y, x)``; spacing: voxel size in mm in the same order;
    path: the file it came from (its header is the template for writing).
    """

    data: np.ndarray
    spacing: tuple
    path: Path
    properties: dict = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[0])


def image_ndim(path: os.PathLike) -> int:
    """Number of dimensions stored in an image file's header (without reading voxels)."""
    path = Path(path)
    try:
        if path.name.endswith(_NIFTI):
            import nibabel as nib

            return int(len(nib.load(str(path)).shape))
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        return int(r.GetDimension())
    except Exception as e:  # unreadable or corrupt
        raise SDDMError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None


def read_volume(path: os.PathLike, reader_writer=None) -> Volume:
    """Read a 3D single-channel image with ``reader_writer`` (an nnU-Net ``BaseReaderWriter``
    instance; default: the one nnU-Net picks for the file ending).

    Raises ``SDDMError`` for unreadable files, images that are not 3D, and NaN/inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise SDDMError(f"{path}: file not found")
    ndim = image_ndim(path)
    if ndim != 3:
        raise SDDMError(f"{path}: expected a 3D image (x, y, slices), found {ndim}D")
    if reader_writer is None:
        reader_writer = default_reader_writer(path)
    try:
        data, props = reader_writer.read_images([str(path)])
    except Exception as e:
        raise SDDMError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    data = np.asarray(data[0], dtype=np.float32)
    if data.ndim != 3:
        raise SDDMError(f"{path}: expected a single-channel 3D image, the reader gave shape {data.shape}")
    finite = np.isfinite(data).all()
    if finite and path.name.endswith(_NIFTI):
        # SimpleITK's NIfTI reader silently turns NaN into 0; check the stored values themselves.
        import nibabel as nib

        finite = bool(np.isfinite(np.asanyarray(nib.load(str(path)).dataobj)).all())
    if not finite:
        raise SDDMError(f"{path}: image contains NaN or infinite values")
    return Volume(data=data, spacing=tuple(float(s) for s in props["spacing"]), path=path,
                  properties=props)


def default_reader_writer(path: os.PathLike):
    """The nnU-Net reader/writer instance nnU-Net would pick for this file's ending."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    name = Path(path).name
    ending = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".tif", ".tiff", ".png")
                   if name.endswith(e)), Path(path).suffix)
    try:
        cls = determine_reader_writer_from_file_ending(ending, str(path), allow_nonmatching_filename=False,
                                                       verbose=False)
    except Exception as e:
        raise SDDMError(f"{path}: no nnU-Net reader for this file ({type(e).__name__}: {e})") from None
    return cls()


def nifti_bytes(img, compressed: bool = True) -> bytes:
    """Bytes of a nibabel ``Nifti1Image`` file; gzip-compressed with a fixed header (mtime 0,
    no file name) so that the same content always gives the same bytes."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compressed else raw


def save_nifti(img, path: os.PathLike) -> Path:
    """Write a nibabel image to ``path`` (``.nii.gz`` or ``.nii``) atomically and byte-deterministically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(nifti_bytes(img, compressed=path.name.endswith(".gz")))
    return path


def write_like(data: np.ndarray, template: os.PathLike, out_path: os.PathLike, dtype=np.float32) -> Path:
    """Write ``data`` (z, y, x) as ``dtype`` (default float32; e.g. uint8 for a label map) with
    the geometry of the ``template`` image file.

    The output has the template's shape, spacing, origin, direction/affine (NIfTI: the whole
    header, qform and sform codes included). Written atomically (NIfTI: byte-deterministic);
    returns ``out_path``.
    """
    template, out_path = Path(template), Path(out_path)
    data = np.asarray(data, dtype=dtype)
    with atomic_path(out_path) as tmp:
        if template.name.endswith(_NIFTI):
            import nibabel as nib

            src = nib.load(str(template))
            arr = data.transpose(2, 1, 0)
            if arr.shape != tuple(src.shape):
                raise SDDMError(f"{out_path}: data shape {arr.shape} differs from {template} {src.shape}")
            header = src.header.copy()
            header.set_data_dtype(data.dtype)
            img = nib.Nifti1Image(arr, src.affine, header)
            img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
            img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
            img.header["scl_slope"] = np.nan
            img.header["scl_inter"] = np.nan
            tmp.write_bytes(nifti_bytes(img, compressed=out_path.name.endswith(".gz")))
        else:
            import SimpleITK as sitk

            src = sitk.ReadImage(str(template))
            if tuple(reversed(src.GetSize())) != data.shape:
                raise SDDMError(f"{out_path}: data shape {data.shape} differs from {template}")
            img = sitk.GetImageFromArray(data)
            img.CopyInformation(src)
            sitk.WriteImage(img, str(tmp))
    return out_path


def read_geometry(path: os.PathLike) -> dict:
    """Shape, spacing, origin and direction of an image file as stored (for comparisons)."""
    path = Path(path)
    if path.name.endswith(_NIFTI):
        import nibabel as nib

        img = nib.load(str(path))
        return {"shape": tuple(img.shape), "spacing": tuple(float(z) for z in img.header.get_zooms()),
                "affine": np.asarray(img.affine, dtype=np.float64)}
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return {"shape": tuple(r.GetSize()), "spacing": tuple(r.GetSpacing()), "origin": tuple(r.GetOrigin()),
            "direction": tuple(r.GetDirection())}


def same_geometry(a: os.PathLike, b: os.PathLike, atol: float = 1e-5) -> bool:
    """True if two image files have equal shape, spacing and placement (affine/origin/direction)."""
    ga, gb = read_geometry(a), read_geometry(b)
    if ga.keys() != gb.keys() or ga["shape"] != gb["shape"]:
        return False
    for k in ga:
        if k == "shape":
            continue
        if not np.allclose(np.asarray(ga[k], dtype=float), np.asarray(gb[k], dtype=float), atol=atol):
            return False
    return True
