"""A phantom's nodules: their radii (the label rule: a cancer case has one of at least
`CANCER_RADIUS_MM`), places found by rejection sampling against the analytic anatomy (some
juxtapleural, touching the chest wall), and their slightly irregular spheres painted inside the
lung."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdsb.errors import KdsbError
from kdsb.phantoms.chest import NODULE_HU, Chest, uniform
from kdsb.phantoms.rasterise import Capsule, Grid, capsule_distance2

# Nodules, mm (physical radii: not scaled, so the label rule holds at every scale).
CANCER_RADIUS_MM = 8.0
BIG_NODULE_RADIUS_MM = (8.0, 14.0)
SMALL_NODULE_RADIUS_MM = (2.0, 4.0)
JUXTAPLEURAL_PROBABILITY = 0.45
NODULE_IRREGULARITY = 0.08  # relative radius wobble
NODULE_MARGIN_MM = 3.0  # free lung kept around a nodule (to the pleura, airways, other nodules)
PLACEMENT_TRIES = 2000


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


def _sphere_directions() -> np.ndarray:
    """26 unit vectors (the neighbours of a voxel), for testing points around a sphere."""
    grid = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)].astype(float)
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


DIRECTIONS = _sphere_directions()


def _clear_of(
    center: np.ndarray, radius: float, capsules: list[Capsule], nodules: list[Nodule]
) -> bool:
    """True when a sphere keeps `NODULE_MARGIN_MM` from the airways and earlier nodules."""
    for start, end, tube_r in capsules:
        d2 = capsule_distance2(tuple(center[:, None]), start, end)[0]
        if d2 < (radius + tube_r + NODULE_MARGIN_MM) ** 2:
            return False
    return all(
        np.linalg.norm(center - np.array(n.center_mm)) > radius + n.radius_mm + NODULE_MARGIN_MM
        for n in nodules
    )


def _place_nodule(
    rng: np.random.Generator,
    a: Chest,
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


def draw_nodules(rng: np.random.Generator, a: Chest, cancer: bool) -> list[Nodule]:
    radii = [uniform(rng, BIG_NODULE_RADIUS_MM) for _ in range(1 + int(rng.random() < 0.3))]
    radii = radii if cancer else []
    radii += [uniform(rng, SMALL_NODULE_RADIUS_MM) for _ in range(int(rng.integers(0, 4)))]
    nodules: list[Nodule] = []
    for radius in radii:
        juxtapleural = bool(rng.random() < JUXTAPLEURAL_PROBABILITY)
        nodules.append(_place_nodule(rng, a, round(radius, 2), juxtapleural, nodules))
    return nodules


def paint_nodule(
    rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray, grid: Grid, nodule: Nodule
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
