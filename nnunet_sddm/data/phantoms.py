"""Multi-vendor synthetic cardiac cine MR phantoms (short-axis stacks, ED and ES) in nnU-Net format.

Every subject is an analytic short-axis stack from base (slice 0) to apex: an elliptical LV blood
pool with papillary muscles and trabeculae inside a myocardial ring of variable wall thickness, an
RV crescent wrapped around the septum (with a thin unlabelled free wall), pericardial fat, and the
surrounding chest: body outline, subcutaneous fat, chest-wall muscle, both lungs, liver (apical
slices), spine and descending aorta. Subjects vary in size, shape, position, long-axis tilt, wall
thickness and contraction (ES: LV cavity area x U(0.3, 0.6), myocardial area conserved, so the
wall thickens; RV shrinks too).

Vendor presets (``VENDORS``) change what scanners change: the tissue contrast curve (blood /
myocardium / fat / liver ratios and a gamma), coil bias field (amplitude and shape), Rician noise
level, k-space resolution and window (blur, Gibbs ringing), slice spacing and thickness (through-
plane partial volume), in-plane spacing, intensity scale, and a typical artefact (A: respiratory
ghost, B: bSSFP off-resonance dark band, C: Gibbs ringing of an unfiltered, truncated k-space,
D: stronger blur and vertical ghost). Anatomy statistics are the same for every vendor.

Labels follow the M&Ms convention: 0 background, 1 LV, 2 MYO, 3 RV. Arrays are ``(z, y, x)``
(nnU-Net's order; ``z`` = slice axis); ``cases.json`` records ``spacing`` and ``shape`` in that
order. Subject ``i`` of vendor ``V`` is drawn from ``numpy.random.SeedSequence([seed, ord(V), i])``:
same seed -> byte-identical dataset; different vendors never share a subject.

``matrix`` (``--matrix N``) renders an N x N in-plane matrix over the vendor's field of view, i.e.
the in-plane spacing becomes FOV / N (coarser than the realistic default for small N; meant for
fast CPU tests).

The command ``nnUNetv2_sddm_phantoms`` (``dataset_converters/phantoms.py``) is a thin wrapper of
``generate_phantom_dataset``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunet_sddm.data.raw_dataset import CARDIAC_LABELS, RawDatasetBuilder, log, make_nifti
from nnunet_sddm.data.volumes import save_nifti
from nnunet_sddm.utilities.errors import SDDMError
from nnunet_sddm.utilities.progress import progress_bar

LV, MYO, RV = 1, 2, 3

#: Tissues rendered by the phantom (keys of ``VendorPreset.contrast``).
TISSUES = ("air", "soft", "muscle", "fat", "lung", "liver", "bone", "marrow", "blood", "myo")


@dataclass(frozen=True)
class VendorPreset:
    """Acquisition/appearance of one simulated scanner.

    contrast: relative signal of each tissue before the gamma curve (blood ~ 1).
    gamma: exponent of the contrast curve (signal ** gamma).
    bias_amplitude: log-amplitude of the multiplicative coil field; bias_gradient: fraction of it
    that is a linear (surface-coil) fall-off along bias_direction (radians, image plane).
    noise: Rician noise sigma relative to the blood signal.
    kspace_fraction: acquired fraction of k-space (readout, phase); < 1 blurs.
    kspace_window: "hann" (filtered, little ringing) or "none" (sharp truncation, Gibbs ringing).
    slice_spacing/slice_thickness: mm; in-plane spacing and FOV in mm; scale: intensity of blood.
    artefact: "ghost", "banding", "ringing" or "ghost_vertical"; artefact_strength in [0, 1].
    """

    name: str
    like: str
    contrast: Dict[str, float]
    gamma: float
    bias_amplitude: float
    bias_gradient: float
    bias_direction: float
    noise: float
    kspace_fraction: Tuple[float, float]
    kspace_window: str
    slice_spacing: float
    slice_thickness: float
    inplane_spacing: float
    fov: float
    scale: float
    artefact: str
    artefact_strength: float


def _contrast(**kw) -> Dict[str, float]:
    base = {"air": 0.0}
    base.update(kw)
    assert set(base) == set(TISSUES), set(TISSUES) ^ set(base)
    return base


VENDORS: Dict[str, VendorPreset] = {
    # bSSFP, bright blood, dark myocardium, filtered k-space, mild respiratory ghost.
    "A": VendorPreset("A", "Siemens-like 1.5 T bSSFP",
                      _contrast(soft=0.34, muscle=0.27, fat=0.80, lung=0.04, liver=0.36, bone=0.06,
                                marrow=0.62, blood=1.0, myo=0.29),
                      gamma=1.0, bias_amplitude=0.15, bias_gradient=0.5, bias_direction=-1.57,
                      noise=0.02, kspace_fraction=(1.0, 0.85), kspace_window="hann",
                      slice_spacing=10.0, slice_thickness=8.0, inplane_spacing=1.4, fov=330.0,
                      scale=900.0, artefact="ghost", artefact_strength=0.06),
    # Flatter contrast curve (myocardium close to muscle/liver, fat brighter than blood), strong
    # anterior surface-coil fall-off, more noise, off-resonance dark band.
    "B": VendorPreset("B", "Philips-like 1.5 T bSSFP",
                      _contrast(soft=0.52, muscle=0.50, fat=1.15, lung=0.10, liver=0.58, bone=0.10,
                                marrow=0.85, blood=1.0, myo=0.50),
                      gamma=0.65, bias_amplitude=0.55, bias_gradient=0.85, bias_direction=1.57,
                      noise=0.065, kspace_fraction=(0.9, 0.75), kspace_window="hann",
                      slice_spacing=8.0, slice_thickness=8.0, inplane_spacing=1.25, fov=320.0,
                      scale=2400.0, artefact="banding", artefact_strength=0.6),
    # Sharp (unfiltered) truncated k-space -> Gibbs ringing; thin slices, coarse in-plane.
    "C": VendorPreset("C", "GE-like 1.5 T FIESTA",
                      _contrast(soft=0.40, muscle=0.33, fat=0.70, lung=0.03, liver=0.30, bone=0.05,
                                marrow=0.55, blood=1.0, myo=0.38),
                      gamma=1.2, bias_amplitude=0.3, bias_gradient=0.2, bias_direction=0.0,
                      noise=0.035, kspace_fraction=(0.8, 0.65), kspace_window="none",
                      slice_spacing=6.5, slice_thickness=6.0, inplane_spacing=1.7, fov=340.0,
                      scale=300.0, artefact="ringing", artefact_strength=1.0),
    # Heavier blur, darker blood-to-fat ratio, vertical (left-right phase) ghost.
    "D": VendorPreset("D", "Canon-like 1.5 T SSFP",
                      _contrast(soft=0.45, muscle=0.36, fat=0.95, lung=0.06, liver=0.45, bone=0.08,
                                marrow=0.7, blood=1.0, myo=0.40),
                      gamma=0.9, bias_amplitude=0.35, bias_gradient=0.6, bias_direction=0.0,
                      noise=0.03, kspace_fraction=(0.7, 0.6), kspace_window="hann",
                      slice_spacing=9.0, slice_thickness=9.0, inplane_spacing=1.6, fov=330.0,
                      scale=1500.0, artefact="ghost_vertical", artefact_strength=0.08),
}


@dataclass
class Anatomy:
    """One subject's anatomy (mm, image plane: x to the image right, y down; angles in radians)."""

    lv_center: Tuple[float, float]
    lv_tilt: Tuple[float, float]  # centre shift from base (u = 0) to apex (u = 1)
    r_endo: float  # ED basal endocardial radius
    wall: float  # ED wall thickness
    ellipticity: float
    ellipse_angle: float
    lobe3: float
    lobe3_angle: float
    wall_variation: float
    wall_angle: float
    long_axis: float  # base-to-apex length
    lv_es_area: float  # ES / ED cavity area
    rv_angle: float
    rv_thickness: float
    rv_along: float  # RV ellipse semi-axis along rv_angle / r_epi
    rv_span: float  # RV ellipse semi-axis across / r_epi
    rv_end: float  # u where the RV ends
    rv_es_area: float
    papillary: Tuple[float, float, float]  # radius mm, angles (2)
    peri_fat: float  # pericardial fat thickness mm
    peri_phase: Tuple[float, float]
    body_axes: Tuple[float, float]
    body_center: Tuple[float, float]
    subcut_fat: float
    lungs: Tuple[Tuple[float, ...], Tuple[float, ...]]  # (cx, cy, ax, ay) x2
    liver: Tuple[float, float, float, float, float]  # cx, cy, ax, ay, u_start
    spine: Tuple[float, float, float]
    aorta: Tuple[float, float, float]
    n_slices: int
    outline: Tuple[Tuple[float, ...], ...] = ()  # (amplitude, phase) x3 harmonics: body, lungs
    vessels: Tuple[Tuple[float, float, float], ...] = ()  # pulmonary vessels (x, y, radius) mm


def sample_anatomy(rng: np.random.Generator, slice_spacing: float) -> Anatomy:
    """Draw one subject's anatomy (same statistics for every vendor)."""
    U = rng.uniform
    r_endo, wall = U(19.0, 29.0), U(6.5, 11.5)
    long_axis = U(78.0, 100.0)
    n_slices = int(np.clip(round(long_axis / slice_spacing) + 1, 8, 12))
    lung_l = (U(-95, -80), U(-10, 10), U(50, 62), U(70, 90))
    lung_r = (U(80, 100), U(0, 20), U(50, 62), U(70, 90))
    return Anatomy(
        lv_center=(U(8, 28), U(-12, 8)), lv_tilt=(U(-12, 12), U(-12, 12)),
        r_endo=r_endo, wall=wall, ellipticity=U(0.0, 0.12), ellipse_angle=U(0, np.pi),
        lobe3=U(0.0, 0.05), lobe3_angle=U(0, 2 * np.pi), wall_variation=U(0.0, 0.25),
        wall_angle=U(0, 2 * np.pi), long_axis=long_axis, lv_es_area=U(0.3, 0.6),
        rv_angle=np.pi + U(0.05, 0.55), rv_thickness=U(12.0, 24.0), rv_along=U(0.9, 1.25),
        rv_span=U(1.2, 1.5), rv_end=U(0.65, 0.85), rv_es_area=U(0.35, 0.65),
        papillary=(U(3.0, 5.0), U(-0.9, -0.5), U(0.5, 1.0)),
        peri_fat=U(1.5, 6.0), peri_phase=(U(0, 2 * np.pi), U(0, 2 * np.pi)),
        body_axes=(U(140, 175), U(100, 125)), body_center=(U(-10, 10), U(5, 20)),
        subcut_fat=U(5.0, 22.0), lungs=(lung_l, lung_r),
        liver=(U(-75, -45), U(45, 75), U(70, 95), U(45, 65), U(0.15, 0.55)),
        spine=(U(-8, 8), U(85, 100), U(12, 16)), aorta=(U(15, 35), U(62, 80), U(9, 13)),
        n_slices=n_slices,
        outline=tuple(tuple(x for k in (2, 3, 4) for x in (U(0, 0.06 / k), U(0, 2 * np.pi)))
                      for _ in range(3)),
        vessels=tuple((lx + U(-0.7, 0.7) * lax, ly + U(-0.7, 0.7) * lay, U(1.2, 3.0))
                      for (lx, ly, lax, lay) in (lung_l, lung_r) for _ in range(10)))


def _ellipse(x, y, cx, cy, ax, ay, wobble: Optional[np.ndarray] = None):
    """Inside of an ellipse; ``wobble`` (same shape as x) scales its radius per direction."""
    q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return q <= (1.0 if wobble is None else wobble ** 2)


def _wobble(x, y, cx, cy, harmonics) -> np.ndarray:
    """1 + sum_k a_k cos(k theta - phi_k) around (cx, cy): an irregular outline (2D)."""
    th = np.arctan2(y - cy, x - cx)
    out = np.ones_like(x)
    for k, (a, phi) in zip((2, 3, 4), zip(harmonics[0::2], harmonics[1::2])):
        out += a * np.cos(k * th - phi)
    return out


def render(anat: Anatomy, preset: VendorPreset, phase: str, u: np.ndarray, x: np.ndarray,
           y: np.ndarray, texture: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue signal (before the scanner model) and labels at long-axis positions ``u``.

    u: (Z,) normalised base (0) -> apex (1) positions; x, y: (H, W) mm grids.
    texture: (3, H, W) smooth fields in ~[-1, 1] (tissue texture, trabeculae, blood flow).
    Returns signal (Z, H, W) float32 in contrast units and labels (Z, H, W) uint8.
    """
    es = phase == "ES"
    if es:
        u = u * 1.06  # long-axis shortening: the apex comes earlier
    c = preset.contrast
    Z = u.shape[0]
    u3 = np.asarray(u, dtype=np.float32)[:, None, None]
    X, Y = x[None], y[None]
    sig = np.zeros((Z,) + x.shape, np.float32)
    lab = np.zeros((Z,) + x.shape, np.uint8)

    # Chest: body outline, subcutaneous fat, muscle rim, lungs, liver, spine, aorta.
    bx, by = anat.body_center
    ax, ay = anat.body_axes
    wob = _wobble(x, y, bx, by, anat.outline[0])[None]
    body = _ellipse(X, Y, bx, by, ax, ay, wob)
    inner = _ellipse(X, Y, bx, by, ax - anat.subcut_fat, ay - anat.subcut_fat, wob)
    muscle_in = _ellipse(X, Y, bx, by, ax - anat.subcut_fat - 12, ay - anat.subcut_fat - 10, wob)
    sig = np.where(body, c["fat"], sig)
    sig = np.where(inner, c["muscle"], sig)
    sig = np.where(muscle_in, c["soft"], sig)
    vessels = np.zeros(x.shape, bool)
    for vx, vy, vr in anat.vessels:
        vessels |= np.hypot(x - vx, y - vy) <= vr
    for (lx, ly, lax, lay), harm in zip(anat.lungs, anat.outline[1:]):
        # the lungs get smaller towards the apex (diaphragm); vessels show as bright dots
        shrink = np.clip(1.15 - 0.6 * u3, 0.3, 1.0)
        lung = _ellipse(X, Y, lx, ly - 10 * u3, lax * shrink, lay * shrink, _wobble(x, y, lx, ly, harm)[None])
        lung &= muscle_in
        sig = np.where(lung, np.where(vessels[None], 0.6 * c["blood"], c["lung"]), sig)
    lcx, lcy, lax_, lay_, lu = anat.liver
    grow = np.clip((u3 - lu) / 0.3, 0, 1.2)
    liver = _ellipse(X, Y, lcx, lcy, lax_ * grow + 1e-3, lay_ * grow + 1e-3) & muscle_in
    sig = np.where(liver, c["liver"], sig)
    sx, sy, sr = anat.spine
    sig = np.where(_ellipse(X, Y, sx, sy, sr, sr * 0.9), c["bone"], sig)
    sig = np.where(_ellipse(X, Y, sx, sy, sr - 2.5, sr * 0.9 - 2.5), c["marrow"], sig)
    aox, aoy, aor = anat.aorta
    sig = np.where(_ellipse(X, Y, aox, aoy, aor, aor), c["blood"], sig)

    # LV geometry per slice: taper from base to apex, tilt, shape harmonics.
    cx = anat.lv_center[0] + anat.lv_tilt[0] * u3
    cy = anat.lv_center[1] + anat.lv_tilt[1] * u3
    dx, dy = X - cx, Y - cy
    r = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    shape = (1 + anat.ellipticity * np.cos(2 * (th - anat.ellipse_angle))
             + anat.lobe3 * np.cos(3 * th - anat.lobe3_angle))
    taper = np.sqrt(np.clip(1 - np.clip(u3, 0, None) ** 2.5, 0, 1))
    r_epi_ed = (anat.r_endo + anat.wall) * taper
    wall_u = anat.wall * (1 + 0.25 * u3) * (1 + anat.wall_variation * np.cos(th - anat.wall_angle))
    r_endo_ed = np.clip(r_epi_ed - wall_u, 0, None)
    if es:
        r_endo = r_endo_ed * np.sqrt(anat.lv_es_area)
        r_epi = np.sqrt(r_endo ** 2 + r_epi_ed ** 2 - r_endo_ed ** 2)
    else:
        r_endo, r_epi = r_endo_ed, r_epi_ed
    epi = r <= r_epi * shape
    endo = r <= r_endo * shape

    # RV: ellipse whose inner part overlaps the LV epicardium -> crescent around the septum.
    rv_scale = np.sqrt(np.clip(1 - (np.clip(u3, 0, None) / anat.rv_end) ** 3, 0, 1))
    r_epi_mean = (anat.r_endo + anat.wall) * taper
    thick = anat.rv_thickness * rv_scale * (anat.rv_es_area ** 0.7 if es else 1.0)
    along = anat.rv_along * r_epi_mean * (0.92 if es else 1.0)
    span = anat.rv_span * r_epi_mean * rv_scale * (anat.rv_es_area ** 0.25 if es else 1.0)
    dist = r_epi_mean + thick - along
    ca, sa = np.cos(anat.rv_angle), np.sin(anat.rv_angle)
    rvx, rvy = cx + dist * ca, cy + dist * sa
    p_along = (X - rvx) * ca + (Y - rvy) * sa
    p_across = -(X - rvx) * sa + (Y - rvy) * ca
    rv_q = (p_along / np.maximum(along, 1e-3)) ** 2 + (p_across / np.maximum(span, 1e-3)) ** 2
    rv_ok = (thick > 1.0) & (span > 2.0)
    rv_cav = (rv_q <= 1.0) & ~epi & rv_ok
    rv_wall = (rv_q <= (1 + 3.0 / np.maximum(along, 1e-3)) ** 2) & ~epi & ~rv_cav & rv_ok

    # Pericardial fat: patchy rim around the heart.
    heart = epi | rv_cav | rv_wall
    patch = 0.5 + 0.5 * np.cos(th - anat.peri_phase[0]) * np.cos(2 * th - anat.peri_phase[1])
    peri = (r <= (r_epi * shape + anat.peri_fat * (0.3 + patch) + 2.5)) & ~heart & (r_epi > 3)
    peri |= rv_ok & (rv_q <= (1 + (anat.peri_fat * patch + 4.0) / np.maximum(along, 1e-3)) ** 2) & ~heart
    sig = np.where(peri & body, c["fat"], sig)
    sig = np.where(rv_wall, c["myo"], sig)
    sig = np.where(rv_cav, c["blood"] * (0.95 + 0.05 * texture[2][None]), sig)
    sig = np.where(epi, c["myo"] * (1 + 0.06 * texture[0][None]), sig)

    # LV cavity with trabeculae near the wall and two papillary muscles (labelled LV).
    near_wall = endo & (r >= 0.8 * r_endo * shape)
    trab = near_wall & (texture[1][None] > 0.35)
    pap_r, pa1, pa2 = anat.papillary
    pap = np.zeros_like(endo)
    for ang in (anat.rv_angle + np.pi + pa1, anat.rv_angle + np.pi + pa2):
        pr = r_endo * (0.62 if not es else 0.55)
        px, py = cx + pr * np.cos(ang), cy + pr * np.sin(ang)
        rad = pap_r * np.clip(r_endo / 12.0, 0, 1) * (1.15 if es else 1.0)
        pap |= (np.hypot(X - px, Y - py) <= rad) & endo
    blood = c["blood"] * (0.93 + 0.07 * texture[2][None])
    sig = np.where(endo, blood, sig)
    sig = np.where(trab | pap, c["myo"] * 1.1, sig)

    # Tissue texture everywhere (a few percent).
    sig = sig * (1 + 0.04 * texture[0][None])
    lab[epi] = MYO
    lab[endo] = LV
    lab[rv_cav] = RV
    return sig.astype(np.float32), lab


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field of roughly unit amplitude: coarse Gaussian noise, cubic upsampling."""
    coarse = rng.standard_normal((cells + 3, cells + 3))
    f = ndimage.zoom(coarse, ((shape[0] + 0.0) / (cells + 3), (shape[1] + 0.0) / (cells + 3)), order=3,
                     mode="reflect", grid_mode=True)
    f = f[: shape[0], : shape[1]]
    return (f / (np.abs(f).max() + 1e-8)).astype(np.float32)


def scanner(signal: np.ndarray, preset: VendorPreset, x: np.ndarray, y: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Apply the vendor's acquisition model to a (Z, H, W) tissue signal; returns intensities."""
    Z, H, W = signal.shape
    img = np.power(np.clip(signal, 0, None), preset.gamma)
    # k-space resolution and window (blur; Gibbs ringing for an unfiltered truncation).
    ky = np.fft.fftfreq(H)[:, None]
    kx = np.fft.fftfreq(W)[None, :]
    fr, fp = preset.kspace_fraction  # readout (x), phase (y)
    inside = (np.abs(kx) <= 0.5 * fr) & (np.abs(ky) <= 0.5 * fp)
    if preset.kspace_window == "hann":
        win = (np.cos(np.pi * np.clip(kx / fr, -0.5, 0.5)) * np.cos(np.pi * np.clip(ky / fp, -0.5, 0.5)))
        win = np.sqrt(np.clip(win, 0, 1))
    else:
        win = np.ones((H, W))
    k = np.fft.fft2(img, axes=(-2, -1)) * (inside * win)[None]
    if preset.artefact in ("ghost", "ghost_vertical"):
        # periodic k-space phase modulation of alternate lines -> N/2 ghost of the anatomy.
        axis = -2 if preset.artefact == "ghost" else -1
        n = H if axis == -2 else W
        lines = np.exp(1j * preset.artefact_strength * np.pi * (np.arange(n) % 2))
        k = k * (lines[:, None] if axis == -2 else lines[None, :])[None]
    img = np.real(np.fft.ifft2(k, axes=(-2, -1)))
    img = np.clip(img, 0, None)
    if preset.artefact == "banding":
        # off-resonance dark band, a curved line at a random distance from the centre
        r0 = rng.uniform(90, 130)
        ang = rng.uniform(0, 2 * np.pi)
        cxb, cyb = 250 * np.cos(ang), 250 * np.sin(ang)
        d = np.abs(np.hypot(x - cxb, y - cyb) - (250 - r0 + rng.uniform(-20, 20)))
        img = img * (1 - preset.artefact_strength * np.exp(-(d / 4.0) ** 2))[None]
    # coil bias field: linear fall-off along a direction + smooth random component.
    direction = preset.bias_direction + rng.uniform(-0.3, 0.3)
    ramp = (x * np.cos(direction) + y * np.sin(direction)) / (0.5 * preset.fov)
    smooth = _smooth_field(rng, x.shape, 3)
    log_bias = preset.bias_amplitude * (preset.bias_gradient * ramp + (1 - preset.bias_gradient) * smooth)
    img = img * np.exp(log_bias)[None]
    # Rician noise (magnitude of complex Gaussian noise added to the signal).
    sigma = preset.noise
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.round(img * preset.scale).astype(np.float32)


def generate_subject(vendor: str, index: int, seed: int = 0,
                     matrix: Optional[int] = None) -> Dict[str, dict]:
    """Render subject ``index`` of ``vendor``: {"ED": {...}, "ES": {...}, "anatomy": Anatomy}.

    Each phase dict has ``image`` (Z, H, W) float32 intensities, ``label`` (Z, H, W) uint8 and
    ``spacing`` (z, y, x) in mm.
    """
    preset = get_vendor(vendor)
    ss = np.random.SeedSequence([int(seed), ord(preset.name), int(index)])
    anat_rng, tex_rng, scan_rng = (np.random.default_rng(s) for s in ss.spawn(3))
    anat = sample_anatomy(anat_rng, preset.slice_spacing)
    n = int(matrix) if matrix else int(round(preset.fov / preset.inplane_spacing))
    if n < 32:
        raise SDDMError(f"--matrix {n}: the in-plane matrix must be at least 32")
    dxy = preset.fov / n
    coords = (np.arange(n) - (n - 1) / 2.0) * dxy
    x, y = (g.astype(np.float32) for g in np.meshgrid(coords, coords, indexing="xy"))
    texture = np.stack([_smooth_field(tex_rng, (n, n), max(4, int(preset.fov / 12))),
                        _smooth_field(tex_rng, (n, n), max(4, int(preset.fov / 5))),
                        _smooth_field(tex_rng, (n, n), 4)])
    # slice positions along the long axis (mm from base), covering the heart base to apex
    z_mm = np.arange(anat.n_slices) * preset.slice_spacing
    coverage = anat.long_axis + 0.4 * preset.slice_spacing
    out: Dict[str, dict] = {"anatomy": anat}
    for phase in ("ED", "ES"):
        # through-plane partial volume: average the signal over the slice thickness
        offsets = np.array([-1 / 3, 0.0, 1 / 3]) * preset.slice_thickness
        signal = np.zeros((anat.n_slices, n, n), np.float32)
        label = None
        for off in offsets:
            s, lab = render(anat, preset, phase, (z_mm + off) / coverage, x, y, texture)
            signal += s / len(offsets)
            if off == 0.0:
                label = lab
        image = scanner(signal, preset, x, y, scan_rng)
        out[phase] = {"image": image, "label": label, "spacing": (preset.slice_spacing, dxy, dxy)}
    return out


def get_vendor(vendor: str) -> VendorPreset:
    """The preset of vendor letter ``vendor`` (case-insensitive)."""
    key = str(vendor).upper()
    if key not in VENDORS:
        raise SDDMError(f"unknown phantom vendor {vendor!r}; choose one of {', '.join(VENDORS)}")
    return VENDORS[key]


def generate_phantom_dataset(dataset_id: int, vendor: str, n_cases: int, n_test_cases: int = 0,
                             seed: int = 0, name: Optional[str] = None, overwrite: bool = False,
                             matrix: Optional[int] = None, labels: Optional[Sequence[str]] = None) -> Path:
    """Write ``$nnUNet_raw/DatasetXXX_<name>`` with phantoms of one vendor; returns its folder.

    n_cases: training subjects (each gives two cases, ``<subject>_ED`` and ``<subject>_ES``, in
    imagesTr/labelsTr); n_test_cases: further subjects for imagesTs/labelsTs. Subjects are named
    ``Ph<V><index:04d>``. Default name ``Phantom<V>``. Also writes ``cases.json`` and a
    patient-level ``splits_final.json`` in ``$nnUNet_preprocessed/DatasetXXX_<name>/`` (an
    existing one is kept). labels: the structures to label (names of ``CARDIAC_LABELS``, e.g.
    ``["LV", "MYO"]`` for a Sunnybrook-like dataset; None: all); the others stay in the images but
    are background in the label maps and absent from ``dataset.json``. Same arguments ->
    byte-identical files.
    """
    preset = get_vendor(vendor)
    keep = dict(CARDIAC_LABELS) if labels is None else {}
    for structure in labels or ():
        if structure == "background" or structure not in CARDIAC_LABELS:
            raise SDDMError(f"phantom labels: unknown structure {structure!r}; choose from "
                            f"{', '.join(k for k in CARDIAC_LABELS if k != 'background')}")
        keep[structure] = CARDIAC_LABELS[structure]
    keep = {"background": 0, **{k: v for k, v in CARDIAC_LABELS.items() if k in keep and k != "background"}}
    dropped = [v for k, v in CARDIAC_LABELS.items() if k not in keep]
    if int(n_cases) < 1 or int(n_test_cases) < 0:
        raise SDDMError(f"--cases must be >= 1 and --test-cases >= 0 (got {n_cases}, {n_test_cases})")
    if matrix is not None and int(matrix) < 32:
        raise SDDMError(f"--matrix {matrix}: the in-plane matrix must be at least 32")
    name = name or f"Phantom{preset.name}"
    extra = {"phantom": {"vendor": preset.name, "like": preset.like, "seed": int(seed),
                         "matrix": matrix, "preset": asdict(preset)}}
    if dropped:
        extra["phantom"]["labels"] = [k for k in keep if k != "background"]
    with RawDatasetBuilder(dataset_id, name, overwrite=overwrite, extra_json=extra, labels=keep,
                           description=f"Synthetic short-axis cine phantoms, vendor {preset.name} "
                                       f"({preset.like}), seed {seed}") as b:
        total = int(n_cases) + int(n_test_cases)
        for i in progress_bar(range(total), desc=f"phantoms {preset.name}", unit="subject",
                              disable=None):
            split = "Tr" if i < n_cases else "Ts"
            subject = f"Ph{preset.name}{i:04d}"
            phases = generate_subject(preset.name, i, seed=seed, matrix=matrix)
            for phase in ("ED", "ES"):
                ph = phases[phase]
                case = f"{subject}_{phase}"
                save_nifti(make_nifti(ph["image"], ph["spacing"], np.float32), b.image_path(case, split))
                label = np.where(np.isin(ph["label"], dropped), 0, ph["label"]).astype(np.uint8) if dropped \
                    else ph["label"]
                save_nifti(make_nifti(label, ph["spacing"], np.uint8), b.label_path(case, split))
                b.add_record({"case": case, "subject": subject, "phase": phase, "split": split,
                              "vendor": preset.name, "centre": None, "group": None, "seed": int(seed),
                              "subject_index": i, "spacing": [float(s) for s in ph["spacing"]],
                              "shape": [int(s) for s in ph["image"].shape],
                              "source": "phantom"})
    log(f"wrote {b.final} ({b.summary()}); splits: {b.splits_path or 'kept/none'}")
    return b.final
