"""Lung segmentation of a CT volume in HU, and the lung bounding box.

Input volumes are canonical HU (z, y, x): axis 0 inferior → superior, axis 1 anterior →
posterior (a patient table lies at large axis-1 indices), axis 2 right → left; outside-FOV padding
already reads -1000 HU.

`segment_lungs` works in two resolutions so that a 512×512×200 scan takes about a second:

1. A coarse copy (block means of about `COARSE_SPACING_MM`) carries all the morphology.
   Air is below `AIR_THRESHOLD_HU`. The body is the largest non-air component with its holes
   filled slice by slice, so air outside it (also air split off by the table or outside a padded
   circular field of view) is discarded. The trachea is a dark round blob near the midline in the
   top slices; it and the main bronchi are region-grown from there, slice by slice: the blob
   of lumen-dark air (below `AIRWAY_LOOSE_HU`, so a ground-glass lesion beside the trachea
   stays out) touching the previous slice's airway while it stays a lumen, the stricter
   `AIRWAY_THRESHOLD_HU` air within it where it joins the lung, stopping where even that area
   jumps (a leak into the lung), and removed. Air components that are parenchyma (median above
   the airway threshold: gas is darker than lung), large, and reach the upper half of the lungs
   are kept (bowel gas is not). Each side (right / left of the body's midline) is then filled on
   its own, so the two lungs never merge across the mediastinum: a closing with a ball of
   `CLOSING_RADIUS_MM` (two Euclidean distance transforms: an exact ball at little cost, unlike
   binary closing with a huge structuring element) and 3D hole filling take in vessels and
   nodules; tissue enclosed between the lung and the chest wall inside the slice-wise convex
   hull of the lungs takes in juxtapleural nodules and tumours, which a ball rolling from the
   wall side would bite into; a nodule found so reaches on out to the chest wall's depth under
   the skin, past the hull's chords where the wall curves outwards.
   Tumours up to about 35 mm radius leave a dent in the lung that no 15 mm ball fills, so each
   side is also closed with a ball of `ENVELOPE_RADIUS_MM` (edge-padded so the closing never
   fills out to the scan's border) and everything that envelope adds is taken in, except bone
   (coarse HU above `BONE_HU`) and air the lung selection rejected. A tumour that caps a lung's
   apex leaves no dent at all: within `APEX_ZONE_MM` of the top, thick non-bone tissue inside
   the other lung's mirror image, as deep under the skin as this apex, is taken in
   (`_apex_completion`). The envelope's ball still rolls a few millimetres into a large mass's
   dent, so tissue within a rim of a thick mass the filling took in is added too
   (`_lesion_rim`, `MASS_RIMS_MM`): the mass's hidden edge against the wall, spine or
   diaphragm. Air the lung selection rejected counts as gas (bowel, airways: never taken in,
   nor the tissue voxels beside it) only where its median is darker than
   `GROUND_GLASS_MIN_HU`; hazier pockets are a lesion's ground glass cut off from the lung by
   its solid part, and join the lungs they touch (`_gas`).
2. Back on the source grid, coarse voxels well inside the mask, or added by the filling, are
   taken whole (only their tissue voxels beside rejected air); coarse voxels on the boundary keep
   only their full-resolution voxels of lung or ground glass (below `GROUND_GLASS_MAX_HU`), so
   the lung surface is as sharp as the source image, tissue that protrudes into the lung, with
   lung air on both sides within `SMALL_NODULE_MM` (`_protruding`: a nodule too small for the
   coarse grid), and the tissue voxels within `FRINGE_VOXELS` of a solid core the filling took
   in or one protruding into the lung (a nodule's edge where it meets the chest wall, a small
   nodule's base in a corner of the wall) (`_refine`).

Where it still fails (benchmarks/lung_mask.py: 98 lesions implanted into varied copies of a real
chest CT; 98 kept >= 90 % on the draw the rules were tuned on, 97 on a held-out draw): a 35 mm mass
on the diaphragm can lose its base against the liver dome, which no rule here tells from the lesion,
or, filling the costophrenic recess, its lateral-basal third, where no lung is left for the envelope
to close over (66–78 % on several draws); a mass in a concave mediastinal dent deeper than the small
mass tier's 6 mm rim would lose its medial part (74–89 % of 10 mm masses without that tier). The
large ball and the mass rims also take in the parts of mediastinal structures that bulge into a lung
(the descending aorta and arch, the hilum, the oesophagus) and the edge of the liver dome: the mask
is 1.05–1.10 × a plain air envelope with 6–10 % soft tissue (the old 15 mm mask: 4.7 %). Lungs
touching at the anterior junction stay one component. Bilateral apical tumours defeat the mirror
rule. A small air pocket outside the lungs that reads hazier than `GROUND_GLASS_MIN_HU` on the
coarse grid (a nearly collapsed oesophagus) and touches them would be taken in as ground glass.
Scans without much lung (an abdominal CT reaching the lung bases) fail the plausibility bounds
unless `litres` is widened.

Measured (CPU seconds on one core of a shared machine, 2026-12-01, at commit 84df5ad, before
the ground-glass pockets and the protruding cores' fringe): 0.54 s for the real 191×167×233
chest CT at 1.5 mm, 0.60 s for the 200×512×512 benchmark phantom (0.88 and 1.03 s before the
speed-up of the same rules); about half of it is the closings' distance transforms, which run
(with the block means) in `threads` threads. The apex rule's depth transform covers only the
slices it can reach, and the full-resolution pass only the box of the coarse result
(`segment_lungs_in_box`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from kdsb.errors import LungMaskError

logger = logging.getLogger(__name__)

AIR_THRESHOLD_HU = -400.0  # between lung parenchyma (about -850 HU) and soft tissue (0–100 HU)
GROUND_GLASS_MAX_HU = -300.0  # lung or ground glass in the mask's boundary blocks
GROUND_GLASS_MIN_HU = -700.0  # ground glass is hazier than lung (about -850 HU) or gas
AIRWAY_THRESHOLD_HU = -950.0  # airway lumen (about -1000 HU); parenchyma stays above it
AIRWAY_LOOSE_HU = -800.0  # a lumen reading a little above that; ground glass stays above it
COARSE_SPACING_MM = 2.5  # voxel size of the grid the morphology runs on
BLOCK_MEAN_SLAB_BYTES = 4 * 1024**2  # of the scan, averaged at a time
CLOSING_RADIUS_MM = 15.0
ENVELOPE_RADIUS_MM = 38.0
BONE_HU = 300.0
APEX_ZONE_MM = 60.0
# (core radius, rim) in mm: added tissue that survives an opening with a ball of the core
# radius is a mass (the aorta's bulge is too, in part), and tissue within the rim of it is its
# hidden edge. The second pair reaches the medial part of a ~10 mm mass in a concave
# mediastinal dent, too thin for the first core (paravertebral, apical: 74-89 % kept without).
MASS_RIMS_MM = ((8.0, 12.0), (6.0, 6.0))
FRINGE_VOXELS = 2  # how far past the filling a mass's hidden edge may reach
SMALL_NODULE_MM = 5.0  # lung air within this on both sides: tissue protruding into the lung
# Directions (z, y, x) along which protruding tissue is looked for: the in-plane axes and
# diagonals (a wall running diagonally in a slice) and the slice axis.
PROTRUSION_DIRECTIONS = ((0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, -1), (1, 0, 0))
APEX_CORE_MM = 6.0
APEX_DEPTH_PERCENTILE = 5.0  # fills juxtapleural nodules and tumours up to about 14 mm radius
MIN_LUNG_LITRES = 0.5
MAX_LUNG_LITRES = 10.0
MIN_COMPONENT_ML = 10.0  # smaller air pockets inside the body are never lung
MIN_COMPONENT_FRACTION = 0.02  # ... nor those under 2 % of the largest air component
TRACHEA_AREA_MM2 = (50.0, 900.0)  # lumen cross-section (after averaging): 8–34 mm diameter
TRACHEA_MAX_OFFSET_MM = 40.0  # from the body's midline
TRACHEA_MIN_FILL = 0.45  # area / bounding-box area: a round lumen fills about π/4 of its box
TRACHEA_MIN_DARK = 0.2  # least fraction of the lumen below AIRWAY_THRESHOLD_HU (after averaging)
TRACHEA_SEARCH_MM = 60.0  # the seed is looked for this far below the top of the body's air
MAX_ENCLOSED_ML = 150.0  # enclosed tissue filled into a lung: up to a 33 mm radius tumour
NODULE_CORE_RADIUS_MM = 5.0  # solid tissue this thick is a nodule (vessels at the wall are thinner)
WALL_REACH_MM = 10.0  # in-plane reach from a juxtapleural nodule out to the chest wall
WALL_DEPTH_TOLERANCE = 1.0  # pixels: wall depth discretisation (a diagonal staircase ~0.7 px)
IN_PLANE_ONLY_MM = 1e6  # a z spacing that keeps distances within each axial slice
AIRWAY_LEAK_FACTOR = 2.5  # airway area growing this much beyond its largest so far is a leak
AIRWAY_MARGIN_MM = 3.0  # removed around the found lumen: its wall's partial-volume rim
AIRWAY_SMOOTH_MAX_MM = 5.0  # widest in-plane mean (3 coarse pixels) before the airway threshold
MM3_PER_ML = 1000.0
ML_PER_LITRE = 1000.0

HULL_DIRECTIONS = 128  # half-planes that bound each slice's convex hull
HULL_TOLERANCE = 1e-3  # pixels (float32 roundoff): keeps the points that span the hull inside it
HULL_PIXEL_REACH = 0.25  # pixels: how far the hull reaches beyond the outermost pixel centres
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity within an axial slice
# How a coarse voxel maps to the source grid: not at all, its air voxels, its tissue voxels
# (added tissue beside rejected air: bowel gas, airways), or whole.
FULL_NEVER, FULL_IF_AIR, FULL_IF_TISSUE, FULL_ALWAYS = 0, 1, 2, 3


def _coarse_factors(spacing: Sequence[float]) -> tuple[int, int, int]:
    return tuple(max(1, round(COARSE_SPACING_MM / s)) for s in spacing)  # type: ignore[return-value]


def _block_mean(hu: np.ndarray, factors: Sequence[int], threads: int = 1) -> np.ndarray:
    """Mean HU over blocks of `factors` voxels (the last block of an axis may be partial).

    Summing strided views axis by axis is about 15× faster than `np.add.reduceat` here.
    `skimage.measure.block_reduce` pads a partial block with a constant, so a true edge mean
    needs its `np.nanmean` (10× slower) or a sum divided by block sizes (3–4× slower: 0.34 s
    against 0.08 s for a 201×512×512 scan, the same values). The scan is taken a slab of
    whole blocks at a time (`BLOCK_MEAN_SLAB_BYTES`), the same sums in the same order: the
    temporaries stay in cache and no scan-size float32 copy is ever made. Slabs are averaged
    in `threads` threads (NumPy's loops release the GIL).
    """
    slab = factors[0] * max(1, BLOCK_MEAN_SLAB_BYTES // (hu[0].nbytes * factors[0]))
    if hu.shape[0] <= slab:
        return _slab_block_mean(hu, factors)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return np.concatenate(list(pool.map(
            lambda start: _slab_block_mean(hu[start : start + slab], factors),
            range(0, hu.shape[0], slab),
        )))


def _slab_block_mean(hu: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """`_block_mean` of one slab (the whole array at once)."""
    result = hu
    for axis, factor in enumerate(factors):
        if factor == 1:
            continue
        n = result.shape[axis]
        n_full = n // factor
        shape = list(result.shape)
        shape[axis] = -(-n // factor)
        total = np.zeros(shape, dtype=np.float32)
        head = [slice(None)] * result.ndim
        head[axis] = slice(0, n_full)
        for k in range(factor):
            part = [slice(None)] * result.ndim
            part[axis] = slice(k, n_full * factor, factor)
            total[tuple(head)] += result[tuple(part)]
        sizes = np.full(shape[axis], factor, dtype=np.float32)
        if n % factor:
            tail_in = [slice(None)] * result.ndim
            tail_in[axis] = slice(n_full * factor, n)
            tail_out = [slice(None)] * result.ndim
            tail_out[axis] = slice(n_full, n_full + 1)
            total[tuple(tail_out)] = result[tuple(tail_in)].sum(axis=axis, keepdims=True)
            sizes[-1] = n % factor
        size_shape = [1] * result.ndim
        size_shape[axis] = shape[axis]
        total /= sizes.reshape(size_shape)
        result = total
    return result.astype(np.float32, copy=False)


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice: background not connected to the slice's border.

    Labelling the background once is faster than `ndimage.binary_fill_holes`, which dilates
    from the border until nothing changes.
    """
    labels, _ = ndimage.label(~mask, structure=IN_PLANE)
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
             labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    return mask | ((labels > 0) & ~np.isin(labels, border))


def _fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    """Fill background components that touch no face of the array."""
    return mask | _enclosed(~mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _find_trachea_seed(
    interior_air: np.ndarray, strict: np.ndarray, spacing: Sequence[float], midline: float
) -> tuple[int, np.ndarray] | None:
    """The trachea's lumen near the top of the body's air: a round, dark, midline-near blob.

    Candidates are the in-plane components of `interior_air` in the top `TRACHEA_SEARCH_MM`;
    their size, roundness and offset from `midline` are measured on that air (the strict
    threshold, after averaging, shrinks a narrow lumen below its true area), and at least
    `TRACHEA_MIN_DARK` of a candidate must be `strict` (airway-dark) air, which the lung apex's
    parenchyma is not. The highest, then most central, candidate wins.

    Returns:
        (slice index, 2D mask of the seed's strict air), or None when nothing looks like it.
    """
    slices = np.flatnonzero(interior_air.any(axis=(1, 2)))
    top = int(slices[-1])
    lowest = max(0, top - math.ceil(TRACHEA_SEARCH_MM / spacing[0]))
    part = interior_air[lowest : top + 1]
    labels, count = ndimage.label(part, structure=IN_PLANE)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1).astype(np.float64)
    dark = np.bincount(labels[strict[lowest : top + 1]], minlength=count + 1)
    columns = np.broadcast_to(np.arange(part.shape[2], dtype=np.float64), part.shape)
    centre_x = np.bincount(flat, weights=columns.ravel(), minlength=count + 1)
    candidates = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        box_area = (box[1].stop - box[1].start) * (box[2].stop - box[2].start)
        offset = abs(centre_x[index] / area[index] - midline) * spacing[2]
        area_mm2 = area[index] * spacing[1] * spacing[2]
        if (
            TRACHEA_AREA_MM2[0] <= area_mm2 <= TRACHEA_AREA_MM2[1]
            and area[index] / box_area >= TRACHEA_MIN_FILL
            and dark[index] >= TRACHEA_MIN_DARK * area[index]
            and offset <= TRACHEA_MAX_OFFSET_MM
        ):
            candidates.append((-box[0].start, offset, index))
    if not candidates:
        return None
    minus_z, _, index = min(candidates)
    return lowest - minus_z, (labels[-minus_z] == index) & strict[lowest - minus_z]


def _touched(labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The components of `labels` (a slice's, or a volume's) that overlap `previous`, bool."""
    touched = np.unique(labels[previous])
    touched = touched[touched > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=bool)
    lookup[touched] = True
    return lookup[labels]


def _grow_airway(
    loose: np.ndarray, strict: np.ndarray, seed: np.ndarray, z: int, airway: np.ndarray, step: int
) -> None:
    """Grow the airway slice by slice from the 2D `seed` in slice `z`, in direction `step` (±1).

    `loose` and `strict` number the air of each axial slice on its own, below `AIRWAY_LOOSE_HU` and
    below the airway's threshold. The loose air touching the airway of the previous slice is taken
    while it stays a lumen: above the carina the trachea is an air blob of its own in every slice,
    also where its lumen reads a little above the strict threshold (a real scan's trachea can read
    -940 to -970 HU in 3 mm blocks). Where that air joins the lung (an area jump beyond
    `AIRWAY_LEAK_FACTOR` times the largest area so far), only its strict air is taken, and growth
    stops at the first slice where even that jumps (a leak into emphysematous lung).
    """
    previous = seed
    largest_area = int(previous.sum())
    z += step
    while 0 <= z < loose.shape[0]:
        current = _touched(loose[z], previous)
        if current.sum() > AIRWAY_LEAK_FACTOR * largest_area:
            current = _touched(strict[z], previous)
        area = int(current.sum())
        if area == 0:
            return
        if area > AIRWAY_LEAK_FACTOR * largest_area:
            logger.debug("airway growth stopped at slice %d: area %d > %d", z, area, largest_area)
            return
        airway[z] |= current
        previous, largest_area = current, max(largest_area, area)
        z += step


def _find_airway(
    coarse_hu: np.ndarray, interior_air: np.ndarray, spacing: Sequence[float], midline: float
) -> np.ndarray:
    """Trachea and main bronchi (coarse grid): a region grown at `AIRWAY_THRESHOLD_HU`.

    Where the coarse pixels are small, the threshold applies to HU averaged over 3×3 in-plane
    voxels, so image noise neither breaks the lumen apart nor sprinkles lung parenchyma below
    the threshold; coarser pixels are block means already, and a 3×3 mean over them would
    erase a narrow lumen (a small patient's trachea).
    """
    airway = np.zeros(coarse_hu.shape, dtype=bool)
    if 3 * max(spacing[1:]) <= AIRWAY_SMOOTH_MAX_MM:
        coarse_hu = ndimage.uniform_filter(coarse_hu, size=(1, 3, 3))
    strict = interior_air & (coarse_hu < AIRWAY_THRESHOLD_HU)
    found = _find_trachea_seed(interior_air, strict, spacing, midline)
    if found is None:
        logger.debug("no trachea found in the top %.0f mm of the body's air", TRACHEA_SEARCH_MM)
        return airway
    z, seed = found
    # One labelling of every slice's air at once (in-plane connectivity only) per threshold
    # serves the slice-by-slice growth.
    loose, _ = ndimage.label(interior_air & (coarse_hu < AIRWAY_LOOSE_HU), structure=IN_PLANE)
    labels, _ = ndimage.label(strict, structure=IN_PLANE)
    airway[z] = seed
    _grow_airway(loose, labels, seed, z, airway, step=-1)
    _grow_airway(loose, labels, seed, z, airway, step=+1)
    logger.debug("trachea seed in coarse slice %d, airway %d voxels", z, airway.sum())
    # The lumen's partial-volume rim (and the averaging) shrank it: widen it again, in-plane.
    rim = max(1, round(AIRWAY_MARGIN_MM / min(spacing[1:])))
    box = _bounding_box(airway, (0, rim, rim))
    airway[box] = ndimage.binary_dilation(airway[box], structure=IN_PLANE, iterations=rim)
    return airway


def _select_lungs(candidates: np.ndarray, hu: np.ndarray, voxel_ml: float) -> np.ndarray:
    """Keep air components that are parenchyma, big enough to be lung and reaching the upper
    half of the lungs.

    Gas is not parenchyma: a component whose median HU is below `AIRWAY_THRESHOLD_HU` (bowel
    gas, a pneumothorax, air outside the body) is dropped; lung, with its vessels and septa,
    has a median near -850 HU (-780 to -800 HU on the real CTs of the test archive, whose colon
    gas reads -970 HU). Bowel gas under the diaphragm is also discarded because it ends below
    the middle of the largest component; a lung squeezed by disease still reaches the apex.
    """
    labels, count = ndimage.label(candidates)
    if count == 0:
        return candidates
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # Median below the threshold ⇔ more than half the voxels below it (a count, not a sort).
    dark = np.bincount(labels[hu < AIRWAY_THRESHOLD_HU], minlength=count + 1)
    sizes[2 * dark > sizes] = 0
    if not sizes.any():
        return np.zeros_like(candidates)
    largest = int(np.argmax(sizes))
    profile = (labels == largest).sum(axis=(1, 2))
    middle_z = float(np.dot(np.arange(profile.size), profile) / profile.sum())
    keep = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        big = sizes[index] * voxel_ml >= MIN_COMPONENT_ML
        big = big and sizes[index] >= MIN_COMPONENT_FRACTION * sizes[largest]
        keep[index] = big and sizes[index] > 0 and box[0].stop - 1 >= middle_z
    return keep[labels]


def _gas(rejected: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The components of air the lung selection `rejected` that are gas or stray lung: those
    whose median HU is below `GROUND_GLASS_MIN_HU`. Hazier ones (a ground-glass lesion's parts
    that read as air on the coarse grid, cut off from the lung by its solid core) are left to
    the filling like tissue."""
    labels, count = ndimage.label(rejected)
    if count == 0:
        return rejected
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    dark = np.bincount(labels[hu < GROUND_GLASS_MIN_HU], minlength=count + 1)
    gas = 2 * dark > sizes
    gas[0] = False
    return gas[labels]


def _bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """Slices around the nonzero voxels of a non-empty mask, widened by `margin` voxels, clipped."""
    box = []
    for axis, (n, m) in enumerate(zip(mask.shape, margin, strict=True)):
        indices = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(indices[0]) - m), min(n, int(indices[-1]) + 1 + m)))
    return tuple(box)  # type: ignore[return-value]


def _close_balls(
    mask: np.ndarray, radii_mm: Sequence[float], spacing: Sequence[float], threads: int = 1
) -> list[np.ndarray]:
    """Morphological closings with Euclidean balls of each radius, via distance transforms.

    The array is first extended by the largest ball's radius with copies of its border slices,
    so a lung cut by the scan's first or last slice goes on beyond it (and is not eroded there),
    while a lung that ends inside the scan is not filled out to the scan's border. One distance
    transform of that array dilates by every radius; each erosion then runs on the part within
    its own radius (plus a voxel) of `mask`: the same closing as with a pad of that radius
    alone, since a copied border slice further out is never nearer than one within it.

    The transforms are the `edt` package's squared ones (float32), twice as fast as scipy's
    here; compared with scipy's (float64) they give the same closings on every case measured
    (a voxel could only differ if its distance were within float32 roundoff of the radius).
    They run in `threads` threads (the same distances whatever the number).
    """
    import edt

    most = max(radii_mm)
    pad = [math.ceil(most / s) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad], mode="edge")
    squared = edt.edtsq(~padded, anisotropy=tuple(spacing), black_border=False,
                        parallel=threads)
    closings = []
    for radius in radii_mm:
        own = [math.ceil(radius / s) + 1 for s in spacing]
        dilated = squared[tuple(slice(p - o, p + n + o)
                                for p, o, n in zip(pad, own, mask.shape, strict=True))] <= radius**2
        closed = edt.edtsq(dilated, anisotropy=tuple(spacing), black_border=False,
                           parallel=threads) > radius**2
        closings.append(closed[tuple(slice(o, o + n)
                                     for o, n in zip(own, mask.shape, strict=True))])
    return closings


def _slice_hulls(mask: np.ndarray) -> np.ndarray:
    """The convex hull of `mask` in every axial slice (the thoracic cavity seen from the lungs).

    Hand-written because per-slice `skimage.morphology.convex_hull_image` costs about a
    millisecond a slice: the hull is the intersection of the half-planes that support the
    slice's points in `HULL_DIRECTIONS` directions (a polygon that exceeds the true hull by at
    most 1 - cos(π / HULL_DIRECTIONS), 0.1 %, of its size). The points are each row's first and
    last mask pixel, whose hull is the slice's; each row of the hull is the interval of x that
    all half-planes allow, so all slices are done at once with arrays of (z, y, direction).
    """
    hulls = np.zeros_like(mask)
    if not mask.any():
        return hulls
    box = _bounding_box(mask, (0, 0, 0))
    mask = mask[box]
    nx = mask.shape[2]
    rows = mask.any(axis=2)  # (z, y)
    first = np.argmax(mask, axis=2).astype(np.float32)
    last = (nx - 1 - np.argmax(mask[:, :, ::-1], axis=2)).astype(np.float32)
    # Directions offset by half a step: none is parallel to the rows (no division by zero).
    # Those pointing right (+x) are supported by each row's last pixel and bound x from above;
    # the mirrored ones, pointing left, by the first pixel, bounding x from below.
    angles = np.pi * (np.arange(HULL_DIRECTIONS // 2) + 0.5) / (HULL_DIRECTIONS // 2) - np.pi / 2
    uy, ux = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    along = np.arange(mask.shape[1], dtype=np.float32)[:, None] * uy  # (y, k)
    outside = ~rows[..., None]
    bounds = []
    for extreme, sign in ((last, 1.0), (first, -1.0)):
        # Half-plane k: x * sign * ux + y * uy <= support[k] over the slice's points.
        reach = along + extreme[..., None] * (sign * ux)
        reach[np.broadcast_to(outside, reach.shape)] = -np.inf
        # A little beyond the pixel centres (skimage's default, the hull of the pixels' corners,
        # reaches half a pixel): covers the coarse pixels a juxtapleural nodule's edge cuts.
        support = reach.max(axis=1, keepdims=True) + HULL_PIXEL_REACH * (np.abs(ux) + np.abs(uy))
        bounds.append((support - along) / ux)  # sign * x <= bound
    x_high = np.floor(bounds[0].min(axis=2) + HULL_TOLERANCE)
    x_low = np.ceil(-bounds[1].min(axis=2) - HULL_TOLERANCE)
    # Rows beyond the slice's own extent are empty (the polygon may just reach them).
    ny = mask.shape[1]
    y_first = np.where(rows.any(axis=1), np.argmax(rows, axis=1), ny)
    y_last = ny - 1 - np.argmax(rows[:, ::-1], axis=1)
    ys = np.arange(ny)
    beyond = (ys < y_first[:, None]) | (ys > y_last[:, None])
    x_low[beyond], x_high[beyond] = 1.0, 0.0
    x = np.arange(nx, dtype=np.float32)
    hulls[box] = (x >= x_low[..., None]) & (x <= x_high[..., None])
    return hulls


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """A boolean ball of `radius_mm` on a grid of `spacing` (mm), never smaller than the
    6-neighbourhood (so it erodes by at least one voxel along every axis)."""
    half = [max(1, math.floor(radius_mm / s)) for s in spacing]
    z, y, x = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    radius = max(radius_mm, max(spacing))
    return (z * spacing[0]) ** 2 + (y * spacing[1]) ** 2 + (x * spacing[2]) ** 2 <= radius**2


def _enclosed(tissue: np.ndarray) -> np.ndarray:
    """Components of `tissue` that touch no face of the array."""
    labels, _ = ndimage.label(tissue)
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    border = np.unique(np.concatenate([face.ravel() for face in faces]))
    return (labels > 0) & ~np.isin(labels, border)


def _fill_side(
    coarse_hu: np.ndarray,
    lung_air: np.ndarray,
    hulls: np.ndarray,
    body: np.ndarray,
    side: tuple[slice, ...],
    spacing: Sequence[float],
    threads: int = 1,
) -> np.ndarray:
    """The filled lung mask of one side (coarse grid, all arrays full size).

    Two fillings, both blind to the other side so the lungs never merge across the mediastinum:

    - closing with a `CLOSING_RADIUS_MM` ball, then 3D hole filling: vessels, airways inside the
      lung and nodules up to about that radius;
    - tissue inside the slice-wise convex hull of the lungs that is enclosed by this lung and the
      chest wall (it reaches neither the midline nor the scan's ends): nodules and tumours
      that are cut flat by the chest wall, whose bite a ball from the wall side would enter;
      such a nodule then reaches out to the chest wall (`_reach_wall`).
    """
    part = np.zeros_like(lung_air)
    part[side] = lung_air[side]
    filled = np.zeros_like(lung_air)
    if not part.any():
        return filled
    # The box reaches past the midline into empty space, so the closing erodes there; at the
    # scan's own borders it stops, so a lung cut by the first or last slice is not eroded.
    box = _bounding_box(part, (1, 1, 1))
    closed, enveloped = _close_balls(part[box], (CLOSING_RADIUS_MM, ENVELOPE_RADIUS_MM), spacing,
                                     threads)
    filled[box] = _fill_holes_3d(closed)
    envelope = np.zeros_like(lung_air)
    envelope[box] = _fill_holes_3d(enveloped)
    half = filled[side]
    # Pockets are looked for after the closing has filled the vessels: a nodule that a vessel
    # touches would otherwise reach the mediastinum through the vessel tree.
    pockets = _enclosed(hulls[side] & ~half)
    max_voxels = MAX_ENCLOSED_ML * MM3_PER_ML / math.prod(spacing)
    labels, count = ndimage.label(pockets)
    if count:
        keep = np.bincount(labels.ravel()) <= max_voxels
        keep[0] = False
        half |= keep[labels]
        # A nodule is solid tissue the lung enclosed, whether the closing or a pocket took it
        # in: what survives an opening with a ball (thin vessels and the slivers between the
        # lung's staircase surface and its hull do not). Where such a nodule meets a pocket it
        # touches the chest wall, and the hull's chord may have cut off the part of it under the
        # wall's outward curve: it reaches on out to the wall.
        near = _bounding_box(pockets, (1, 1, 1))
        solid = np.zeros_like(pockets)
        solid[near] = ndimage.binary_opening(
            half[near] & ~lung_air[side][near], structure=_ball(NODULE_CORE_RADIUS_MM, spacing)
        )
        nodules, _ = ndimage.label(solid | pockets)
        juxtapleural = np.intersect1d(nodules[solid], nodules[pockets])
        for index in juxtapleural:
            _reach_wall(nodules == index, lung_air[side], body[side], half, spacing)
    result = np.zeros_like(lung_air)
    result[side] = half
    # Air the lung selection rejected (bowel gas, airways) is never taken in, nor bone.
    tissue = (coarse_hu >= AIR_THRESHOLD_HU) & (coarse_hu <= BONE_HU)
    return result | (envelope & body & tissue)


def _mirror_x(mask: np.ndarray, midline: float) -> np.ndarray:
    """`mask` reflected across the plane x = `midline` (voxel units); what falls outside is lost."""
    source = np.rint(2.0 * midline - np.arange(mask.shape[2])).astype(int)
    valid = (source >= 0) & (source < mask.shape[2])
    mirrored = np.zeros_like(mask)
    mirrored[:, :, valid] = mask[:, :, source[valid]]
    return mirrored


def _apex_completion(
    own: np.ndarray,
    other: np.ndarray,
    body: np.ndarray,
    depth: np.ndarray,
    coarse_hu: np.ndarray,
    midline: float,
    spacing: Sequence[float],
    zone_start: int,
) -> np.ndarray:
    """Tissue that caps one lung's apex where the other lung, mirrored, still has lung.

    A tumour filling the top of a lung leaves no concavity for a closing to fill: the lung just
    ends lower. The apices are nearly symmetric, so within `APEX_ZONE_MM` of the higher apex
    (from slice `zone_start` up, `_apex_zone`), non-bone tissue inside the mirrored other lung
    that is thick (survives an opening with a `APEX_CORE_MM` ball: not the slivers a slightly
    rotated body leaves) and touches this lung is taken in. `depth` is the depth under the skin
    in mm (`_depth_under_skin`, computed once for both sides). The arrays may be the top slices
    of the scan only, from one below the zone up: the rule looks no further.
    """
    zone = np.zeros_like(own)
    zone[zone_start:] = True
    candidates = zone & _mirror_x(other, midline) & ~own & body & (coarse_hu < BONE_HU)
    if not candidates.any():
        return candidates
    if not (own & zone).any():
        return np.zeros_like(own)
    # Not the chest wall: no shallower under the skin than this lung's own apex.
    candidates &= depth >= np.percentile(depth[own & zone], APEX_DEPTH_PERCENTILE)
    if not candidates.any():
        return candidates
    box = _bounding_box(candidates, (1, 1, 1))
    core = np.zeros_like(candidates)
    core[box] = ndimage.binary_opening(candidates[box], structure=_ball(APEX_CORE_MM, spacing))
    labels, count = ndimage.label(candidates & _dilate_cross(core, 2))
    touching = np.unique(labels[_dilate_cross(own, 1) & (labels > 0)])
    return np.isin(labels, touching[touching > 0])


def _apex_zone(lungs: np.ndarray, spacing: Sequence[float]) -> int:
    """The first slice of the apex rule's zone: `APEX_ZONE_MM` below the higher apex."""
    top = int(np.flatnonzero(lungs.any(axis=(1, 2)))[-1])
    return max(0, top - math.ceil(APEX_ZONE_MM / spacing[0]))


def _depth_under_skin(
    body: np.ndarray, spacing: Sequence[float], needed: np.ndarray, start: int
) -> np.ndarray:
    """Depth under the skin (mm) of slices `start` onwards: the distance transform of `body`,
    exact at the `needed` voxels (elsewhere not meaningful).

    The transform runs on the body's bounding box and one voxel around it (all outside the
    body, so nothing beyond is nearer; outside the box the depth is 0) and only on the slices a
    needed voxel's nearest skin can lie in: a first pass over the needed voxels' own slices
    gives depths at least the true ones, and the second starts that far below them. For the
    apex rule this is a third to two thirds of the scan.
    """
    depth = np.zeros((body.shape[0] - start, *body.shape[1:]))
    _, ys, xs = _bounding_box(body, (1, 1, 1))
    needed = needed[:, ys, xs]
    if not needed.any():
        return depth
    first = int(np.flatnonzero(needed.any(axis=(1, 2)))[0])
    low = 0
    if not body[first:, ys, xs].all():  # else there is no skin to bound the depth by
        upper = ndimage.distance_transform_edt(body[first:, ys, xs], sampling=spacing)
        bound = float(upper[needed[first:]].max())
        # A voxel below slice `low` is further than `bound` from every needed voxel.
        low = max(0, first - math.ceil(bound / spacing[0]))
    exact = ndimage.distance_transform_edt(body[low:, ys, xs], sampling=spacing)
    depth[max(0, low - start):, ys, xs] = exact[max(0, start - low):]
    return depth


def _lesion_rim(
    mask: np.ndarray,
    lung_air: np.ndarray,
    body: np.ndarray,
    rejected_air: np.ndarray,
    coarse_hu: np.ndarray,
    spacing: Sequence[float],
) -> np.ndarray:
    """Tissue within a rim (`MASS_RIMS_MM`) of a thick mass the filling took in: the mass's
    hidden edge.

    The envelope's ball rolls a little way into the dent a large mass leaves, so the mass's
    outer few millimetres, where it meets the chest wall, spine or diaphragm, stay outside; a
    smaller mass at a concave mediastinal surface leaves its medial part beyond the lung's hull.
    For each (core, rim) of `MASS_RIMS_MM`: tissue the filling added that survives an opening
    with a ball of the core radius is a mass (vessels and the thin slivers along the mediastinum
    do not survive); non-bone tissue inside the body within the rim of it is taken in, never gas
    (`rejected_air`: the lung selection's rejected air darker than ground glass, dilated by a
    voxel).
    """
    tissue = (coarse_hu >= AIR_THRESHOLD_HU) & (coarse_hu <= BONE_HU)
    added = mask & ~lung_air & tissue
    if not added.any():
        return added
    widest = max(rim_mm for _, rim_mm in MASS_RIMS_MM)
    box = _bounding_box(added, (math.ceil(widest / min(spacing)) + 1,) * 3)
    near = np.zeros(added[box].shape, dtype=bool)
    for core_mm, rim_mm in MASS_RIMS_MM:
        masses = ndimage.binary_opening(added[box], structure=_ball(core_mm, spacing))
        if masses.any():
            near |= ndimage.distance_transform_edt(~masses, sampling=spacing) <= rim_mm
    if not near.any():
        return np.zeros_like(mask)
    rim = np.zeros_like(mask)
    rim[box] = near & body[box] & tissue[box] & ~rejected_air[box]
    return rim


def _reach_wall(
    nodule: np.ndarray,
    lung_air: np.ndarray,
    body: np.ndarray,
    filled: np.ndarray,
    spacing: Sequence[float],
) -> None:
    """Extend a juxtapleural nodule (its solid core and pockets) out to where the lung's surface
    would be.

    The pockets (tissue enclosed by the lung and the slice-wise convex hull of the lungs) end at
    the hull's chords, short of a chest wall that curves outwards. The chest wall's thickness
    changes slowly, so the lung surface around the nodule lies at about the same depth under
    the skin as the nodule's hidden edge: wall voxels within `WALL_REACH_MM` (in-plane) of the
    nodule that lie no shallower than the nearest lung surface, less `WALL_DEPTH_TOLERANCE`
    pixels, are added to `filled` (in place). Works on the nodule's slices only, so growth never
    runs along the axis into the diaphragm.
    """
    slices = np.flatnonzero(nodule.any(axis=(1, 2)))
    zs = slice(int(slices[0]), int(slices[-1]) + 1)
    nodule, lung_air, body = nodule[zs], lung_air[zs], body[zs]
    wall = body & ~filled[zs]
    surface = lung_air & ndimage.binary_dilation(wall, structure=IN_PLANE)
    if not surface.any():
        return
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    _, nearest = ndimage.distance_transform_edt(~surface, sampling=spacing, return_indices=True)
    surface_depth = depth[tuple(nearest)]
    reach = ndimage.distance_transform_edt(~nodule, sampling=(IN_PLANE_ONLY_MM, *spacing[1:]))
    tolerance = WALL_DEPTH_TOLERANCE * min(spacing[1:])
    filled[zs] |= wall & (reach <= WALL_REACH_MM) & (depth >= surface_depth - tolerance)


def _neighbour_pairs(ndim: int):
    """(lower, upper) index pairs of each axis: `mask[upper]` is `mask[lower]`'s next voxel."""
    for axis in range(ndim):
        low, high = [slice(None)] * ndim, [slice(None)] * ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        yield axis, tuple(low), tuple(high)


def _erode_cross(mask: np.ndarray, outside: bool = False) -> np.ndarray:
    """Binary erosion by the 6-neighbourhood, outside the array counting as `outside`.

    The same as `ndimage.binary_erosion(mask, border_value=outside)`, as an AND of shifted
    views: 15× faster on a full-resolution box, 20× on the coarse grid (scipy's generic
    structuring-element loop costs 5–20 ns a voxel).
    """
    eroded = mask.copy()
    for axis, low, high in _neighbour_pairs(mask.ndim):
        eroded[high] &= mask[low]
        eroded[low] &= mask[high]
        if outside:
            continue
        for end in (0, -1):
            face = [slice(None)] * mask.ndim
            face[axis] = end
            eroded[tuple(face)] = False
    return eroded


def _dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the 6-neighbourhood, `iterations` (≥ 1) times: the same as
    `ndimage.binary_dilation(mask, iterations=iterations)`, as ORs of shifted views (see
    `_erode_cross`)."""
    for _ in range(iterations):
        dilated = mask.copy()
        for _axis, low, high in _neighbour_pairs(mask.ndim):
            dilated[high] |= mask[low]
            dilated[low] |= mask[high]
        mask = dilated
    return mask


def _protruding(air: np.ndarray, candidates: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The `candidates` with `air` on both sides along one of `PROTRUSION_DIRECTIONS` within
    `SMALL_NODULE_MM`: tissue that protrudes into the lung (a small nodule on the wall), bool.

    Where the lung is convex no straight line leaves it and comes back, so the chest wall behind
    a convex lung surface is never taken; where the wall bulges into the lung (ribs, the
    mediastinum), tissue up to `SMALL_NODULE_MM` deep can be. Looked up at the candidates only
    (a thin shell of the box), by flat offsets into `air` padded by the longest reach.
    """
    reach = [max(1, round(SMALL_NODULE_MM / s)) for s in spacing]
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


def _refine(
    code: np.ndarray, added: np.ndarray, hu: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The mask at full resolution from each voxel's coarse block's `code` (`FULL_NEVER` …
    `FULL_ALWAYS`) and whether the filling `added` that block, bool.

    Boundary blocks (`FULL_IF_AIR`) keep their lung and ground glass (below
    `GROUND_GLASS_MAX_HU`), their tissue protruding into the lung (`_protruding`: a nodule too
    small for the coarse grid) and the tissue within `FRINGE_VOXELS` of a solid core, one the
    filling took in or one protruding into the lung: a nodule's edge against the chest wall,
    or the base of a small nodule in a corner of the wall.

    Args:
        code, added: per voxel, uint8 and bool, shape (z, y, x) of `hu`.
        hu: the HU of the box, (z, y, x).
        spacing: voxel size (z, y, x), mm.
    """
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
    protruding = _protruding(kept & air, soft_tissue & ~kept, spacing)
    kept |= protruding
    cores = kept & tissue
    cores &= added
    cores |= protruding
    kept |= soft_tissue & _dilate_cross(_erode_cross(cores), FRINGE_VOXELS)
    return kept


def _upsample(coarse: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse block grid back to `shape`."""
    result = coarse
    for axis, factor in enumerate(factors):
        if factor > 1:
            result = np.repeat(result, factor, axis=axis)
    return result[tuple(slice(0, n) for n in shape)]


def _plausibility_error(
    patient: str, litres: tuple[float, float], received: str
) -> LungMaskError:
    return LungMaskError(
        f"{patient}: expected lungs of {litres[0]:g}–{litres[1]:g} L, received {received}"
    )


def segment_lungs(
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    patient_id: str | None = None,
    litres: tuple[float, float] = (MIN_LUNG_LITRES, MAX_LUNG_LITRES),
) -> np.ndarray:
    """Segment both lungs in a CT volume.

    The mask holds lung parenchyma with its vessels and with nodules or tumours touching the
    chest wall up to about `CLOSING_RADIUS_MM` radius; it excludes air outside the body, the
    trachea and main bronchi (where found) and bowel gas. See the module docstring for the method.

    Args:
        hu: Hounsfield units, shape (z, y, x), canonical orientation (axis 0 inferior →
            superior, axis 1 anterior → posterior, axis 2 right → left).
        spacing: voxel size (z, y, x) in mm, positive (as `kdsb.io.series.CTSeries` holds it).
        patient_id: named in error messages.
        litres: the plausible total lung volume (low, high) in litres; the default suits
            adult chest CT covering both lungs (widen it for partial scans or children).

    Returns:
        uint8 0/1 lung mask, same shape as `hu`.

    Raises:
        LungMaskError: no lungs, or a total lung volume outside `litres` (0.5–10 L).
    """
    box, mask = segment_lungs_in_box(hu, spacing, patient_id=patient_id, litres=litres)
    return mask_on_box(box, mask, tuple(slice(0, n) for n in np.shape(hu)))


def segment_lungs_in_box(
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    patient_id: str | None = None,
    litres: tuple[float, float] = (MIN_LUNG_LITRES, MAX_LUNG_LITRES),
    threads: int = 1,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """`segment_lungs` without the volume-size array: the box of `hu` that holds the mask, and
    the mask inside it (zero everywhere outside the box).

    Args and Raises: as `segment_lungs`; `threads` run the block means and the closings'
    distance transforms (the same mask whatever the number).

    Returns:
        (slices (z, y, x) of the box, uint8 0/1 mask of the box's shape).
    """
    patient = patient_id or "volume"
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1 or not np.issubdtype(hu.dtype, np.number):
        raise LungMaskError(
            f"{patient}: expected a non-empty 3D HU volume (z, y, x), "
            f"received shape {hu.shape} of {hu.dtype}"
        )
    threads = max(1, int(threads))
    factors = _coarse_factors(spacing)
    coarse_spacing = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    coarse_hu = _block_mean(hu, factors, threads)

    air = coarse_hu < AIR_THRESHOLD_HU
    body = _largest_component(~air)
    inside_body = _fill_holes_2d(body)
    interior_air = air & inside_body
    if not interior_air.any():
        raise _plausibility_error(patient, litres, "no air-filled region inside the body")

    body_profile = body.sum(axis=(0, 1))
    midline = float(np.dot(np.arange(body_profile.size), body_profile) / body_profile.sum())

    airway = _find_airway(coarse_hu, interior_air, coarse_spacing, midline) & interior_air
    voxel_ml = math.prod(coarse_spacing) / MM3_PER_ML
    lung_air = _select_lungs(interior_air & ~airway, coarse_hu, voxel_ml)
    if not lung_air.any():
        raise _plausibility_error(patient, litres, "no air-filled region large enough to be lung")

    # Each side is closed and filled on its own so the two lungs never merge across the
    # mediastinum; a lung crossing the midline is simply handled in two parts.
    split = math.ceil(midline)
    hulls = _slice_hulls(lung_air)
    sides = [
        _fill_side(coarse_hu, lung_air, hulls, inside_body, side, coarse_spacing, threads)
        for side in (np.s_[:, :, :split], np.s_[:, :, split:])
    ]
    coarse_mask = sides[0] | sides[1]
    if sides[0].any() and sides[1].any():
        # The apex rule needs the slices from one below its zone up, and the depth under the
        # skin of the lungs there and of their mirror images (its candidates).
        zone_start = _apex_zone(coarse_mask, coarse_spacing)
        low = max(0, zone_start - 1)
        needed = coarse_mask | _mirror_x(coarse_mask, midline)
        needed[:zone_start] = False
        depth = _depth_under_skin(inside_body, coarse_spacing, needed, low)
        top = np.s_[low:]
        for own, other in (sides, sides[::-1]):
            coarse_mask[top] |= _apex_completion(
                own[top], other[top], inside_body[top], depth, coarse_hu[top], midline,
                coarse_spacing, zone_start - low,
            )

    rejected = interior_air & ~lung_air
    gas = _gas(rejected, coarse_hu)
    rejected_air = _dilate_cross(gas, 1)
    coarse_mask |= _lesion_rim(coarse_mask, lung_air, inside_body, rejected_air, coarse_hu,
                               coarse_spacing)
    # Ground glass the lung selection left out joins the lungs it touches.
    coarse_mask |= _touched(ndimage.label(rejected & ~gas)[0], _dilate_cross(coarse_mask, 1))
    inner = _erode_cross(coarse_mask, outside=True)
    added = coarse_mask & ~lung_air
    outer = _dilate_cross(coarse_mask, 1) & ~coarse_mask & ~air
    code = np.full(coarse_mask.shape, FULL_NEVER, dtype=np.uint8)
    code[(coarse_mask & ~inner) | outer] = FULL_IF_AIR
    code[inner | added] = FULL_ALWAYS
    code[added & rejected_air] = FULL_IF_TISSUE
    code[outer & rejected_air] = FULL_NEVER

    # Full-resolution work only inside the bounding box of the coarse result.
    coarse_box = _bounding_box(code, (0, 0, 0))
    full_box = tuple(
        slice(b.start * f, min(n, b.stop * f))
        for b, f, n in zip(coarse_box, factors, hu.shape, strict=True)
    )
    box_shape = tuple(b.stop - b.start for b in full_box)
    kept = _refine(
        _upsample(code[coarse_box], factors, box_shape),
        _upsample(added[coarse_box], factors, box_shape),
        hu[full_box],
        spacing,
    )

    volume = int(np.count_nonzero(kept)) * math.prod(spacing) / MM3_PER_ML / ML_PER_LITRE
    logger.debug("%s: lung volume %.2f L", patient, volume)
    if not litres[0] <= volume <= litres[1]:
        raise _plausibility_error(patient, litres, f"{volume:.2f} L")
    return full_box, kept.view(np.uint8)


def mask_on_box(
    box: Sequence[slice], mask: np.ndarray, target: Sequence[slice]
) -> np.ndarray:
    """The mask held on `box` of a volume (zero outside it), on another box `target` of it.

    Args:
        box: slices (z, y, x) with explicit starts and stops: where `mask` lies in the volume.
        mask: the mask on `box`, shape (z, y, x).
        target: slices (z, y, x) with explicit starts and stops: the box wanted.

    Returns:
        uint8 array of `target`'s shape.
    """
    result = np.zeros([t.stop - t.start for t in target], dtype=np.uint8)
    overlap = [(max(b.start, t.start), min(b.stop, t.stop)) for b, t in zip(box, target,
                                                                             strict=True)]
    if all(low < high for low, high in overlap):
        into = tuple(slice(low - t.start, high - t.start)
                     for (low, high), t in zip(overlap, target, strict=True))
        source = tuple(slice(low - b.start, high - b.start)
                       for (low, high), b in zip(overlap, box, strict=True))
        result[into] = mask[source]
    return result


def lung_bounding_box(
    mask: np.ndarray,
    spacing: Sequence[float],
    margin_mm: float = 10.0,
    *,
    box: Sequence[slice] | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[slice, slice, slice]:
    """The bounding box of a mask plus a margin, clipped to the array.

    Args:
        mask: lung mask, shape (z, y, x), nonzero = lung.
        spacing: voxel size (z, y, x) in mm, positive.
        margin_mm: margin added on every side, in mm (rounded up to whole voxels per axis).
        box: where `mask` lies in a larger volume (slices with explicit starts, as
            `segment_lungs_in_box` returns them); the result is then in that volume's indices.
        shape: the larger volume's shape (z, y, x), which the result is clipped to (required
            with `box`).

    Returns:
        Three slices (z, y, x) selecting the box.

    Raises:
        LungMaskError: an empty mask or a negative margin.
    """
    mask = np.asarray(mask)
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise LungMaskError(f"expected a margin of 0 mm or more, received {margin_mm!r}")
    if mask.ndim != 3 or not mask.any():
        raise LungMaskError(
            f"expected a 3D mask (z, y, x) with lung voxels, received shape {mask.shape} "
            f"with {int(np.count_nonzero(mask))} nonzero voxels"
        )
    # The small slack keeps e.g. 10 mm / 0.5 mm at 20 voxels despite floating-point roundoff.
    margins = [math.ceil(margin_mm / s - 1e-9) for s in spacing]
    if box is None:
        return _bounding_box(mask, margins)
    found = _bounding_box(mask, (0, 0, 0))
    return tuple(  # type: ignore[return-value]
        slice(max(0, b.start + f.start - m), min(n, b.start + f.stop + m))
        for b, f, m, n in zip(box, found, margins, shape, strict=True)
    )
