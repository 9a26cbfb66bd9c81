"""Lung lesions drawn into a CT volume: where they sit, what they look like, their ground truth.

This is how kdsb tests its own lung mask on real anatomy, and how researchers can test theirs:
a lesion of a chosen kind, size and place is painted into a CT volume (real or phantom) at the
volume's own resolution, with partial volume at its edge and a texture like soft tissue, and its
voxels are returned as ground truth.

Kinds (`KINDS`):

- ``solid``: a lobulated soft-tissue mass (+20 to +60 HU), its radius wobbling by up to
  `LOBULATION` with direction;
- ``spiculated``: a solid core with thin spicules radiating into the lung;
- ``part_solid``: ground glass (-700 to -300 HU) around an off-centre solid core;
- ``ground_glass``: ground glass only; vessels running through it stay visible;
- ``small_solid``: a solid nodule, meant for radii of 3–6 mm.

Places (`PLACES`) are found on the surface of a lung mask of the scan (the lungs before any
lesion, with their vessels): ``intrapulmonary`` (surrounded by lung, at least its radius plus
`INTRAPULMONARY_MARGIN_MM` from the surface), and touching the pleura from inside the lung:
``paravertebral`` (posterior, beside the spine), ``lateral``, ``anterior``, ``paramediastinal``,
``diaphragmatic`` and ``apical``. A surface voxel's place follows from the lung surface's outward
normal (the gradient of the smoothed mask) and its position: see `surface_places`. A pleural
lesion's centre lies `PLEURAL_DEPTH` × radius inside the lung, so a flat base of it meets the
pleura, as juxtapleural tumours do; every lesion is clipped to the lungs it was placed with
(a lesion grows inside the lung; it does not invade the chest wall or the mediastinum). Pass
`lung_parenchyma` of a lung mask as those lungs: a mask's own over-reach (tissue a lung mask takes
in beside the lungs, an airway it missed) then never becomes a lesion site or ground truth.

Arrays are (z, y, x) in kdsb's canonical orientation (axis 0 inferior → superior, axis 1
anterior → posterior, axis 2 right → left); spacings in mm, HU as int16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from kdsb.errors import KdsbError
from kdsb.preprocessing.lungs import AIR_THRESHOLD_HU
from kdsb.preprocessing.lungs.thresholds import (
    GROUND_GLASS_MAX_HU,
    GROUND_GLASS_MIN_HU,
    MM3_PER_ML,
)

KINDS = ("solid", "spiculated", "part_solid", "ground_glass", "small_solid")
PLACES = (
    "intrapulmonary",
    "paravertebral",
    "lateral",
    "anterior",
    "paramediastinal",
    "diaphragmatic",
    "apical",
)

SOLID_HU = (20.0, 60.0)  # mean HU of a solid lesion, drawn per lesion
GROUND_GLASS_HU = (GROUND_GLASS_MIN_HU, GROUND_GLASS_MAX_HU)  # mean HU of ground glass, per lesion
LESION_NOISE_HU = 18.0  # standard deviation of the lesion's own texture
TEXTURE_MM = 1.5  # correlation length of that texture
LOBULATION = 0.18  # largest relative radius wobble of a lobulated mass
SURFACE_WOBBLE = 0.08  # relative radius wobble of the other kinds
LOBES = (3, 6)  # number of lobes of a lobulated mass (low, high)
SPICULES = (8, 18)  # number of spicules (low, high)
SPICULE_LENGTH = (1.4, 2.0)  # spicule tip distance from the centre, × radius
SPICULE_RADIUS_MM = (0.6, 1.1)  # spicule radius at its root; it tapers to a third at the tip
CORE_FRACTION = (0.3, 0.55)  # part-solid: radius of the solid core, × radius
CORE_OFFSET = 0.3  # part-solid: largest offset of the core from the centre, × radius
PLEURAL_DEPTH = (0.55, 0.8)  # a pleural lesion's centre lies this far inside the lung, × radius
INTRAPULMONARY_MARGIN_MM = 3.0  # lung kept between an intrapulmonary lesion and the pleura
NORMAL_SMOOTHING_MM = 4.0  # Gaussian sigma of the mask whose gradient gives surface normals
MIN_LESION_VOXELS = 8  # a lesion smaller than this on the grid is refused (too coarse a grid)
MIN_LUNG_FRACTION = 0.6  # at least this much of a lesion's nominal sphere lies in the lung
PLACEMENT_TRIES = 200  # sites tried before a place is given up
VESSEL_RADIUS_MM = 6.0  # vessels up to about this radius are lung parenchyma
LUNG_COMPONENT_FRACTION = 0.05  # air components this share of the largest are lungs, closed alone

# Where each pleural place lies. Normals point out of the lung; "lateral" is the normal's x
# component away from the midline; heights are fractions of the lung's z extent (0 = base).
APEX_FRACTION = 0.15  # apical: the top of the lungs
DIAPHRAGM_NORMAL_Z = -0.55  # diaphragmatic: normal pointing down at least this much
SIDE_NORMAL = 0.6  # lateral / paramediastinal / anterior: dominant normal component
POSTERIOR_NORMAL_Y = 0.5  # paravertebral: normal pointing back at least this much ...
PARAVERTEBRAL_WIDTH = 0.45  # ... within this fraction of a lung's width from the midline
HEIGHT_RANGE = (0.2, 0.85)  # costal and mediastinal places: away from the base and apex


@dataclass(frozen=True)
class Lesion:
    """One lesion painted into a volume.

    Attributes:
        kind: one of `KINDS`.
        place: one of `PLACES`.
        center_mm: patient coordinates of its centre, mm (z, y, x).
        radius_mm: nominal radius, mm (lobes, spicules and clipping change the real extent).
        volume_ml: volume of its ground-truth voxels, ml.
        voxels: number of ground-truth voxels.
    """

    kind: str
    place: str
    center_mm: tuple[float, float, float]
    radius_mm: float
    volume_ml: float
    voxels: int

    def record(self) -> dict:
        """The lesion as a JSON-friendly dict."""
        return asdict(self)


def lung_parenchyma(
    hu: np.ndarray, lung_mask: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The lungs themselves within a lung mask, bool (z, y, x): its air (below
    `AIR_THRESHOLD_HU`) closed with a ball of `VESSEL_RADIUS_MM`, each lung (air component of
    at least `LUNG_COMPONENT_FRACTION` of the largest on one side of the midline) on its own,
    and with the holes of every axial slice filled, within the mask: air with the vessels and
    septa that run through it.

    Tissue a lung mask takes in beside the lungs (mediastinal bulges, the chest wall's
    partial-volume layer) lies beyond the lung's air, not between it, so it is left out, but
    for dents narrower than the ball; so is the tissue between two lungs (the anterior
    junction), which one closing of both would bridge. Air is kept as the mask has it: an
    airway lumen the mask failed to leave out stays in.
    """
    mask = np.asarray(lung_mask) > 0
    air = mask & (np.asarray(hu) < AIR_THRESHOLD_HU)
    closed = air.copy()
    if not air.any():
        return closed
    # Lungs touching at the anterior junction are one air component: sides are closed apart.
    midline = round(_lung_axes(mask)[0])
    low_x = np.zeros(air.shape, dtype=bool)
    low_x[:, :, :midline] = True  # the patient's right (axis 2 runs right → left)
    labels, count = ndimage.label(air & low_x)
    high_x, _ = ndimage.label(air & ~low_x)
    labels[high_x > 0] = high_x[high_x > 0] + count
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    least = LUNG_COMPONENT_FRACTION * sizes.max()  # smaller air stays as it is, unclosed
    pad = [math.ceil(VESSEL_RADIUS_MM / s) + 1 for s in spacing]
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or sizes[index] < least:
            continue
        box = tuple(slice(max(0, b.start - p), b.stop + p) for b, p in zip(box, pad, strict=True))
        lung = labels[box] == index
        reach = ndimage.distance_transform_edt(~lung, sampling=spacing) <= VESSEL_RADIUS_MM
        closed[box] |= ndimage.distance_transform_edt(reach, sampling=spacing) > VESSEL_RADIUS_MM
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in air])
    return mask & (closed | filled)


def _lung_axes(lung: np.ndarray) -> tuple[float, float, float, float]:
    """Midline x, half lung width (x voxels) and the z range (low, high) of a lung mask."""
    columns = lung.sum(axis=(0, 1)).astype(np.float64)
    xs = np.flatnonzero(columns)
    midline = float(np.dot(np.arange(columns.size), columns) / columns.sum())
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    return midline, (xs[-1] - xs[0] + 1) / 4.0, float(zs[0]), float(zs[-1])


def surface_places(
    lung: np.ndarray, spacing: Sequence[float]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Classify the voxels on the surface of a lung mask by place.

    Args:
        lung: lung mask (z, y, x), nonzero = lung (vessels filled in).
        spacing: voxel size (z, y, x), mm.

    Returns:
        (place → int array (n, 3) of surface voxel indices, outward unit normals (3, z, y, x) in
        mm space). Places with no voxel map to empty arrays; "intrapulmonary" is not a surface
        place and is absent.
    """
    lung = np.asarray(lung) > 0
    smooth = ndimage.gaussian_filter(
        lung.astype(np.float32), [NORMAL_SMOOTHING_MM / s for s in spacing]
    )
    normals = -np.stack(np.gradient(smooth, *spacing))
    normals /= np.maximum(np.linalg.norm(normals, axis=0), 1e-6)
    surface = lung & ~ndimage.binary_erosion(lung)
    index = np.argwhere(surface)
    nz, ny, nx = (normals[a][surface] for a in range(3))
    midline, half_width, z_low, z_high = _lung_axes(lung)
    side = np.sign(index[:, 2] - midline)
    outward_x = nx * side  # > 0: pointing away from the midline
    height = (index[:, 0] - z_low) / max(z_high - z_low, 1.0)
    middle = (height >= HEIGHT_RANGE[0]) & (height <= HEIGHT_RANGE[1])
    medial = np.abs(index[:, 2] - midline) <= PARAVERTEBRAL_WIDTH * 2.0 * half_width
    rules = {
        "apical": (height >= 1.0 - APEX_FRACTION) & (nz > 0.0),
        "diaphragmatic": nz <= DIAPHRAGM_NORMAL_Z,
        "lateral": middle & (outward_x >= SIDE_NORMAL),
        "anterior": middle & (ny <= -SIDE_NORMAL),
        "paramediastinal": middle & (outward_x <= -SIDE_NORMAL) & (np.abs(ny) < 0.5),
        "paravertebral": middle & (ny >= POSTERIOR_NORMAL_Y) & medial,
    }
    return {place: index[rule] for place, rule in rules.items()}, normals


def _pick_center(
    place: str,
    radius_mm: float,
    lung: np.ndarray,
    spacing: np.ndarray,
    rng: np.random.Generator,
    sites: dict[str, np.ndarray],
    normals: np.ndarray,
) -> np.ndarray:
    """A lesion centre (fractional voxel index) for `place`.

    An intrapulmonary lesion keeps `INTRAPULMONARY_MARGIN_MM` of lung around it where the lungs
    are that deep, else it may just touch the pleura (a large mass in a small lung).
    """
    if place == "intrapulmonary":
        depth = ndimage.distance_transform_edt(lung, sampling=spacing)
        candidates = np.argwhere(depth >= radius_mm + INTRAPULMONARY_MARGIN_MM)
        if candidates.size == 0:
            candidates = np.argwhere(depth >= radius_mm)
        if candidates.size == 0:
            raise KdsbError(
                f"expected room for an intrapulmonary lesion of radius {radius_mm:g} mm, "
                f"received lungs no deeper than {depth.max():.1f} mm"
            )
        return candidates[rng.integers(len(candidates))].astype(np.float64)
    candidates = sites.get(place, np.empty((0, 3), int))
    if candidates.size == 0:
        raise KdsbError(f"expected lung surface of place {place!r}, received none in this scan")
    site = candidates[rng.integers(len(candidates))]
    normal = normals[(slice(None), *site)]
    depth = rng.uniform(*PLEURAL_DEPTH) * radius_mm
    return site - normal * depth / spacing


def _lung_fraction(
    lung: np.ndarray, center: np.ndarray, radius_mm: float, spacing: np.ndarray
) -> float:
    """The fraction of a sphere (`center` in voxels, `radius_mm`) that is lung; voxels beyond
    the volume's edge count as not lung."""
    half = np.ceil(radius_mm / spacing).astype(int)
    offsets = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    grid = [np.rint(c).astype(int) + o for c, o in zip(center, offsets, strict=True)]
    sphere = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing, strict=True))
    sphere = sphere <= radius_mm**2
    within = np.ones_like(sphere)
    for g, n in zip(grid, lung.shape, strict=True):
        within &= (g >= 0) & (g < n)
    index = tuple(np.clip(g, 0, n - 1) for g, n in zip(grid, lung.shape, strict=True))
    inside = sphere & within & lung[index]
    return float(inside.sum()) / max(int(sphere.sum()), 1)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _radius_field(
    kind: str, radius_mm: float, directions: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The lesion's surface radius (mm) along each unit direction (3, ...)."""
    if kind == "solid":
        lobes = _unit_vectors(rng, int(rng.integers(LOBES[0], LOBES[1] + 1)))
        weights = rng.uniform(0.5, 1.0, len(lobes))
        bulge = sum(
            w * np.clip(np.tensordot(lobe, directions, axes=1), 0.0, None) ** 3
            for lobe, w in zip(lobes, weights, strict=True)
        )
        bulge = bulge / max(float(weights.sum()) / 2.0, 1e-6)
        return radius_mm * (1.0 - LOBULATION / 2.0 + LOBULATION * np.clip(bulge, 0.0, 1.0))
    axes = _unit_vectors(rng, 3)
    phase = rng.uniform(0.0, 2.0 * np.pi, 3)
    wobble = np.prod(
        [np.sin(k * np.tensordot(a, directions, axes=1) + p)
         for k, a, p in zip((2.0, 3.0, 2.0), axes, phase, strict=True)],
        axis=0,
    )
    return radius_mm * (1.0 + SURFACE_WOBBLE * wobble)


def _edge_weight(distance_outside_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm, > 0 outside): one voxel wide ramp."""
    return np.clip(0.5 - distance_outside_mm / voxel_mm, 0.0, 1.0).astype(np.float32)


def _spicule_weight(
    rel: Sequence[np.ndarray], radius_mm: float, voxel_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Occupancy of thin tapering spicules radiating from the centre (mm coordinates `rel`)."""
    weight = np.zeros(rel[0].shape, np.float32)
    count = int(rng.integers(SPICULES[0], SPICULES[1] + 1))
    for direction in _unit_vectors(rng, count):
        length = rng.uniform(*SPICULE_LENGTH) * radius_mm
        root = rng.uniform(*SPICULE_RADIUS_MM)
        along = sum(d * r for d, r in zip(direction, rel, strict=True))
        t = np.clip(along / length, 0.0, 1.0)
        across2 = sum((r - t * length * d) ** 2 for d, r in zip(direction, rel, strict=True))
        thickness = root * (1.0 - 2.0 * t / 3.0)
        beyond = np.maximum(along - length, 0.0)
        distance = np.sqrt(across2 + beyond**2) - thickness
        weight = np.maximum(weight, _edge_weight(distance, voxel_mm))
    return weight


def _texture(shape: tuple[int, ...], spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Correlated Gaussian noise of unit standard deviation (soft-tissue mottle)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, TEXTURE_MM / spacing)
    return smooth / max(float(smooth.std()), 1e-6)


def implant_lesion(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    lung: np.ndarray,
    *,
    kind: str,
    place: str,
    radius_mm: float,
    rng: np.random.Generator,
    sites: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, Lesion]:
    """Paint one lesion into `hu` in place and return its ground-truth voxels.

    Args:
        hu: int16 HU (z, y, x), modified in place.
        spacing: voxel size (z, y, x), mm.
        origin: patient coordinates of voxel [0, 0, 0], mm (z, y, x).
        lung: the lung mask of `hu` before any lesion (vessels filled in); the lesion is clipped
            to it.
        kind: one of `KINDS`.
        place: one of `PLACES`.
        radius_mm: nominal radius in mm.
        rng: the source of every random choice.
        sites: `surface_places(lung, spacing)`, computed once for many lesions of one scan.

    Returns:
        (bool mask (z, y, x) of the lesion's voxels, the `Lesion` record).

    Raises:
        KdsbError: an unknown kind or place, a radius that is not positive, no room for the
            place in this scan, or a lesion too small for the grid.
    """
    if kind not in KINDS:
        raise KdsbError(f"expected a lesion kind among {', '.join(KINDS)}, received {kind!r}")
    if place not in PLACES:
        raise KdsbError(f"expected a lesion place among {', '.join(PLACES)}, received {place!r}")
    if not (math.isfinite(radius_mm) and radius_mm > 0):
        raise KdsbError(f"expected a positive lesion radius in mm, received {radius_mm!r}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    lung = np.asarray(lung) > 0
    if sites is None and place != "intrapulmonary":
        sites = surface_places(lung, spacing_arr)
    surface_sites, normals = sites if sites is not None else ({}, None)
    for _ in range(PLACEMENT_TRIES):
        center = _pick_center(place, radius_mm, lung, spacing_arr, rng, surface_sites, normals)
        if _lung_fraction(lung, center, radius_mm, spacing_arr) >= MIN_LUNG_FRACTION:
            break
    else:
        raise KdsbError(
            f"expected a site of place {place} where {MIN_LUNG_FRACTION:.0%} of a lesion of "
            f"radius {radius_mm:g} mm lies in the lung, received none in {PLACEMENT_TRIES} tries"
        )

    reach = radius_mm * (SPICULE_LENGTH[1] if kind == "spiculated" else 1.0 + LOBULATION) + 2.0
    low = np.maximum(np.floor(center - reach / spacing_arr), 0).astype(int)
    high = np.minimum(np.ceil(center + reach / spacing_arr) + 1, hu.shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    rel = np.meshgrid(
        *[(np.arange(a, b) - c) * s for a, b, c, s in zip(low, high, center, spacing_arr,
                                                          strict=True)],
        indexing="ij",
    )
    distance = np.sqrt(sum(r**2 for r in rel))
    directions = np.stack(rel) / np.maximum(distance, 1e-6)
    voxel_mm = float(np.cbrt(np.prod(spacing_arr)))
    surface = _radius_field(kind, radius_mm, directions, rng)
    weight = _edge_weight(distance - surface, voxel_mm)
    inside_lung = lung[box]
    base = hu[box].astype(np.float32)
    texture = LESION_NOISE_HU * _texture(weight.shape, spacing_arr, rng)

    if kind in ("ground_glass", "part_solid"):
        glass = rng.uniform(*GROUND_GLASS_HU) + texture
        painted = np.maximum(base, base + weight * (glass - base))  # vessels stay visible
        if kind == "part_solid":
            core_radius = rng.uniform(*CORE_FRACTION) * radius_mm
            offset = _unit_vectors(rng, 1)[0] * rng.uniform(0.0, CORE_OFFSET) * radius_mm
            core_distance = np.sqrt(sum((r - o) ** 2 for r, o in zip(rel, offset, strict=True)))
            core = _edge_weight(core_distance - core_radius, voxel_mm) * (weight >= 0.5)
            solid = rng.uniform(*SOLID_HU) + texture
            painted = painted + core * (solid - painted)
    else:
        if kind == "spiculated":
            weight = np.maximum(weight, _spicule_weight(rel, radius_mm, voxel_mm, rng))
        solid = rng.uniform(*SOLID_HU) + texture
        painted = base + weight * (solid - base)
    painted = np.where(inside_lung, painted, base)
    truth = np.zeros(hu.shape, dtype=bool)
    truth[box] = (weight >= 0.5) & inside_lung
    voxels = int(np.count_nonzero(truth))
    if voxels < MIN_LESION_VOXELS:  # refused before `hu` is touched: a caller may try again
        raise KdsbError(
            f"expected a lesion of at least {MIN_LESION_VOXELS} voxels, received {voxels} "
            f"(radius {radius_mm:g} mm on a ({', '.join(f'{v:g}' for v in spacing_arr)}) mm grid, "
            f"place {place})"
        )
    hu[box] = np.clip(np.rint(painted), np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    center_mm = tuple(
        float(round(o + c * s, 3)) for o, c, s in zip(origin, center, spacing_arr, strict=True)
    )
    lesion = Lesion(
        kind=kind,
        place=place,
        center_mm=center_mm,  # type: ignore[arg-type]
        radius_mm=float(radius_mm),
        volume_ml=round(voxels * float(np.prod(spacing_arr)) / MM3_PER_ML, 4),
        voxels=voxels,
    )
    return truth, lesion
