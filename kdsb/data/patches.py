"""Patches from CT volumes: HU normalisation, the 48 cube symmetries, patch sampling and reading.

NumPy only (no TensorFlow), so preprocessing, the command line and tests stay light. Every array
is indexed (z, y, x), optionally with trailing channel axes; HU are Hounsfield units and patch
sizes are in voxels (1 mm after preprocessing).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np

from kdsb.errors import KdsbError
from kdsb.hu import AIR_HU, INPUT_CLIP_MAX_HU, LUNG_WINDOW_HU
from kdsb.io.series import SPACING_TOLERANCE_MM

logger = logging.getLogger(__name__)

SPATIAL_AXES = 3
DEFAULT_MIN_LUNG_FRACTION = 0.1
# Rejection sampling draws this many candidate centres per wanted patch and round ...
_OVERSAMPLE = 4
# ... for at most this many rounds, then keeps the best candidates found.
_MAX_ROUNDS = 4


def normalize_hu(
    hu: np.ndarray, *, clip: tuple[float, float] | None = (AIR_HU, INPUT_CLIP_MAX_HU)
) -> np.ndarray:
    """Map Hounsfield units linearly to network inputs: -1000 HU → -1 and 400 HU → +1.

    Values are clipped to [-1000, 1000] HU by default, that is to [-1, 13/7 ≈ 1.857] after the
    map. The lower bound removes scanner padding (-2048 or -3024 HU outside the field of view),
    which is not tissue. The upper bound keeps calcification (calcified nodules reach ~1000 HU,
    a cue for benign nodules) distinct from soft tissue, while bone and metal, which the original
    project left unclipped (reaching about +4), can no longer dominate the input scale.

    Args:
        hu: Hounsfield units, any shape and numeric dtype.
        clip: (low, high) HU clip bounds applied before the map, or None for no clipping.

    Returns:
        float32 array of the same shape.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if clip is not None:
        hu = np.clip(hu, clip[0], clip[1])
    low, high = LUNG_WINDOW_HU
    scale = np.float32(2.0 / (high - low))
    return (hu - np.float32(low)) * scale - np.float32(1.0)


def _cube_symmetries() -> tuple[tuple[tuple[int, int, int], tuple[bool, bool, bool]], ...]:
    permutations = itertools.permutations(range(SPATIAL_AXES))
    flips = list(itertools.product((False, True), repeat=SPATIAL_AXES))
    return tuple((perm, flip) for perm in permutations for flip in flips)


CUBE_SYMMETRIES = _cube_symmetries()
"""The 48 symmetries of the cube acting on the (z, y, x) axes, as (permutation, flips) pairs.

Symmetry (perm, flips) transposes the spatial axes by `perm` (output axis i is input axis
perm[i]) and then reverses every output axis i where flips[i] is True. Index 0 is the identity.
The 6 permutations × 8 flip patterns are the whole group (rotations and reflections).
"""


def symmetries_for(spacing: Sequence[float] | None) -> tuple[int, ...]:
    """The indices of the cube symmetries that keep a grid of `spacing` (z, y, x) mm a grid of
    that spacing: every flip, and only the permutations that exchange axes of equal spacing.

    On an anisotropic grid (`kdsb preprocess --spacing 2.5 1 1`) a transpose of z and y would
    show the network a body squashed along one axis and stretched along the other, not the
    same anatomy turned. Augmentation, bag symmetries and test-time augmentation draw from this
    set.

    Args:
        spacing: voxel spacing in mm (z, y, x); None: any grid is taken as isotropic.

    Returns:
        Indices into `CUBE_SYMMETRIES`, ascending (so the identity first): all 48 on an
        isotropic grid, 16 with two equal spacings, the 8 flips with none.
    """
    if spacing is None:
        return tuple(range(len(CUBE_SYMMETRIES)))
    spacing = [float(s) for s in spacing]
    return tuple(
        index for index, (perm, _) in enumerate(CUBE_SYMMETRIES)
        if all(abs(spacing[axis] - spacing[source]) <= SPACING_TOLERANCE_MM
               for axis, source in enumerate(perm))
    )


def random_symmetry(rng: np.random.Generator, allowed: Sequence[int]) -> int:
    """One of `allowed` (indices into `CUBE_SYMMETRIES`) drawn by `rng`: on an isotropic grid,
    the same draw as `rng.integers(48)`."""
    return int(allowed[rng.integers(len(allowed))])


def _check_index(index: int) -> int:
    if not 0 <= int(index) < len(CUBE_SYMMETRIES):
        raise KdsbError(
            f"expected a cube symmetry index in [0, {len(CUBE_SYMMETRIES)}), received {index}"
        )
    return int(index)


def apply_symmetry(volume: np.ndarray, index: int) -> np.ndarray:
    """Apply cube symmetry `CUBE_SYMMETRIES[index]` to the spatial axes of a volume.

    Args:
        volume: array (z, y, x) or (z, y, x, channels...); trailing axes are left alone.
        index: symmetry index in [0, 48); 0 is the identity.

    Returns:
        A view of `volume` (transposed and reversed); call np.ascontiguousarray if needed.
    """
    perm, flips = CUBE_SYMMETRIES[_check_index(index)]
    volume = np.asarray(volume)
    if volume.ndim < SPATIAL_AXES:
        raise KdsbError(
            f"expected an array (z, y, x[, channels]), received shape {volume.shape}"
        )
    axes = tuple(perm) + tuple(range(SPATIAL_AXES, volume.ndim))
    out = np.transpose(volume, axes)
    flipped = tuple(axis for axis, flip in enumerate(flips) if flip)
    return np.flip(out, axis=flipped) if flipped else out


def _patch_shape(patch_size: int | Sequence[int]) -> np.ndarray:
    size = np.broadcast_to(np.asarray(patch_size, dtype=np.int64), (SPATIAL_AXES,))
    if np.any(size < 1):
        raise KdsbError(f"expected a positive patch size (voxels), received {patch_size}")
    return size.copy()


def _clip_corners(centres: np.ndarray, shape: Sequence[int], size: np.ndarray) -> np.ndarray:
    """Corners of patches centred on `centres`, moved inside the volume.

    Along an axis shorter than the patch the corner is negative and centres the volume in the
    patch, so `extract_patch` pads evenly on both sides.
    """
    shape = np.asarray(shape, dtype=np.int64)
    low = np.minimum(0, (shape - size) // 2)
    high = np.maximum(low, shape - size)
    return np.clip(centres - size // 2, low, high)


def _lung_fractions(lung_mask: np.ndarray, corners: np.ndarray, size: np.ndarray) -> np.ndarray:
    fractions = np.empty(len(corners))
    volume = float(np.prod(size))
    for i, corner in enumerate(corners):
        start = np.maximum(corner, 0)
        stop = corner + size
        window = lung_mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
        fractions[i] = np.count_nonzero(window) / volume
    return fractions


def _random_lung_voxels(
    lung_mask: np.ndarray, slice_offsets: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` lung voxels drawn uniformly (with replacement), as (count, 3) (z, y, x) indices.

    Drawn slice by slice from per-slice counts, so no array of every lung voxel is built: a
    1 mm chest CT holds ~10 million lung voxels (80 MB of int64 indices).
    """
    ranks = rng.integers(slice_offsets[-1], size=count)
    slices = np.searchsorted(slice_offsets, ranks, side="right") - 1
    voxels = np.empty((count, SPATIAL_AXES), dtype=np.int64)
    for z in np.unique(slices):
        chosen = slices == z
        in_slice = np.flatnonzero(lung_mask[z])[ranks[chosen] - slice_offsets[z]]
        voxels[chosen, 0] = z
        voxels[chosen, 1:] = np.stack(np.unravel_index(in_slice, lung_mask.shape[1:]), axis=1)
    return voxels


def sample_patch_corners(
    lung_mask: np.ndarray,
    count: int,
    patch_size: int | Sequence[int],
    rng: np.random.Generator,
    *,
    min_lung_fraction: float = DEFAULT_MIN_LUNG_FRACTION,
    source: str = "volume",
) -> np.ndarray:
    """Corners of `count` patches centred on random lung voxels, so patches show lung, not air.

    Centres are drawn uniformly over lung voxels; a candidate whose patch holds less than
    `min_lung_fraction` lung (after moving it inside the volume) is redrawn, up to a few
    rounds, after which the candidates with the most lung are kept. A volume without lung
    falls back to uniformly random positions (with a warning).

    Args:
        lung_mask: 0/1 (or bool) array (z, y, x).
        count: number of patches.
        patch_size: patch edge in voxels, one int or (z, y, x).
        rng: NumPy random generator (the only source of randomness).
        min_lung_fraction: wanted fraction in [0, 1] of lung voxels in each patch.
        source: the volume file, named in the warning of an empty mask.

    Returns:
        int64 array (count, 3) of (z, y, x) corners. Corners lie inside the volume; along an
        axis shorter than the patch they are negative (see `extract_patch`, which pads).
    """
    lung_mask = np.asarray(lung_mask)
    if lung_mask.ndim != SPATIAL_AXES:
        raise KdsbError(f"expected a lung mask (z, y, x), received shape {lung_mask.shape}")
    if count < 0:
        raise KdsbError(f"expected a patch count >= 0, received {count}")
    if not 0.0 <= min_lung_fraction <= 1.0:
        raise KdsbError(f"expected min_lung_fraction in [0, 1], received {min_lung_fraction}")
    size = _patch_shape(patch_size)
    slice_counts = np.count_nonzero(lung_mask.reshape(lung_mask.shape[0], -1), axis=1)
    slice_offsets = np.concatenate([[0], np.cumsum(slice_counts)])
    if slice_offsets[-1] == 0:
        # (Found in review: the warning named no file.)
        logger.warning("%s: lung mask is empty: sampling %d patches uniformly", source, count)
        centres = rng.integers(0, lung_mask.shape, size=(count, SPATIAL_AXES))
        return _clip_corners(centres, lung_mask.shape, size)

    kept = np.empty((0, SPATIAL_AXES), dtype=np.int64)
    best_corners, best_fractions = kept, np.empty(0)
    for _ in range(_MAX_ROUNDS):
        wanted = count - len(kept)
        if wanted <= 0:
            break
        centres = _random_lung_voxels(lung_mask, slice_offsets, wanted * _OVERSAMPLE, rng)
        corners = _clip_corners(centres, lung_mask.shape, size)
        fractions = _lung_fractions(lung_mask, corners, size)
        good = fractions >= min_lung_fraction
        kept = np.concatenate([kept, corners[good][:wanted]])
        best_corners = np.concatenate([best_corners, corners[~good]])
        best_fractions = np.concatenate([best_fractions, fractions[~good]])
    missing = count - len(kept)
    if missing > 0:
        logger.debug("%d patches below %.2f lung fraction", missing, min_lung_fraction)
        order = np.argsort(-best_fractions, kind="stable")[:missing]
        kept = np.concatenate([kept, best_corners[order]])
    return kept[:count]


def grid_patch_corners(shape: Sequence[int], patch_size: int | Sequence[int]) -> np.ndarray:
    """Corners of a regular grid of patches covering a volume (the blind-grid option).

    Along each axis corners step by the patch size from 0 (no overlap); a last corner flush
    with the far edge is added when the steps leave voxels uncovered. An axis shorter than the
    patch gets one negative corner that centres the volume in the patch (`extract_patch` pads).

    Args:
        shape: volume shape (z, y, x) in voxels.
        patch_size: patch edge in voxels, one int or (z, y, x).

    Returns:
        int64 array (n, 3) of (z, y, x) corners in C order.
    """
    size = _patch_shape(patch_size)
    shape = tuple(int(n) for n in shape)
    if len(shape) != SPATIAL_AXES:
        raise KdsbError(f"expected a volume shape (z, y, x), received {shape}")
    per_axis = []
    for n, p in zip(shape, size, strict=True):
        if n <= p:
            per_axis.append(np.array([(n - p) // 2]))
            continue
        starts = np.arange(0, n - p + 1, p)
        if starts[-1] != n - p:
            starts = np.append(starts, n - p)
        per_axis.append(starts)
    grid = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


def extract_patch(
    volume, corner: Sequence[int], patch_size: int | Sequence[int], fill: float = AIR_HU
) -> np.ndarray:
    """Read one patch, padding with `fill` (air by default) where it leaves the volume.

    Only the patch's part of the source is sliced, so an h5py Dataset reads just the chunks
    the patch touches.

    Args:
        volume: NumPy array or h5py Dataset (z, y, x[, channels...]).
        corner: (z, y, x) index of the patch's first voxel; may be negative or reach past the end.
        patch_size: patch edge in voxels, one int or (z, y, x).
        fill: value outside the volume (HU for HU volumes).

    Returns:
        Array (pz, py, px[, channels...]) of the volume's dtype.
    """
    size = _patch_shape(patch_size)
    corner = np.asarray(corner, dtype=np.int64)
    shape = np.asarray(volume.shape[:SPATIAL_AXES], dtype=np.int64)
    if corner.shape != (SPATIAL_AXES,):
        raise KdsbError(f"expected a (z, y, x) corner, received {corner.tolist()}")
    patch = np.full(tuple(size) + tuple(volume.shape[SPATIAL_AXES:]), fill, dtype=volume.dtype)
    start = np.clip(corner, 0, shape)
    stop = np.clip(corner + size, 0, shape)
    if np.all(stop > start):
        source = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        target = tuple(slice(a, b) for a, b in zip(start - corner, stop - corner, strict=True))
        patch[target] = volume[source]
    return patch
