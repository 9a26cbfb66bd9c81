"""A phantom lung's vessel tree: capsules branching from the hilum, thinner outward, that stay
inside the lung."""

from __future__ import annotations

import numpy as np

from kdsb.phantoms.chest import Chest, uniform
from kdsb.phantoms.rasterise import Capsule

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


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def grow_vessels(
    rng: np.random.Generator, a: Chest, side: int, min_radius: float
) -> list[Capsule]:
    """A branching vessel tree from the hilum of one lung: capsules (start, end, radius_mm).

    Each segment forks in two thinner ones pointing roughly onwards and away from the hilum; a
    segment that would leave the lung tries other directions, then the branch ends.
    """
    s = a.cavity_ax / 100.0
    hilum = a.hilum(side)
    segments = []
    stack = [
        (hilum, np.array(d) / np.linalg.norm(d), uniform(rng, VESSEL_ROOT_RADIUS_MM) * s, 0)
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
