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
Generation is vectorised NumPy, one axial slice at a time for the body and one small box per
vessel segment or nodule, so a 512 × 512 × 200 phantom takes seconds and well under 1 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kdsb.errors import KdsbError, UsageError
from kdsb.preprocessing.hu import AIR_HU, PARENCHYMA_HU

# Tissue values, HU.
HU_MIN = -1023  # lowest HU written: keeps raw value 0 free for uint16 padding
HU_MAX = 3071
SKIN_MUSCLE_HU = 40
FAT_HU = -100
MEDIASTINUM_HU = 35
LUNG_POSTERIOR_GRADIENT_HU = 60  # dependent lung is denser: + this much at the posterior edge
VESSEL_HU = 40
NODULE_HU = 30
RIB_HU = 700
STERNUM_HU = 550
CORTICAL_BONE_HU = 900
CORTEX_FRACTION = 0.15  # cortical shell thickness / vertebral body radius
CANCELLOUS_BONE_HU = 250
DISC_HU = 80
SPINAL_CANAL_HU = 15
TABLE_HU = 300
IMAGE_NOISE_HU = (10.0, 25.0)  # per-patient standard deviation of the image noise
LUNG_TEXTURE_HU = 30.0  # extra standard deviation of the lung parenchyma (texture)
PARENCHYMA_MAX_HU = -500  # lung voxels above this are vessels or nodules: no texture

# Acquisition, mm (multiplied by `scale` except the slice spacing).
FOV_MM = (300.0, 380.0)
Z_EXTENT_MM = (220.0, 300.0)
SLICE_MM = (1.0, 2.5)
CAVITY_TAPER = 0.15  # the thoracic cavity is this much narrower at the lung apex than at the base
REFERENCE_HALF_FOV_MM = 170.0  # anatomy sizes below are for this half field of view
MIN_SIZE, MAX_SIZE = 32, 1024
MIN_GAP_PIXELS = 2.5  # least thickness of the table and of the air between it and the body
MIN_SCALE, MAX_SCALE = 0.4, 1.5

# Nodules, mm (physical radii: not scaled, so the label rule holds at every scale).
CANCER_RADIUS_MM = 8.0
BIG_NODULE_RADIUS_MM = (8.0, 14.0)
SMALL_NODULE_RADIUS_MM = (2.0, 4.0)
JUXTAPLEURAL_PROBABILITY = 0.45
NODULE_IRREGULARITY = 0.08  # relative radius wobble
NODULE_MARGIN_MM = 3.0  # free lung kept around a nodule (to the pleura, airways, other nodules)
PLACEMENT_TRIES = 2000

# Vessels.
VESSEL_ROOT_RADIUS_MM = (4.0, 6.0)
VESSEL_TAPER = 0.78  # child radius / parent radius
VESSEL_MAX_DEPTH = 8
VESSEL_OUTWARD = 0.5  # pull of branches away from the hilum
VESSEL_TRIES = 6  # directions a segment tries before its branch ends at the pleura
# First segments from the hilum, (z, y, x) for the left lung (x mirrored for the right): up,
# down, posterior-down and anterior, all lateral.
VESSEL_ROOT_DIRECTIONS = ((1.0, 0.0, 0.8), (-1.0, 0.2, 0.8), (-0.3, 0.8, 0.6), (0.2, -0.8, 0.6))
VESSEL_SPREAD = 0.7  # how far a child's direction strays from its parent's

ABOVE_VOLUME_MM = 1000.0  # the trachea runs on past the top slice
SLAB = 16  # slices per noise block: bounds the float32 temporaries


@dataclass
class Nodule:
    """One nodule of a phantom.

    Attributes:
        center_mm: patient coordinates of its centre in mm, (z, y, x).
        radius_mm: nominal radius in mm (the surface wobbles by `NODULE_IRREGULARITY`).
        juxtapleural: True when it touches the chest wall.
    """

    center_mm: tuple[float, float, float]
    radius_mm: float
    juxtapleural: bool


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


@dataclass
class _Anatomy:
    """Sizes and positions of one phantom's structures, all in mm (patient coordinates).

    Ellipses are centred on (body_cy, 0) in (y, x); a lung `side` is -1 (right, negative x) or
    +1 (left).
    """

    body_ay: float
    body_ax: float
    body_cy: float
    skin: float
    fat: float
    muscle: float
    rib: float
    cavity_ay: float
    cavity_ax: float
    table_top: float
    table_curvature: float
    table_thickness: float
    spine_y: float
    spine_r: float
    rib_count: int
    rib_pitch: float
    rib_phase: float
    lung_cy: float
    lung_ay: float
    lung_cx: float
    lung_ax: float
    lung_base: tuple[float, float]  # (right, left): z of the costophrenic recesses
    dome: tuple[float, float]  # (right, left): height of the diaphragm domes
    lung_apex: float
    mediastinum_w: float  # half-width of the mediastinum above the heart
    heart_w: float  # extra half-width at the heart
    heart_shift: float  # heart displacement to the left (+x)
    trachea_y: float
    trachea_x: float
    trachea_r: float
    carina_z: float

    def taper(self, z: np.ndarray) -> np.ndarray:
        """Size of the thoracic cavity at height z relative to its base (1 → 1 - CAVITY_TAPER)."""
        t = (z - min(self.lung_base)) / (self.lung_apex - min(self.lung_base))
        return 1.0 - CAVITY_TAPER * np.clip(t, 0.0, 1.0)

    def cavity(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """True inside the thoracic cavity (inside the ribs), broadcast over (z, y, x) in mm."""
        taper = self.taper(z)
        return ((y - self.body_cy) / (taper * self.cavity_ay)) ** 2 + (
            x / (taper * self.cavity_ax)
        ) ** 2 <= 1.0

    def heart(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """How much heart widens the mediastinum (0..1): low in the chest and anterior."""
        t = (z - min(self.lung_base)) / (self.lung_apex - min(self.lung_base))
        low = np.clip((0.5 - t) / 0.25, 0.0, 1.0)
        anterior = np.clip((self.lung_cy - y) / self.cavity_ay + 0.6, 0.0, 1.0)
        return low * anterior

    def lung(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, side: int) -> np.ndarray:
        """True inside the lung on `side` (-1 right, +1 left), broadcast over (z, y, x) in mm.

        The lung is its own ellipse (per slice) clipped by the thoracic cavity, the mediastinum
        and the spine; its base is domed (the centre starts `dome` mm above the recesses) and
        its apex shrinks it towards the lung's centre line.
        """
        index = (side + 1) // 2
        base, dome = self.lung_base[index], self.dome[index]
        rho2 = ((y - self.lung_cy) / self.lung_ay) ** 2 + (
            (x - side * self.lung_cx) / self.lung_ax
        ) ** 2
        t = (z - base) / (self.lung_apex - base)
        apex = np.clip((t - 0.8) / 0.2, 0.0, 1.0)
        highest_rho2 = 1.0 - apex**2
        lowest_rho2 = 1.0 - (z - base) / dome
        heart = self.heart(z, y)
        width = self.mediastinum_w + self.heart_w * heart
        center = self.heart_shift * heart
        spine = (y - self.spine_y) ** 2 + x**2 > (self.spine_r + 0.25 * self.spine_r) ** 2
        return (
            (rho2 <= highest_rho2)
            & (rho2 >= lowest_rho2)
            & (t >= 0.0)
            & self.cavity(z, y, x)
            & (side * (x - center) > width)
            & spine
        )

    def airways(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Trachea and main bronchi as capsules (start, end, radius), points (z, y, x) in mm."""
        carina = np.array([self.carina_z, self.trachea_y, self.trachea_x])
        top = np.array([self.lung_apex + ABOVE_VOLUME_MM, self.trachea_y, self.trachea_x])
        tubes = [(carina, top, self.trachea_r)]
        for side in (-1, 1):
            tubes.append((carina, self.hilum(side, entry=True), 0.7 * self.trachea_r))
        return tubes

    def hilum(self, side: int, *, entry: bool = False) -> np.ndarray:
        """A point just inside the lung's medial border below the carina, (z, y, x) in mm.

        With `entry`, the end of the main bronchus: a little further into the lung.
        """
        z = self.carina_z - 0.12 * (self.lung_apex - min(self.lung_base))
        y = self.lung_cy - 0.1 * self.cavity_ay
        heart = float(self.heart(np.float64(z), np.float64(y)))
        x = self.heart_shift * heart + side * (self.mediastinum_w + self.heart_w * heart)
        depth = (0.6 if entry else 0.3) * self.trachea_r
        return np.array([z, y, x + side * depth])


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def check_options(size: int, scale: float) -> None:
    """Raise UsageError for an image side (pixels) or an anatomy scale out of range."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"expected --size between {MIN_SIZE} and {MAX_SIZE}, received {size}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise UsageError(f"expected --scale between {MIN_SCALE} and {MAX_SCALE}, received {scale}")


def _draw_anatomy(
    rng: np.random.Generator, half_fov: float, pixel: float, z_first: float, z_extent: float
) -> _Anatomy:
    """Random anatomy that fits a field of view of radius `half_fov` mm, slices from z_first.

    The air gap between body and table and the table itself stay at least `MIN_GAP_PIXELS`
    pixels (of `pixel` mm) thick, so they never touch in the image.
    """
    s = half_fov / REFERENCE_HALF_FOV_MM
    body_ax = half_fov * rng.uniform(0.78, 0.88)
    body_ay = body_ax * rng.uniform(0.62, 0.74)
    skin, fat = 2.0 * s, rng.uniform(6.0, 22.0) * s
    muscle, rib = rng.uniform(6.0, 14.0) * s, rng.uniform(6.0, 10.0) * s
    gap = max(rng.uniform(4.0, 10.0) * s, MIN_GAP_PIXELS * pixel)
    table_thickness = max(rng.uniform(6.0, 12.0) * s, MIN_GAP_PIXELS * pixel)
    margin = half_fov * rng.uniform(0.04, 0.1)
    body_cy = half_fov - margin - table_thickness - gap - body_ay
    # The body must stay inside the circular field of view: shrink it if it does not.
    theta = np.linspace(0.0, 2.0 * np.pi, 361)
    while np.max(np.hypot(body_cy + body_ay * np.sin(theta), body_ax * np.cos(theta))) > (
        half_fov - 2.0 * s
    ):
        body_ax, body_ay = 0.97 * body_ax, 0.97 * body_ay
    wall = skin + fat + muscle + rib
    cavity_ay, cavity_ax = body_ay - wall, body_ax - wall
    spine_r = rng.uniform(14.0, 18.0) * s
    spine_y = body_cy + cavity_ay - 1.1 * spine_r
    trachea_r = rng.uniform(7.0, 9.0) * s
    trachea_x = -2.0 * s
    lung_base = z_first + rng.uniform(0.05, 0.12) * z_extent
    lung_apex = z_first + rng.uniform(0.88, 0.95) * z_extent
    height = lung_apex - lung_base
    return _Anatomy(
        body_ay=body_ay,
        body_ax=body_ax,
        body_cy=body_cy,
        skin=skin,
        fat=fat,
        muscle=muscle,
        rib=rib,
        cavity_ay=cavity_ay,
        cavity_ax=cavity_ax,
        table_top=body_cy + body_ay + gap,
        # Curved up at the sides, but less than the body, so the air gap never closes.
        table_curvature=0.25 * body_ay / body_ax**2,
        table_thickness=table_thickness,
        spine_y=spine_y,
        spine_r=spine_r,
        rib_count=int(rng.integers(8, 12)),
        rib_pitch=rng.uniform(22.0, 30.0) * s,
        rib_phase=rng.uniform(0.0, 2.0 * np.pi),
        lung_cy=body_cy + rng.uniform(-0.05, 0.05) * cavity_ay,
        lung_ay=cavity_ay * rng.uniform(0.95, 1.1),
        lung_cx=cavity_ax * rng.uniform(0.45, 0.55),
        lung_ax=cavity_ax * rng.uniform(0.55, 0.65),
        # The right dome sits higher (the liver).
        lung_base=(lung_base + rng.uniform(0.02, 0.06) * height, lung_base),
        dome=(rng.uniform(0.1, 0.16) * height, rng.uniform(0.08, 0.14) * height),
        lung_apex=lung_apex,
        mediastinum_w=abs(trachea_x) + trachea_r + rng.uniform(5.0, 9.0) * s,
        heart_w=rng.uniform(15.0, 25.0) * s,
        heart_shift=rng.uniform(10.0, 20.0) * s,
        trachea_y=spine_y - spine_r - rng.uniform(8.0, 14.0) * s - trachea_r,
        trachea_x=trachea_x,
        trachea_r=trachea_r,
        carina_z=lung_base + rng.uniform(0.55, 0.65) * height,
    )


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, ay: float, ax: float) -> np.ndarray:
    return ((y - cy) / ay) ** 2 + (x / ax) ** 2 <= 1.0


def _static_slice(a: _Anatomy, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parts of an axial slice that do not change with z: HU (float32) and the rib ring.

    Args:
        a: the anatomy.
        y: patient y of each row in mm, shape (ny, 1).
        x: patient x of each column in mm, shape (1, nx).

    Returns:
        (hu, rib_ring): HU of table, body wall, mediastinum and spine, shape (ny, nx); and the
        bool ring where ribs may appear.
    """
    shape = np.broadcast_shapes(y.shape, x.shape)
    hu = np.full(shape, AIR_HU, np.float32)
    table_top = a.table_top - a.table_curvature * x**2
    hu[(y >= table_top) & (y <= table_top + a.table_thickness)] = TABLE_HU
    inner = a.skin
    hu[_ellipse(y, x, a.body_cy, a.body_ay, a.body_ax)] = SKIN_MUSCLE_HU
    hu[_ellipse(y, x, a.body_cy, a.body_ay - inner, a.body_ax - inner)] = FAT_HU
    inner += a.fat
    hu[_ellipse(y, x, a.body_cy, a.body_ay - inner, a.body_ax - inner)] = SKIN_MUSCLE_HU
    inner += a.muscle
    cavity = _ellipse(y, x, a.body_cy, a.cavity_ay, a.cavity_ax)
    ring = _ellipse(y, x, a.body_cy, a.body_ay - inner, a.body_ax - inner) & ~cavity
    sternum = ring & (y < a.body_cy) & (np.abs(x) < 0.6 * a.spine_r)
    hu[sternum] = STERNUM_HU
    hu[cavity] = MEDIASTINUM_HU
    # Spine: posterior arch around the canal, then the vertebral body's cortical shell.
    canal_y, canal_r = a.spine_y + 1.5 * a.spine_r, 0.4 * a.spine_r
    canal_d2 = (y - canal_y) ** 2 + x**2
    hu[canal_d2 <= (2.0 * canal_r) ** 2] = CORTICAL_BONE_HU
    hu[canal_d2 <= canal_r**2] = SPINAL_CANAL_HU
    hu[(y - a.spine_y) ** 2 + x**2 <= a.spine_r**2] = CORTICAL_BONE_HU
    return hu, ring & ~sternum


def _capsule_distance2(
    grids: tuple[np.ndarray, np.ndarray, np.ndarray], start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Squared distance (mm²) from broadcast (z, y, x) grids to the segment start-end."""
    direction = end - start
    length2 = max(float(direction @ direction), 1e-12)
    rel = [g - s for g, s in zip(grids, start, strict=True)]
    t = np.clip(sum(r * d for r, d in zip(rel, direction, strict=True)) / length2, 0.0, 1.0)
    return sum((r - t * d) ** 2 for r, d in zip(rel, direction, strict=True))


class _Grid:
    """Voxel ↔ patient-coordinate conversion and bounding boxes for one volume."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray):
        self.shape, self.spacing, self.origin = shape, spacing, origin

    def box(
        self, low_mm: np.ndarray, high_mm: np.ndarray
    ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Slices of the voxels between two corners (mm) and their coordinate grids, or None."""
        low = np.maximum(np.floor((low_mm - self.origin) / self.spacing).astype(int), 0)
        high = np.minimum(
            np.ceil((high_mm - self.origin) / self.spacing).astype(int) + 1, self.shape
        )
        if np.any(high <= low):
            return None
        index = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
        axes = [
            (self.origin[k] + self.spacing[k] * np.arange(low[k], high[k])).astype(np.float32)
            for k in range(3)
        ]
        grids = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        return index, grids


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _grow_vessels(
    rng: np.random.Generator, a: _Anatomy, side: int, min_radius: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A branching vessel tree from the hilum of one lung: capsules (start, end, radius_mm).

    Each segment forks in two thinner ones pointing roughly onwards and away from the hilum; a
    segment that would leave the lung tries other directions, then the branch ends.
    """
    s = a.cavity_ax / 100.0
    hilum = a.hilum(side)
    segments = []
    stack = [
        (hilum, np.array(d) / np.linalg.norm(d), _uniform(rng, VESSEL_ROOT_RADIUS_MM) * s, 0)
        for d in [(z, y, side * x) for z, y, x in VESSEL_ROOT_DIRECTIONS]
    ]
    fractions = np.linspace(0.0, 1.0, 7)[1:]
    while stack:
        start, direction, radius, depth = stack.pop()
        if radius < min_radius or depth > VESSEL_MAX_DEPTH:
            continue
        length = (4.0 + 3.0 * radius) * s * rng.uniform(0.8, 1.3)
        outward = start - hilum
        outward /= max(np.linalg.norm(outward), 1e-6)
        for attempt in range(VESSEL_TRIES):
            if attempt:
                direction = direction + VESSEL_SPREAD * _random_unit(rng) + VESSEL_OUTWARD * outward
                direction /= np.linalg.norm(direction)
            points = start + np.outer(fractions * length, direction)
            inside = a.lung(points[:, 0], points[:, 1], points[:, 2], side)
            n_inside = len(inside) if inside.all() else int(np.argmin(inside))
            if n_inside >= len(inside) // 2:
                break
        else:
            continue
        end = points[n_inside - 1]
        segments.append((start, end, radius))
        for _ in range(2):
            child = direction + VESSEL_SPREAD * _random_unit(rng) + VESSEL_OUTWARD * outward
            stack.append((end, child / np.linalg.norm(child), radius * VESSEL_TAPER, depth + 1))
    return segments


def _sphere_directions() -> np.ndarray:
    """26 unit vectors (the neighbours of a voxel), for testing points around a sphere."""
    grid = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)].astype(float)
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


DIRECTIONS = _sphere_directions()


Capsule = tuple[np.ndarray, np.ndarray, float]  # segment start, end (z, y, x) and radius, mm


def _clear_of(
    center: np.ndarray, radius: float, capsules: list[Capsule], nodules: list[Nodule]
) -> bool:
    """True when a sphere keeps `NODULE_MARGIN_MM` from the airways and earlier nodules."""
    for start, end, tube_r in capsules:
        d2 = _capsule_distance2(tuple(center[:, None]), start, end)[0]
        if d2 < (radius + tube_r + NODULE_MARGIN_MM) ** 2:
            return False
    return all(
        np.linalg.norm(center - np.array(n.center_mm)) > radius + n.radius_mm + NODULE_MARGIN_MM
        for n in nodules
    )


def _place_nodule(
    rng: np.random.Generator,
    a: _Anatomy,
    radius: float,
    juxtapleural: bool,
    nodules: list[Nodule],
) -> Nodule:
    """Find a place for a nodule by rejection sampling against the analytic anatomy."""
    airways = a.airways()
    height = a.lung_apex - min(a.lung_base)
    for _ in range(PLACEMENT_TRIES):
        side = int(rng.choice((-1, 1)))
        z = min(a.lung_base) + rng.uniform(0.15, 0.75) * height
        if juxtapleural:
            # A point of the cavity wall, from anterolateral to posterolateral, and the wall's
            # outward normal there; the centre sits inside so the sphere pokes into the wall.
            theta = rng.uniform(np.radians(-50.0), np.radians(80.0))
            ay, ax = a.taper(z) * a.cavity_ay, a.taper(z) * a.cavity_ax
            wall = np.array([a.body_cy + ay * np.sin(theta), side * ax * np.cos(theta)])
            normal = np.array([np.sin(theta) / ay, side * np.cos(theta) / ax])
            normal /= np.linalg.norm(normal)
            center = np.array([z, *(wall - normal * radius * rng.uniform(0.5, 0.7))])
            facing_lung = DIRECTIONS[DIRECTIONS[:, 1:] @ normal <= 0.0]
            points = center + (radius + 1.0) * facing_lung
        else:
            y = a.body_cy + rng.uniform(-1.0, 1.0) * a.cavity_ay
            x = side * rng.uniform(0.0, 1.0) * a.cavity_ax
            center = np.array([z, y, x])
            points = center + (radius + NODULE_MARGIN_MM) * DIRECTIONS
        points = np.vstack([center, points])
        if a.lung(points[:, 0], points[:, 1], points[:, 2], side).all() and _clear_of(
            center, radius, airways, nodules
        ):
            return Nodule(tuple(float(round(c, 3)) for c in center), float(radius), juxtapleural)
    raise KdsbError(
        f"expected room for a {radius:.1f} mm nodule in the phantom lungs, received none after "
        f"{PLACEMENT_TRIES} tries (use a larger --scale)"
    )


def _draw_nodules(rng: np.random.Generator, a: _Anatomy, cancer: bool) -> list[Nodule]:
    radii = [_uniform(rng, BIG_NODULE_RADIUS_MM) for _ in range(1 + int(rng.random() < 0.3))]
    radii = radii if cancer else []
    radii += [_uniform(rng, SMALL_NODULE_RADIUS_MM) for _ in range(int(rng.integers(0, 4)))]
    nodules: list[Nodule] = []
    for radius in radii:
        juxtapleural = bool(rng.random() < JUXTAPLEURAL_PROBABILITY)
        nodules.append(_place_nodule(rng, a, round(radius, 2), juxtapleural, nodules))
    return nodules


def _paint_capsule(
    hu: np.ndarray,
    mask: np.ndarray,
    grid: _Grid,
    start: np.ndarray,
    end: np.ndarray,
    radius: float,
    value: int,
    where: np.ndarray | None = None,
) -> None:
    """Set `value` in hu (and 0 in mask when value is air) inside a capsule."""
    pad = radius + 1.0
    box = grid.box(np.minimum(start, end) - pad, np.maximum(start, end) + pad)
    if box is None:
        return
    index, grids = box
    inside = _capsule_distance2(grids, start.astype(np.float32), end.astype(np.float32)) <= (
        radius**2
    )
    if where is not None:
        inside &= where[index].astype(bool)
    hu[index][inside] = value
    if value == AIR_HU:
        mask[index][inside] = 0


def _paint_nodule(
    rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, grid: _Grid, nodule: Nodule
) -> None:
    """A slightly irregular sphere of `NODULE_HU`, drawn inside the lung only."""
    center = np.array(nodule.center_mm, np.float32)
    pad = nodule.radius_mm * (1.0 + NODULE_IRREGULARITY) + 1.0
    box = grid.box(center - pad, center + pad)
    if box is None:
        return
    index, grids = box
    rel = [g - c for g, c in zip(grids, center, strict=True)]
    distance = np.sqrt(sum(r**2 for r in rel))
    safe = np.maximum(distance, 1e-6)
    phase = rng.uniform(0.0, 2.0 * np.pi, 3)
    wobble = (
        np.sin(3.0 * rel[0] / safe + phase[0])
        * np.cos(2.0 * rel[1] / safe + phase[1])
        * np.sin(2.0 * rel[2] / safe + phase[2])
    )
    inside = (distance <= nodule.radius_mm * (1.0 + NODULE_IRREGULARITY * wobble)) & (
        lung[index] == 1
    )
    hu[index][inside] = NODULE_HU


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
    fov = fov_mm if fov_mm is not None else _uniform(rng, FOV_MM) * scale
    pixel = round(fov / size, 4)
    slice_spacing = round(slice_mm if slice_mm is not None else _uniform(rng, SLICE_MM), 3)
    extent = z_extent_mm if z_extent_mm is not None else _uniform(rng, Z_EXTENT_MM) * scale
    n_slices = max(int(round(extent / slice_spacing)), 1)
    spacing = np.array([slice_spacing, pixel, pixel])
    half = (size - 1) / 2.0 * pixel
    origin = np.round([rng.uniform(-400.0, -100.0), -half, -half], 4)
    shape = (n_slices, size, size)
    a = _draw_anatomy(rng, size * pixel / 2.0, pixel, origin[0], n_slices * slice_spacing)

    y = (origin[1] + pixel * np.arange(size, dtype=np.float32))[:, None]
    x = (origin[2] + pixel * np.arange(size, dtype=np.float32))[None, :]
    outside_fov = y**2 + x**2 > (size * pixel / 2.0) ** 2
    static_hu, rib_ring = _static_slice(a, y, x)
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

    grid = _Grid(shape, spacing, origin)
    min_vessel_radius = 0.5 * pixel
    for side in (-1, 1):
        for start, end, radius in _grow_vessels(rng, a, side, min_vessel_radius):
            _paint_capsule(hu, lung, grid, start, end, radius, VESSEL_HU, where=lung)
    nodules = _draw_nodules(rng, a, cancer)
    for nodule in nodules:
        _paint_nodule(rng, hu, lung, grid, nodule)
    for start, end, radius in a.airways():
        _paint_capsule(hu, lung, grid, start, end, radius, AIR_HU)
    _drop_lung_fragments(hu, lung)

    noise = _uniform(rng, IMAGE_NOISE_HU)
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
