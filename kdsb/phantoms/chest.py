"""A phantom chest's anatomy: its sizes and positions drawn from a seed (`draw_chest`), the
analytic shapes built on them (thoracic cavity, lungs, heart, airways, hila: `Chest`), the
tissues' HU, and the parts of an axial slice that do not change with z (`static_slice`). All
sizes in mm, patient coordinates (z, y, x)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdsb.hu import AIR_HU
from kdsb.phantoms.rasterise import Capsule

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
CAVITY_TAPER = 0.15  # the thoracic cavity is this much narrower at the lung apex than at the base
REFERENCE_HALF_FOV_MM = 170.0  # anatomy sizes below are for this half field of view
MIN_GAP_PIXELS = 2.5  # least thickness of the table and of the air between it and the body
ABOVE_VOLUME_MM = 1000.0  # the trachea runs on past the top slice


@dataclass
class Chest:
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

    def airways(self) -> list[Capsule]:
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


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def draw_chest(
    rng: np.random.Generator, half_fov: float, pixel: float, z_first: float, z_extent: float
) -> Chest:
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
    return Chest(
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


def static_slice(a: Chest, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
