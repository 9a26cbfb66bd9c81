"""Filling one lung on the coarse grid: closings with a ball (`CLOSING_RADIUS_MM`, which sees
lung beyond the split where the two lungs meet: `junction_rows`) and an envelope
(`ENVELOPE_RADIUS_MM`), tissue enclosed between the lung and the chest wall inside the lungs'
slice-wise convex hull, and a juxtapleural nodule's reach out to the wall."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from kdsb.preprocessing.lungs.morphology import (
    IN_PLANE,
    ball,
    bounding_box,
    close_balls,
    enclosed,
    fill_holes_3d,
)
from kdsb.preprocessing.lungs.thresholds import MM3_PER_ML, fillable_tissue

CLOSING_RADIUS_MM = 15.0
# Where the two lungs come closer than this fraction of the lungs' span (right to left) across
# the split between the sides, they meet (the anterior junction, or the posterior one behind
# the oesophagus: about 20 mm in an adult).
JUNCTION_GAP_FRACTION = 0.07
ENVELOPE_RADIUS_MM = 38.0
MAX_ENCLOSED_ML = 150.0  # enclosed tissue filled into a lung: up to a 33 mm radius tumour
NODULE_CORE_RADIUS_MM = 5.0  # solid tissue this thick is a nodule (vessels at the wall are thinner)
WALL_REACH_MM = 10.0  # in-plane reach from a juxtapleural nodule out to the chest wall
WALL_DEPTH_TOLERANCE = 1.0  # pixels: wall depth discretisation (a diagonal staircase ~0.7 px)
IN_PLANE_ONLY_MM = 1e6  # a z spacing that keeps distances within each axial slice
HULL_DIRECTIONS = 128  # half-planes that bound each slice's convex hull
HULL_TOLERANCE = 1e-3  # pixels (float32 roundoff): keeps the points that span the hull inside it
HULL_PIXEL_REACH = 0.25  # pixels: how far the hull reaches beyond the outermost pixel centres


def fill_side(
    coarse_hu: np.ndarray,
    lung_air: np.ndarray,
    hulls: np.ndarray,
    body: np.ndarray,
    side: tuple[slice, ...],
    spacing: Sequence[float],
    threads: int = 1,
    junction: np.ndarray | None = None,
) -> np.ndarray:
    """The filled lung mask of one side (coarse grid, all arrays full size).

    Two fillings, both blind to the other side so the lungs never merge across the mediastinum:

    - closing with a `CLOSING_RADIUS_MM` ball, then 3D hole filling: vessels, airways inside the
      lung and nodules up to about that radius. Beyond the split the ball sees empty space,
      except where the lungs meet (`junction`, (z, y) rows: `junction_rows`): there the lung
      goes on beyond it, so a nodule lying across the junction is closed in from both sides
      rather than cut at the split;
    - tissue inside the slice-wise convex hull of the lungs that is enclosed by this lung and the
      chest wall (it reaches neither the midline nor the scan's ends): nodules and tumours
      that are cut flat by the chest wall, whose bite a ball from the wall side would enter;
      such a nodule then reaches out to the chest wall (`reach_wall`).
    """
    part = np.zeros_like(lung_air)
    part[side] = lung_air[side]
    filled = np.zeros_like(lung_air)
    if not part.any():
        return filled
    # The box reaches past the midline into empty space, so the closing erodes there (except
    # on the junction's rows, below); at the scan's own borders it stops, so a lung cut by the
    # first or last slice is not eroded.
    box = bounding_box(part, (1, 1, 1))
    beyond = _beyond_the_split(side, part.shape[2]) if junction is not None else None
    walled = None
    if beyond is not None and junction[box[0], box[1]].any():
        # The box reaches the split (a lung a gap short of it closes up to it), and the
        # junction's rows go on beyond it.
        columns = slice(min(box[2].start, beyond), max(box[2].stop, beyond + 1))
        box = (box[0], box[1], columns)
        walled = part[box].copy()
        walled[:, :, beyond - columns.start] = junction[box[0], box[1]]
    if walled is None:
        closed, enveloped = close_balls(part[box], (CLOSING_RADIUS_MM, ENVELOPE_RADIUS_MM),
                                        spacing, threads)
    else:  # the envelope stays blind beyond the split: its ball would bridge the mediastinum
        (closed,) = close_balls(walled, (CLOSING_RADIUS_MM,), spacing, threads)
        (enveloped,) = close_balls(part[box], (ENVELOPE_RADIUS_MM,), spacing, threads)
    filled[box] = fill_holes_3d(closed)  # what lies beyond the split is dropped below
    envelope = np.zeros_like(lung_air)
    envelope[box] = fill_holes_3d(enveloped)
    half = filled[side]
    # Pockets are looked for after the closing has filled the vessels: a nodule that a vessel
    # touches would otherwise reach the mediastinum through the vessel tree.
    pockets = enclosed(hulls[side] & ~half)
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
        near = bounding_box(pockets, (1, 1, 1))
        solid = np.zeros_like(pockets)
        solid[near] = ndimage.binary_opening(
            half[near] & ~lung_air[side][near], structure=ball(NODULE_CORE_RADIUS_MM, spacing)
        )
        nodules, _ = ndimage.label(solid | pockets)
        juxtapleural = np.intersect1d(nodules[solid], nodules[pockets])
        for index in juxtapleural:
            reach_wall(nodules == index, lung_air[side], body[side], half, spacing)
    result = np.zeros_like(lung_air)
    result[side] = half
    # Air the lung selection rejected (bowel gas, airways) is never taken in, nor bone.
    tissue = fillable_tissue(coarse_hu)
    return result | (envelope & body & tissue)


def junction_rows(lung_air: np.ndarray, split: int) -> np.ndarray:
    """The (z, y) rows where the lungs on either side of column `split` come within
    `JUNCTION_GAP_FRACTION` of the lungs' span (right to left, all slices) of each other, or one
    lung crosses it, bool. Both lengths are along x, so the voxel size drops out."""
    right, left = lung_air[:, :, :split], lung_air[:, :, split:]
    both = right.any(axis=2) & left.any(axis=2)
    if not both.any():
        return both
    last_right = split - 1 - np.argmax(right[:, :, ::-1], axis=2)
    first_left = split + np.argmax(left, axis=2)
    columns = np.flatnonzero(lung_air.any(axis=(0, 1)))
    span = columns[-1] - columns[0] + 1
    gap = first_left - last_right - 1
    return both & (gap <= JUNCTION_GAP_FRACTION * span)


def _beyond_the_split(side: tuple[slice, ...], width: int) -> int | None:
    """The column just beyond a side's split (the other side's column next to it), or None for
    a side that is the whole width."""
    x = side[2]
    if x.stop is not None and x.stop < width:  # the right side (small x)
        return x.stop
    if x.start:  # the left side
        return x.start - 1
    return None


def slice_hulls(mask: np.ndarray) -> np.ndarray:
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
    box = bounding_box(mask, (0, 0, 0))
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


def reach_wall(
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
