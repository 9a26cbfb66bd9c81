"""Back to the source grid: the full-resolution mask from the coarse one, sharp at the lung's
surface, with nodules too small for the coarse grid and a mass's fringe."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdsb.preprocessing.lungs.morphology import dilate_cross, erode_cross
from kdsb.preprocessing.lungs.small_nodules import small_core_bases, small_core_slices
from kdsb.preprocessing.lungs.thresholds import AIR_THRESHOLD_HU, BONE_HU, GROUND_GLASS_MAX_HU

# How a coarse voxel maps to the source grid: not at all, its air voxels, its tissue voxels
# (added tissue beside rejected air: bowel gas, airways), or whole.
FULL_NEVER, FULL_IF_AIR, FULL_IF_TISSUE, FULL_ALWAYS = 0, 1, 2, 3
FRINGE_VOXELS = 2  # how far past the filling a mass's hidden edge may reach
SMALL_NODULE_MM = 5.0  # lung air within this on both sides: tissue protruding into the lung
# Directions (z, y, x) along which protruding tissue is looked for: the in-plane axes and
# diagonals (a wall running diagonally in a slice) and the slice axis.
PROTRUSION_DIRECTIONS = ((0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, -1), (1, 0, 0))


def full_resolution_mask(
    code: np.ndarray,
    added: np.ndarray,
    hu: np.ndarray,
    spacing: Sequence[float],
    threads: int = 1,
) -> np.ndarray:
    """The mask at full resolution from each voxel's coarse block's `code` (`FULL_NEVER` …
    `FULL_ALWAYS`) and whether the filling `added` that block, bool.

    With `threads` ≥ 2 the box is cut into that many slabs along z (at most one a slice), each
    worked on with a halo of the slices it depends on (`slab_halo`), side by side: NumPy's
    gathers and logic release the GIL. The same mask either way, voxel for voxel.

    Boundary blocks (`FULL_IF_AIR`) keep their lung and ground glass (below
    `GROUND_GLASS_MAX_HU`), their tissue protruding into the lung (`protruding_tissue`: a nodule
    too small for the coarse grid) and the tissue within `FRINGE_VOXELS` of a solid core, one the
    filling took in or one protruding into the lung: a nodule's edge against the chest wall,
    or the base of a small nodule in a corner of the wall; a core too thin for the fringe's
    erosion gives its neighbours where it is a small compact blob (`small_core_bases`: the base
    of a 3 mm nodule).

    Args:
        code, added: per voxel, uint8 and bool, shape (z, y, x) of `hu`.
        hu: the HU of the box, (z, y, x).
        spacing: voxel size (z, y, x), mm.
        threads: slabs worked on side by side.
    """
    slices = code.shape[0]
    slabs = min(max(1, threads), slices)
    if slabs == 1:
        return _full_resolution_slab(code, added, hu, spacing)
    halo = slab_halo(spacing)
    cuts = np.linspace(0, slices, slabs + 1).round().astype(int)

    def slab(first: int, stop: int) -> np.ndarray:
        low, high = max(0, first - halo), min(slices, stop + halo)
        kept = _full_resolution_slab(code[low:high], added[low:high], hu[low:high], spacing)
        return kept[first - low:stop - low]

    with ThreadPoolExecutor(slabs) as pool:
        return np.concatenate(list(pool.map(slab, cuts[:-1], cuts[1:])))


def slab_halo(spacing: Sequence[float]) -> int:
    """Slices beyond a slab that its mask depends on: the protrusion test's reach along z, then
    the fringe's erosion (one voxel) and dilation (`FRINGE_VOXELS`), or a small core's base: the
    core's length and the slice beyond it that tells it whole (`small_core_bases` takes only
    whole core components that the erosion removes, so nothing farther decides)."""
    return _reach(spacing)[0] + max(1 + FRINGE_VOXELS, small_core_slices(spacing) + 1)


def _reach(spacing: Sequence[float]) -> list[int]:
    """`SMALL_NODULE_MM` in voxels along each axis (z, y, x), at least one."""
    return [max(1, round(SMALL_NODULE_MM / s)) for s in spacing]


def _full_resolution_slab(
    code: np.ndarray, added: np.ndarray, hu: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """`full_resolution_mask` of one slab (or the whole box) in this thread."""
    # In-place operations on few full-box arrays: each temporary of a scan's box costs a
    # page-faulting allocation (~25 M voxels).
    air = hu < AIR_THRESHOLD_HU
    tissue = ~air
    boundary = code == FULL_IF_AIR
    kept = code == FULL_ALWAYS
    kept |= boundary & (hu < GROUND_GLASS_MAX_HU)
    kept |= (code == FULL_IF_TISSUE) & tissue
    soft_tissue = boundary  # reused: boundary tissue, not bone
    soft_tissue &= tissue
    soft_tissue &= hu <= BONE_HU
    protruding = protruding_tissue(kept & air, soft_tissue & ~kept, spacing)
    kept |= protruding
    cores = kept & tissue
    cores &= added
    cores |= protruding
    kept_cores = dilate_cross(erode_cross(cores), 1)
    kept |= soft_tissue & dilate_cross(kept_cores, FRINGE_VOXELS - 1)
    np.greater(cores, kept_cores, out=cores)  # reused: the cores too thin for the erosion
    np.greater(soft_tissue, kept, out=soft_tissue)  # reused: tissue that may still join
    kept |= small_core_bases(cores, kept_cores, soft_tissue, spacing)
    return kept


def protruding_tissue(
    air: np.ndarray, candidates: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The `candidates` with `air` on both sides along one of `PROTRUSION_DIRECTIONS` within
    `SMALL_NODULE_MM`: tissue that protrudes into the lung (a small nodule on the wall), bool.

    Where the lung is convex no straight line leaves it and comes back, so the chest wall behind
    a convex lung surface is never taken; where the wall bulges into the lung (ribs, the
    mediastinum), tissue up to `SMALL_NODULE_MM` deep can be. Looked up at the candidates only
    (a thin shell of the box), by flat offsets into `air` padded by the longest reach.
    """
    reach = _reach(spacing)
    padded = np.pad(air, [(r, r) for r in reach])
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2], 1)  # C order, in voxels
    padded = padded.ravel()
    # Flat indices (np.nonzero's three index arrays cost 8× more on a scan's box).
    index = np.flatnonzero(candidates)
    coords = np.unravel_index(index, air.shape)
    flat = sum((c + r) * st for c, r, st in zip(coords, reach, strides, strict=True))
    found = np.zeros(flat.size, dtype=bool)
    for direction in PROTRUSION_DIRECTIONS:
        step_mm = math.hypot(*(d * s for d, s in zip(direction, spacing, strict=True)))
        steps = max(1, round(SMALL_NODULE_MM / step_mm))
        offset = int(np.dot(direction, strides))
        # The second side is looked at only where the first has air (a third of the
        # candidates): 1.5× fewer lookups than both sides of every candidate.
        open_ = np.flatnonzero(~found)
        for sign in (1, -1):
            start = flat[open_]
            hit = np.zeros(open_.size, dtype=bool)
            for k in range(1, steps + 1):
                hit |= padded[start + sign * k * offset]
            open_ = open_[hit]
        found[open_] = True
    result = np.zeros(air.size, dtype=bool)
    result[index[found]] = True
    return result.reshape(air.shape)
