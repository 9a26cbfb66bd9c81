"""Masses the filling leaves partly out (coarse grid): a tumour capping a lung's apex (the
mirror rule), a thick mass's hidden edge against the wall, spine or diaphragm (the rims), a
large mass's outer part where the chest wall curves away from it (the mass pockets), a large
round mass's part in a mediastinal dent or the liver dome (the mass balls) and a ground-glass
mass's part beyond the lung's envelope (the hazy masses)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from kdsb.preprocessing.lungs.filling import IN_PLANE_ONLY_MM, reach_wall
from kdsb.preprocessing.lungs.morphology import (
    ball,
    bounding_box,
    dilate_cross,
    enclosed,
    mirror_x,
    touched,
)
from kdsb.preprocessing.lungs.thresholds import (
    BONE_HU,
    GROUND_GLASS_MAX_HU,
    GROUND_GLASS_MIN_HU,
    MM3_PER_ML,
    fillable_tissue,
)

APEX_ZONE_MM = 60.0
APEX_CORE_MM = 6.0
MIN_SIDE_SHARE = 0.2  # of the lungs, on the lesser side of the body's centre: two lungs
MEDIASTINUM_SMOOTH = 3  # columns (coarse voxels) averaged in `mediastinum_x`'s profile
GAP_DEPTH = 0.5  # the gap between the lungs holds under this share of their fullest columns
APEX_CUT_FRACTION = 0.5  # of the widest slice's lung area: a top slice this full cuts the lungs
APEX_DEPTH_PERCENTILE = 5.0  # fills juxtapleural nodules and tumours up to about 14 mm radius
# (core radius, rim) in mm: added tissue that survives an opening with a ball of the core
# radius is a mass (the aorta's bulge is too, in part), and tissue within the rim of it is its
# hidden edge. The second pair reaches the medial part of a ~10 mm mass in a concave
# mediastinal dent, too thin for the first core (paravertebral, apical: 74-89 % kept without).
MASS_RIMS_MM = ((8.0, 12.0), (6.0, 6.0))
# Mass pockets (`mass_pockets`): cores (of the first rim pair's radius, `large_mass_cores`) of at
# least LARGE_MASS_ML are large masses, about 30 mm radius and up (the aorta's bulge makes cores
# of up to ~35 ml); their pockets lie within MASS_REACH_MM in-plane of the core, each voxel
# shallower under the skin than its nearest core voxel by OUTWARD_SLOPE per mm from it (towards
# the wall, not along the mediastinum or the liver) and within POCKET_DEPTH_MM in-plane of the
# hull's edge (a shell under the chest wall, not the spine or the mediastinum deep inside the
# hull).
LARGE_MASS_ML = 40.0
MASS_REACH_MM = 25.0
OUTWARD_SLOPE = 0.5
POCKET_DEPTH_MM = 15.0
# Mass balls (`mass_balls`): a large mass's core (as the pockets') whose surface facing the
# lung fits a ball of at most BALL_MAX_RADIUS_MM with an rms misfit of at most BALL_MISFIT_MM
# is that ball; tissue inside it BALL_SHRINK_MM from its edge and inside the lungs' hull joins
# the mask, at most BALL_ADDED_SHARE of the mass the mask holds. On the two 35 mm masses the
# rules above kept 84.1 and 88.7 % of (benchmarks/README.md, "Lung mask on real anatomy",
# "Thirty-fifth session"), the fits came out 33.9 and 35.6 mm with misfits of 4.1 and 4.0 mm
# (lobulated masses on a 3 mm grid), adding 29 and 34 % of the mass held.
BALL_MAX_RADIUS_MM = 45.0
BALL_MISFIT_MM = 6.0
BALL_SHRINK_MM = 3.0
BALL_ADDED_SHARE = 0.5
BALL_MIN_SURFACE = 50  # coarse voxels of the mass's surface facing the lung, for a fit
# The mass's deepest voxel lies at least this share of the ball's radius from its surface (the
# two 35 mm masses: 20.5 / 33.9 and 21.2 / 35.6 mm, 0.60; a 12–15 mm aorta's side fitting a ball
# of 28–40 mm: 0.3–0.5), and the ball's centre lies in the mass.
BALL_MIN_THICKNESS = 0.5
# Hazy masses (`hazy_masses`): ground glass that survives an opening with a ball of radius
# HAZY_CORE_MM is thick (a lesion, not the partial-volume shell where lung meets tissue); the
# mask must already hold HAZY_HELD_SHARE of it.
HAZY_CORE_MM = 5.0
HAZY_HELD_SHARE = 0.5


def apex_zone(lungs: np.ndarray, spacing: Sequence[float]) -> int:
    """The first slice of the apex rule's zone: `APEX_ZONE_MM` below the higher apex."""
    top = int(np.flatnonzero(lungs.any(axis=(1, 2)))[-1])
    return max(0, top - math.ceil(APEX_ZONE_MM / spacing[0]))


def apex_in_scan(lungs: np.ndarray) -> bool:
    """Whether the scan holds the lungs' apices: its top slice cuts them through less than
    `APEX_CUT_FRACTION` of their widest slice (a few voxels of apex may reach it; an abdominal
    scan's top slice cuts the lung bases near their widest)."""
    areas = np.count_nonzero(lungs, axis=(1, 2))
    return bool(areas[-1] < APEX_CUT_FRACTION * areas.max())


def symmetry_axis(
    lungs: np.ndarray,
    body_midline: float,
    cut_open: np.ndarray | None = None,
) -> float | None:
    """The lungs' own left-right mirror plane (x, voxel units): midway between their outermost
    voxels, which lie against the ribs on both sides; `body_midline` (the body's centre) where
    either side of it holds under `MIN_SIDE_SHARE` of `lungs` (non-empty): one lung (a
    pneumonectomy, a collapsed lung) has no mirror image of its own.

    Not the body's centre otherwise: where the field of view cuts the arms or the shoulders off
    on one side that moves by 5–10 mm, and the mirror image of one lung then lands twice as far
    out, in the other side's chest wall (seen on varied real bases; the apex rule then took in
    ~60 ml of muscle). None where the image's edge or field of view cuts a lung open
    (`cut_open`, `body.cut_open_lungs`) within a column of the lungs' outermost ones: those
    are the cut, not the ribs, and no mirror plane is known (one lung or two).
    """
    per_column = np.count_nonzero(lungs, axis=(0, 1))
    xs = np.flatnonzero(per_column)
    if cut_open is not None and cut_open.any():
        cut_columns = np.flatnonzero(cut_open.any(axis=(0, 1)))
        if cut_columns[0] <= xs[0] + 1 or cut_columns[-1] >= xs[-1] - 1:
            return None
    right = per_column[: math.ceil(body_midline)].sum()
    if min(right, per_column.sum() - right) < MIN_SIDE_SHARE * per_column.sum():
        return body_midline
    return (float(xs[0]) + float(xs[-1])) / 2.0


def mediastinum_x(lungs: np.ndarray) -> float | None:
    """The gap between the lungs (x, voxel units): the middle of the columns holding the least
    lung between the columns that leave a quarter of `lungs` on either side, in a profile
    smoothed over `MEDIASTINUM_SMOOTH` columns; None where that least is no gap (over
    `GAP_DEPTH` of the lesser of the highest columns on either side: one lung) or `lungs` is
    empty. A midline that a cut at the scan's edge leaves in place, unlike the body's centre or
    the lungs' outermost voxels."""
    per_column = np.count_nonzero(lungs, axis=(0, 1)).astype(np.float64)
    if per_column.sum() == 0:
        return None
    cumulative = np.cumsum(per_column) / per_column.sum()
    low, high = (int(i) for i in np.searchsorted(cumulative, (0.25, 0.75)))
    smooth = ndimage.uniform_filter1d(per_column, MEDIASTINUM_SMOOTH, mode="nearest")
    window = smooth[low : high + 1]
    least = np.flatnonzero(window == window.min()) + low
    first, last = int(least[0]), int(least[-1])
    peaks = smooth[: first + 1].max(), smooth[last:].max()
    if smooth[first] > GAP_DEPTH * min(peaks):
        return None
    return (first + last) / 2.0


def apex_completion(
    own: np.ndarray,
    other: np.ndarray,
    body: np.ndarray,
    depth: np.ndarray,
    coarse_hu: np.ndarray,
    axis: float,
    spacing: Sequence[float],
    zone_start: int,
) -> np.ndarray:
    """Tissue that caps one lung's apex where the other lung, mirrored, still has lung.

    A tumour filling the top of a lung leaves no concavity for a closing to fill: the lung just
    ends lower. The apices are nearly symmetric, so within `APEX_ZONE_MM` of the higher apex
    (from slice `zone_start` up, `apex_zone`), non-bone tissue inside the other lung mirrored
    across `axis` (`symmetry_axis`) that is thick (survives an opening with a `APEX_CORE_MM`
    ball: not the slivers a slightly rotated body leaves) and touches this lung is taken in.
    `depth` is the depth under the skin in mm (`depth_under_skin`, computed once for both
    sides). The arrays may be the top slices of the scan only, from one below the zone up: the
    rule looks no further.
    """
    zone = np.zeros_like(own)
    zone[zone_start:] = True
    candidates = zone & mirror_x(other, axis) & ~own & body & (coarse_hu < BONE_HU)
    if not candidates.any():
        return candidates
    if not (own & zone).any():
        return np.zeros_like(own)
    # Not the chest wall: no shallower under the skin than this lung's own apex.
    candidates &= depth >= np.percentile(depth[own & zone], APEX_DEPTH_PERCENTILE)
    if not candidates.any():
        return candidates
    box = bounding_box(candidates, (1, 1, 1))
    core = np.zeros_like(candidates)
    core[box] = ndimage.binary_opening(candidates[box], structure=ball(APEX_CORE_MM, spacing))
    labels, count = ndimage.label(candidates & dilate_cross(core, 2))
    touching = np.unique(labels[dilate_cross(own, 1) & (labels > 0)])
    return np.isin(labels, touching[touching > 0])


def depth_under_skin(
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
    _, ys, xs = bounding_box(body, (1, 1, 1))
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


def lesion_rim(
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
    tissue = fillable_tissue(coarse_hu)
    added = mask & ~lung_air & tissue
    if not added.any():
        return added
    widest = max(rim_mm for _, rim_mm in MASS_RIMS_MM)
    box = bounding_box(added, (math.ceil(widest / min(spacing)) + 1,) * 3)
    near = np.zeros(added[box].shape, dtype=bool)
    for core_mm, rim_mm in MASS_RIMS_MM:
        masses = ndimage.binary_opening(added[box], structure=ball(core_mm, spacing))
        if masses.any():
            near |= ndimage.distance_transform_edt(~masses, sampling=spacing) <= rim_mm
    if not near.any():
        return np.zeros_like(mask)
    rim = np.zeros_like(mask)
    rim[box] = near & body[box] & tissue[box] & ~rejected_air[box]
    return rim


def large_mass_cores(
    mask: np.ndarray, lung_air: np.ndarray, coarse_hu: np.ndarray, spacing: Sequence[float]
) -> list[np.ndarray]:
    """The large masses of the mask: components of the tissue it holds beyond the lungs' air
    (what the fillings, the apex rule and the rims took in) that survive an opening with the
    first `MASS_RIMS_MM` core ball and hold at least `LARGE_MASS_ML`."""
    tissue = fillable_tissue(coarse_hu)
    added = mask & ~lung_air & tissue
    if not added.any():
        return []
    box = bounding_box(added, (1, 1, 1))
    voxel_ml = math.prod(spacing) / MM3_PER_ML
    pieces, _ = ndimage.label(added[box])
    if np.bincount(pieces.ravel())[1:].max() * voxel_ml < LARGE_MASS_ML:
        return []  # a core lies within one piece: none can be large (most healthy scans)
    cores = np.zeros_like(added)
    cores[box] = ndimage.binary_opening(added[box], structure=ball(MASS_RIMS_MM[0][0], spacing))
    labels, count = ndimage.label(cores)
    ml = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml
    return [labels == index for index in range(1, count + 1) if ml[index] >= LARGE_MASS_ML]


def mass_pockets(
    mask: np.ndarray,
    lung_air: np.ndarray,
    hulls: np.ndarray,
    body: np.ndarray,
    rejected_air: np.ndarray,
    coarse_hu: np.ndarray,
    spacing: Sequence[float],
    large: list[np.ndarray] | None = None,
) -> np.ndarray:
    """The outer part of a large mass that fills a lung out to where the chest wall curves away
    (a costophrenic recess, the anterior junction behind the sternum), and its reach to the wall.

    Such a mass (35 mm radius) leaves the filling a dent too wide for the envelope's ball, a
    first-pass pocket too large or not enclosed (it meets the diaphragm's or the mediastinum's
    tissue), and an outer third 13–21 mm from its core, beyond the rims: the mask's boundary runs
    through the mass, concave, inside the lungs' slice-wise convex hull (`hulls`). So, for each
    large mass core (`large_mass_cores`, of the mask with its rims): non-bone tissue (not gas)
    inside the hull and outside the mask, within `MASS_REACH_MM` in-plane of the core and lying
    outwards of it (`OUTWARD_SLOPE`), within `POCKET_DEPTH_MM` in-plane of the hull's edge, whose
    components touch both the mask and that edge (the chest wall; the liver under a dome, the
    heart beside a lung and the spine lie deeper, inside the hull) is a pocket; each pocket then
    reaches out to the wall as a juxtapleural nodule does (`filling.reach_wall`). The edge is
    touched in 3D (a 6-neighbour outside the hull, also in the next slice where the hull
    shrinks): the constants were chosen with it so. `large`: the cores if found already.
    """
    large = large_mass_cores(mask, lung_air, coarse_hu, spacing) if large is None else large
    if not large:
        return np.zeros_like(mask)
    tissue = fillable_tissue(coarse_hu)
    in_plane = (IN_PLANE_ONLY_MM, *spacing[1:])
    under_edge = ndimage.distance_transform_edt(hulls, sampling=in_plane) <= POCKET_DEPTH_MM
    candidates = hulls & under_edge & ~mask & body & tissue & ~rejected_air
    edge = dilate_cross(~hulls & body, 1)
    beside_mask = dilate_cross(mask, 1)
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    filled = mask.copy()
    for core in large:
        reach, nearest = ndimage.distance_transform_edt(~core, sampling=in_plane,
                                                        return_indices=True)
        near = (candidates & (reach <= MASS_REACH_MM)
                & (depth[tuple(nearest)] - depth >= OUTWARD_SLOPE * reach))
        pieces, _ = ndimage.label(near)
        pocket = np.isin(pieces, np.intersect1d(pieces[edge & near], pieces[beside_mask & near]))
        if pocket.any():
            filled |= pocket
            reach_wall(pocket, lung_air, body, filled, spacing)
    return filled & ~mask & tissue & ~rejected_air


def fit_ball(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The ball whose sphere fits `points` (n, 3), mm, best: (centre (3,), radius, rms misfit
    of the points' distances from the centre to the radius), by the algebraic least-squares
    fit |p|² = 2 c·p + (r² − |c|²), linear in c and r² − |c|²."""
    design = np.c_[2.0 * points, np.ones(len(points))]
    solution, *_ = np.linalg.lstsq(design, (points**2).sum(axis=1), rcond=None)
    centre = solution[:3]
    radius = math.sqrt(max(solution[3] + centre @ centre, 0.0))
    misfit = float(np.sqrt(np.mean((np.linalg.norm(points - centre, axis=1) - radius) ** 2)))
    return centre, radius, misfit


def mass_balls(
    mask: np.ndarray,
    lung_air: np.ndarray,
    hulls: np.ndarray,
    body: np.ndarray,
    rejected_air: np.ndarray,
    coarse_hu: np.ndarray,
    spacing: Sequence[float],
    large: list[np.ndarray] | None = None,
) -> np.ndarray:
    """The part of a large round mass that lies beyond every rule above: in a concave
    mediastinal dent, or down in the liver dome under the lung (coarse grid, bool).

    Such a mass (35 mm radius) meets tissue of its own density over a sixth of its surface,
    far from where the lung shows its edge, and neither the rims (12 mm from its core) nor the
    pockets (outwards of the core, to the chest wall) reach that far. Its surface facing the
    lung is a cap of a sphere, and so is the rest of it: for each large mass core
    (`large_mass_cores`), the added tissue within the first rim of it (`MASS_RIMS_MM`) is the
    mass; its voxels beside lung air are fitted a ball (`fit_ball`), and where that ball is a
    mass's (radius ≤ `BALL_MAX_RADIUS_MM`, misfit ≤ `BALL_MISFIT_MM`, from at least
    `BALL_MIN_SURFACE` voxels, its centre in the mass, the mass at least `BALL_MIN_THICKNESS`
    of its radius thick), non-bone tissue inside it, `BALL_SHRINK_MM` from its edge,
    inside the lungs' slice-wise hull (not the chest wall a juxtapleural mass flattens against)
    and the body, not gas, joins the mask where it touches it, unless it would add more than
    `BALL_ADDED_SHARE` of the mass (a shape the ball does not describe). A tube's side (the
    aortic arch) may fit a ball, but not from its inside, nor thick enough; healthy lungs have
    no core this large. `large`: the cores if found already.
    """
    large = large_mass_cores(mask, lung_air, coarse_hu, spacing) if large is None else large
    result = np.zeros_like(mask)
    if not large:
        return result
    tissue = fillable_tissue(coarse_hu)
    added = mask & ~lung_air & tissue
    beside_lung = dilate_cross(lung_air, 1)
    candidates = hulls & body & tissue & ~rejected_air & ~mask
    size = np.asarray(spacing, dtype=np.float64)
    for core in large:
        mass = added & (ndimage.distance_transform_edt(~core, sampling=spacing)
                        <= MASS_RIMS_MM[0][1])
        surface = np.argwhere(mass & beside_lung) * size
        if len(surface) < BALL_MIN_SURFACE:
            continue
        centre, radius, misfit = fit_ball(surface)
        if radius > BALL_MAX_RADIUS_MM or misfit > BALL_MISFIT_MM:
            continue
        # A curved tube's side (the aortic arch, a dilated aorta) fits a ball too, misfit about
        # 1 mm (found in review), but its centre lies outside the tube, and the tube is thin
        # for the ball: a mass holds the ball's centre, and is thick.
        middle = tuple(int(i) for i in np.round(centre / size))
        inside_mass = all(0 <= i < n for i, n in zip(middle, mask.shape, strict=True)) \
            and bool(mass[middle])
        thickness = float(ndimage.distance_transform_edt(mass, sampling=spacing).max())
        if not inside_mass or thickness < BALL_MIN_THICKNESS * radius:
            continue
        reach = radius - BALL_SHRINK_MM
        low = np.maximum(np.floor((centre - reach) / size).astype(int), 0)
        high = np.minimum(np.ceil((centre + reach) / size).astype(int) + 1, mask.shape)
        if np.any(high <= low):
            continue
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        axes = np.ogrid[box]
        inside = sum(((axis * s - c) ** 2 for axis, s, c in zip(axes, size, centre,
                                                                  strict=True))) <= reach**2
        ball = np.zeros_like(mask)
        ball[box] = inside & candidates[box]
        ball = touched(ndimage.label(ball)[0], dilate_cross(mask, 1))
        if np.count_nonzero(ball) <= BALL_ADDED_SHARE * np.count_nonzero(mass):
            result |= ball
    return result


def hazy_masses(
    mask: np.ndarray, body: np.ndarray, coarse_hu: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The rest of a ground-glass mass the mask holds most of: thick ground glass of which the
    mask holds at least `HAZY_HELD_SHARE`, the voxels it does not hold yet (coarse grid, bool;
    `spacing` in mm).

    A ground-glass mass that bulges into the mediastinum (at the anterior junction) past the
    envelope's ball keeps there a part too far for the rims (more than their 12 mm from its
    core) and inwards of the core, where the pockets (which lie outwards) do not look: a
    35 mm mass at about -370 HU kept 82 %. Ground glass (`GROUND_GLASS_MIN_HU` to
    `GROUND_GLASS_MAX_HU` on the coarse grid, inside the body) that survives an opening with a
    ball of radius `HAZY_CORE_MM` is thick; each such component the mask holds at least
    `HAZY_HELD_SHARE` of is taken in whole, with what it encloses. Elsewhere in the chest only
    the lungs' own denser parts (vessel-rich or dependent lung, block-averaged) are that hazy
    and that thick: the mask holds them, and a coarse voxel or two of their edge at the pleura
    joins it (on about a third of the varied real bases; those boundary blocks keep only their
    lung and ground glass). Gas mixed with stool in the bowel can be too; the share keeps it
    out where the mask holds little of it.
    """
    hazy = (coarse_hu >= GROUND_GLASS_MIN_HU) & (coarse_hu < GROUND_GLASS_MAX_HU) & body
    result = np.zeros_like(mask)
    if not hazy.any():
        return result
    box = bounding_box(hazy, (1, 1, 1))
    core = ball(HAZY_CORE_MM, spacing)
    eroded = ndimage.binary_erosion(hazy[box], structure=core)
    if not eroded.any():
        return result  # no thick ground glass: the opening is empty
    labels, count = ndimage.label(ndimage.binary_dilation(eroded, structure=core))
    size = np.bincount(labels.ravel(), minlength=count + 1)
    held = np.bincount(labels[mask[box]], minlength=count + 1)
    taken = held >= HAZY_HELD_SHARE * size
    taken[0] = False
    new = taken[labels] & ~mask[box]
    if new.any():
        # What the joined ground glass encloses with the mask (a part-solid core, a vessel:
        # not ground glass itself) joins too, never bone.
        holes, _ = ndimage.label(enclosed(~(mask[box] | new)))
        new |= touched(holes, dilate_cross(new, 1)) & (coarse_hu[box] <= BONE_HU)
    result[box] = new
    return result
