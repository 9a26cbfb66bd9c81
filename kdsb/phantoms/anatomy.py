"""Phantom chest CTs: the anatomy drawn from a seed, rasterised into HU with its lung mask.

A phantom is a simple but HU-realistic chest: a body ellipse (skin and muscle ~40 HU, a fat
layer ~-100 HU), ribs (ring segments that move with z, ~+700 HU), a sternum and a spine
(cortical shell, cancellous body, intervertebral discs, spinal canal, posterior arch), a curved
patient table below the body separated from it by air, a circular field of view outside which
pixels are padding, two lungs (~-850 HU, denser posteriorly) kept apart by the mediastinum, with
domed bases and apices, branching vessels (~+40 HU, thinner outward), the trachea and both main
bronchi (air, inside the mediastinum, entering the lungs at the hila) and nodules (~+30 HU,
slightly irregular spheres). A patient is a cancer case (label 1) when one of its nodules has a
radius of at least `CANCER_RADIUS_MM`; other patients have only small nodules or none. Some
nodules are juxtapleural: they touch the chest wall, the case a lung mask must not cut away.

Geometry follows DESIGN.md: arrays are (z, y, x) with axis 0 inferior → superior, axis 1
anterior → posterior, axis 2 right → left, so patient coordinates (mm) increase along every
axis; `spacing` and `origin` are in mm in (z, y, x) order.

Sizing: `scale` shrinks the anatomy, the field of view and the scanned length together (nodule
radii stay physical, so the label rule holds). The lungs' volume goes with the scale's cube:
0.2–0.4 L at 0.5, 0.3–0.7 L at 0.6 (under the 0.5 L `kdsb preprocess` accepts: such phantoms
test the synthesis, not the pipeline), 5–11 L at 1.5 (over its 10 L); `synth` warns of each
patient outside those bounds. The demo's `--size 128 --scale 0.8` gives ~2 mm pixels and lungs a
CPU trains on in minutes; `--scale 1` with `--size 512` is an adult scan at ~0.7 mm pixels.

Everything is drawn from the random generator: the same state gives the same phantom.
The parts: `chest` (the anatomy drawn and its shapes), `vessels`, `nodules`, `rasterise`
(painting mm shapes into voxels).

Generation is vectorised NumPy, one axial slice at a time for the body and one small box per
vessel segment or nodule, so a 512 × 512 × 200 phantom takes seconds and well under 1 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kdsb.errors import UsageError
from kdsb.hu import AIR_HU, PARENCHYMA_HU
from kdsb.phantoms.chest import (
    CANCELLOUS_BONE_HU,
    CORTEX_FRACTION,
    DISC_HU,
    HU_MAX,
    HU_MIN,
    LUNG_POSTERIOR_GRADIENT_HU,
    MEDIASTINUM_HU,
    RIB_HU,
    SKIN_MUSCLE_HU,
    VESSEL_HU,
    draw_chest,
    static_slice,
    uniform,
)
from kdsb.phantoms.nodules import CANCER_RADIUS_MM, Nodule, draw_nodules, paint_nodule
from kdsb.phantoms.rasterise import Grid, paint_capsule
from kdsb.phantoms.vessels import grow_vessels

# Image noise, HU.
IMAGE_NOISE_HU = (10.0, 25.0)  # per-patient standard deviation of the image noise
LUNG_TEXTURE_HU = 30.0  # extra standard deviation of the lung parenchyma (texture)
PARENCHYMA_MAX_HU = -500  # lung voxels above this are vessels or nodules: no texture

# Acquisition, mm (multiplied by `scale` except the slice spacing).
FOV_MM = (300.0, 380.0)
Z_EXTENT_MM = (220.0, 300.0)
SLICE_MM = (1.0, 2.5)
MIN_SIZE, MAX_SIZE = 32, 1024
MIN_SCALE, MAX_SCALE = 0.4, 1.5
SLAB = 16  # slices per noise block: bounds the float32 temporaries


@dataclass
class Truth:
    """The ground truth of one phantom patient.

    Attributes:
        lung_mask: uint8 0/1, shape (z, y, x): both lungs with their vessels and nodules, without
            the trachea and main bronchi.
        spacing: voxel size in mm, (z, y, x).
        origin: patient coordinates in mm of voxel [0, 0, 0], (z, y, x).
        nodules: the nodules, in patient coordinates.
        label: 1 when a nodule has radius >= `CANCER_RADIUS_MM`, else 0.
    """

    lung_mask: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    nodules: list[Nodule]
    label: int


@dataclass
class Phantom(Truth):
    """A phantom chest CT: its truth plus the image.

    Attributes:
        hu: int16 HU, shape (z, y, x); air (-1000 HU) outside the field of view.
        padding_mask: bool (y, x), True outside the circular field of view (the same for every
            slice); written as DICOM padding.
    """

    hu: np.ndarray
    padding_mask: np.ndarray


def check_options(size: int, scale: float) -> None:
    """Raise UsageError for an image side (pixels) or an anatomy scale out of range."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"expected --size between {MIN_SIZE} and {MAX_SIZE}, received {size}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise UsageError(f"expected --scale between {MIN_SCALE} and {MAX_SCALE}, received {scale}")


def _drop_lung_fragments(hu: np.ndarray, lung: np.ndarray) -> None:
    """Keep the two lungs only: slivers the voxel grid cuts off (at the domes, beside a bronchus)
    become mediastinum."""
    components, count = ndimage.label(lung)
    if count <= 2:
        return
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    dropped = np.ones(count + 1, bool)
    dropped[0] = False
    dropped[np.argsort(sizes)[-2:]] = False
    fragments = dropped[components]
    hu[fragments] = MEDIASTINUM_HU
    lung[fragments] = 0


def make_phantom(
    rng: np.random.Generator,
    *,
    size: int = 128,
    cancer: bool,
    fov_mm: float | None = None,
    slice_mm: float | None = None,
    z_extent_mm: float | None = None,
    scale: float = 1.0,
) -> Phantom:
    """Generate one phantom chest CT.

    Args:
        rng: the source of every random choice (same state, same phantom).
        size: axial image side in pixels (rows = columns = size).
        cancer: give it at least one nodule of radius 8–14 mm (label 1); otherwise 0–3 nodules
            of radius 2–4 mm (label 0).
        fov_mm: reconstruction diameter in mm; drawn from `FOV_MM` × scale when None. The
            pixel spacing is fov_mm / size.
        slice_mm: slice spacing in mm; drawn from `SLICE_MM` when None.
        z_extent_mm: scanned length in mm; drawn from `Z_EXTENT_MM` × scale when None.
        scale: physical size of the anatomy and field of view relative to an adult chest (0.5
            makes a half-size patient: small volumes for demos). Nodule radii are not scaled.

    Returns:
        The phantom: int16 HU (z, y, x), its lung mask, geometry, nodules and label.

    Raises:
        UsageError: size or scale out of range.
        KdsbError: a nodule found no room in the lungs (scale too small).
    """
    check_options(size, scale)
    fov = fov_mm if fov_mm is not None else uniform(rng, FOV_MM) * scale
    pixel = round(fov / size, 4)
    slice_spacing = round(slice_mm if slice_mm is not None else uniform(rng, SLICE_MM), 3)
    extent = z_extent_mm if z_extent_mm is not None else uniform(rng, Z_EXTENT_MM) * scale
    n_slices = max(int(round(extent / slice_spacing)), 1)
    spacing = np.array([slice_spacing, pixel, pixel])
    half = (size - 1) / 2.0 * pixel
    origin = np.round([rng.uniform(-400.0, -100.0), -half, -half], 4)
    shape = (n_slices, size, size)
    a = draw_chest(rng, size * pixel / 2.0, pixel, origin[0], n_slices * slice_spacing)

    y = (origin[1] + pixel * np.arange(size, dtype=np.float32))[:, None]
    x = (origin[2] + pixel * np.arange(size, dtype=np.float32))[None, :]
    outside_fov = y**2 + x**2 > (size * pixel / 2.0) ** 2
    static_hu, rib_ring = static_slice(a, y, x)
    # Where the cavity narrows towards the apex, the chest wall's muscle fills in.
    widest_cavity = static_hu == MEDIASTINUM_HU
    theta = np.arctan2((y - a.body_cy) / a.cavity_ay, x / a.cavity_ax)
    spine_body = (y - a.spine_y) ** 2 + x**2 <= ((1.0 - CORTEX_FRACTION) * a.spine_r) ** 2
    rib_angle = a.rib_count * theta + a.rib_phase
    gradient = LUNG_POSTERIOR_GRADIENT_HU * np.clip((y - a.lung_cy) / a.lung_ay + 0.5, 0, 1)
    lung_hu = (PARENCHYMA_HU + gradient).astype(np.float32)

    hu = np.empty(shape, np.int16)
    lung = np.empty(shape, np.uint8)
    for k in range(n_slices):
        z = origin[0] + k * slice_spacing
        image = static_hu.copy()
        image[widest_cavity & ~a.cavity(z, y, x)] = SKIN_MUSCLE_HU
        ribs = rib_ring & (np.sin(rib_angle + 2.0 * np.pi * z / a.rib_pitch) > 0.3)
        image[ribs] = RIB_HU
        in_disc = math.cos(2.0 * np.pi * z / a.rib_pitch) > 0.85
        image[spine_body] = DISC_HU if in_disc else CANCELLOUS_BONE_HU
        lungs = a.lung(z, y, x, -1) | a.lung(z, y, x, 1)
        image[lungs] = np.broadcast_to(lung_hu, image.shape)[lungs]
        hu[k] = image
        lung[k] = lungs

    grid = Grid(shape, spacing, origin)
    min_vessel_radius = 0.5 * pixel
    for side in (-1, 1):
        for start, end, radius in grow_vessels(rng, a, side, min_vessel_radius):
            paint_capsule(hu, lung, grid, start, end, radius, VESSEL_HU, where=lung)
    nodules = draw_nodules(rng, a, cancer)
    for nodule in nodules:
        paint_nodule(rng, hu, lung, grid, nodule)
    for start, end, radius in a.airways():
        paint_capsule(hu, lung, grid, start, end, radius, AIR_HU)
    _drop_lung_fragments(hu, lung)

    noise = uniform(rng, IMAGE_NOISE_HU)
    for first in range(0, n_slices, SLAB):
        part = slice(first, first + SLAB)
        parenchyma = (lung[part] == 1) & (hu[part] < PARENCHYMA_MAX_HU)
        sigma = noise + LUNG_TEXTURE_HU * parenchyma.astype(np.float32)
        values = hu[part] + sigma * rng.standard_normal(sigma.shape, dtype=np.float32)
        np.clip(np.rint(values), HU_MIN, HU_MAX, out=values)
        values[:, outside_fov] = AIR_HU
        hu[part] = values
    label = int(any(n.radius_mm >= CANCER_RADIUS_MM for n in nodules))
    return Phantom(
        lung_mask=lung,
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in origin),
        nodules=nodules,
        label=label,
        hu=hu,
        padding_mask=np.ascontiguousarray(np.broadcast_to(outside_fov, (size, size))),
    )
