"""`segment_lungs`: the rules of the package in order; the lung mask on its box and the
lungs' bounding box."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from kdsb.errors import LungMaskError
from kdsb.preprocessing.lungs.airways import find_airway, trachea_x
from kdsb.preprocessing.lungs.body import cut_open_lungs, find_body
from kdsb.preprocessing.lungs.filling import fill_side, junction_rows, slice_hulls
from kdsb.preprocessing.lungs.masses import (
    apex_completion,
    apex_in_scan,
    apex_zone,
    depth_under_skin,
    hazy_masses,
    large_mass_cores,
    lesion_rim,
    mass_balls,
    mass_pockets,
    mediastinum_x,
    symmetry_axis,
)
from kdsb.preprocessing.lungs.morphology import (
    block_mean,
    bounding_box,
    coarse_factors,
    dilate_cross,
    erode_cross,
    mirror_x,
    touched,
    upsample,
)
from kdsb.preprocessing.lungs.refine import (
    FULL_ALWAYS,
    FULL_IF_AIR,
    FULL_IF_TISSUE,
    FULL_NEVER,
    full_resolution_mask,
)
from kdsb.preprocessing.lungs.selection import rejected_gas, select_lungs
from kdsb.preprocessing.lungs.thresholds import AIR_THRESHOLD_HU, MM3_PER_ML

logger = logging.getLogger(__name__)


MIN_LUNG_LITRES = 0.5
MAX_LUNG_LITRES = 10.0
ML_PER_LITRE = 1000.0
# A scan shorter than this head to foot cannot hold whole lungs: named when no lungs are found.
SHORT_SCAN_MM = 150.0


def segment_lungs(
    hu: np.ndarray,
    spacing: Sequence[float],
    *,
    patient_id: str | None = None,
    litres: tuple[float, float] = (MIN_LUNG_LITRES, MAX_LUNG_LITRES),
) -> np.ndarray:
    """Segment both lungs in a CT volume.

    The mask holds lung parenchyma with its vessels and whatever grows in the lungs: nodules
    and tumours up to about 35 mm radius, solid, part-solid or ground-glass, also where they
    touch the chest wall, mediastinum, diaphragm or apex; it excludes air outside the body,
    the trachea and main bronchi (where found) and bowel gas. See the package docstring
    (`kdsb.preprocessing.lungs`) for the method.

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

    Args and Raises: as `segment_lungs`; `threads` run the block means, the closings'
    distance transforms and (two or more) the two sides' fillings and the full-resolution
    pass's z-slabs side by side (the same mask whatever the number).

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
    extent_mm = hu.shape[0] * spacing[0]  # head to foot, named when the lungs are too small
    factors = coarse_factors(spacing)
    coarse_spacing = tuple(s * f for s, f in zip(spacing, factors, strict=True))
    coarse_hu = block_mean(hu, factors, threads)

    air = coarse_hu < AIR_THRESHOLD_HU
    body, inside_body = find_body(air)
    interior_air = air & inside_body
    if not interior_air.any():
        raise _plausibility_error(patient, litres, "no air-filled region inside the body",
                                  extent_mm)

    voxel_ml = math.prod(coarse_spacing) / MM3_PER_ML
    cut_open = cut_open_lungs(air, body, inside_body, coarse_hu, voxel_ml)
    midline = None
    if cut_open.any():
        # The scan's edge cut a lung open: its pockets join the body, and the body's centre,
        # cut too, gives way to the gap between the lungs (where there are two).
        inside_body |= cut_open
        interior_air |= cut_open
        midline = mediastinum_x(select_lungs(interior_air, coarse_hu, voxel_ml))
    if midline is None:
        body_profile = body.sum(axis=(0, 1))
        midline = float(np.dot(np.arange(body_profile.size), body_profile) / body_profile.sum())

    airway = find_airway(coarse_hu, interior_air, coarse_spacing, midline) & interior_air
    lung_air = select_lungs(interior_air & ~airway, coarse_hu, voxel_ml)
    if not lung_air.any():
        raise _plausibility_error(patient, litres, "no air-filled region large enough to be lung",
                                  extent_mm)

    # Each side is closed and filled on its own so the two lungs never merge across the
    # mediastinum; a lung crossing the midline is simply handled in two parts. The midline is
    # the lungs' own (the body's centre moves where the field of view cuts off an arm), or,
    # where a cut lung's outermost column is the cut (no mirror plane), the trachea's.
    mirror = symmetry_axis(lung_air, midline, cut_open)
    trachea = trachea_x(airway, coarse_spacing) if mirror is None else None
    axis = mirror if mirror is not None else (trachea if trachea is not None else midline)
    split = math.ceil(axis)
    hulls = slice_hulls(lung_air)
    junction = junction_rows(lung_air, split)
    halves = (np.s_[:, :, :split], np.s_[:, :, split:])
    if threads >= 2:
        # The two sides side by side, each on half the threads (scipy's labelling, erosions
        # and the distance transforms release the GIL); the same arrays either way.
        with ThreadPoolExecutor(2) as pool:
            sides = list(pool.map(
                lambda side: fill_side(coarse_hu, lung_air, hulls, inside_body, side,
                                       coarse_spacing, max(1, threads // 2), junction),
                halves,
            ))
    else:
        sides = [fill_side(coarse_hu, lung_air, hulls, inside_body, side, coarse_spacing, 1,
                           junction)
                 for side in halves]
    coarse_mask = sides[0] | sides[1]
    if mirror is not None and sides[0].any() and sides[1].any() and apex_in_scan(coarse_mask):
        # The apex rule needs the slices from one below its zone up, and the depth under the
        # skin of the lungs there and of their mirror images (its candidates).
        zone_start = apex_zone(coarse_mask, coarse_spacing)
        low = max(0, zone_start - 1)
        needed = coarse_mask | mirror_x(coarse_mask, axis)
        needed[:zone_start] = False
        depth = depth_under_skin(inside_body, coarse_spacing, needed, low)
        top = np.s_[low:]
        for own, other in (sides, sides[::-1]):
            coarse_mask[top] |= apex_completion(
                own[top], other[top], inside_body[top], depth, coarse_hu[top], axis,
                coarse_spacing, zone_start - low,
            )

    rejected = interior_air & ~lung_air
    gas = rejected_gas(rejected, coarse_hu)
    rejected_air = dilate_cross(gas, 1)
    coarse_mask |= lesion_rim(coarse_mask, lung_air, inside_body, rejected_air, coarse_hu,
                              coarse_spacing)
    # The large mass cores (an opening with an 8 mm ball: ~40 ms on a real CT, whose aorta
    # makes a large added piece) are found once, and again only where pockets changed the mask.
    large = large_mass_cores(coarse_mask, lung_air, coarse_hu, coarse_spacing)
    pockets = mass_pockets(coarse_mask, lung_air, hulls, inside_body, rejected_air, coarse_hu,
                           coarse_spacing, large)
    if pockets.any():
        coarse_mask |= pockets
        large = large_mass_cores(coarse_mask, lung_air, coarse_hu, coarse_spacing)
    coarse_mask |= mass_balls(coarse_mask, lung_air, hulls, inside_body, rejected_air, coarse_hu,
                              coarse_spacing, large)
    hazy_added = hazy_masses(coarse_mask, inside_body, coarse_hu, coarse_spacing)
    coarse_mask |= hazy_added
    # Ground glass the lung selection left out joins the lungs it touches.
    left_out = touched(ndimage.label(rejected & ~gas)[0], dilate_cross(coarse_mask, 1))
    coarse_mask |= left_out
    inner = erode_cross(coarse_mask, outside=True)
    # A hazy mass's blocks on the mask's boundary keep only their lung and ground glass, not
    # whole blocks of the mediastinal fat beside it: they are not `added`, unless they are
    # also left-out ground glass or lie beside gas (then they keep their tissue, as added
    # blocks there do).
    added = coarse_mask & ~lung_air & ~(hazy_added & ~left_out & ~rejected_air)
    outer = dilate_cross(coarse_mask, 1) & ~coarse_mask & ~air
    code = np.full(coarse_mask.shape, FULL_NEVER, dtype=np.uint8)
    code[(coarse_mask & ~inner) | outer] = FULL_IF_AIR
    code[inner | added] = FULL_ALWAYS
    code[added & rejected_air] = FULL_IF_TISSUE
    code[outer & rejected_air] = FULL_NEVER

    # Full-resolution work only inside the bounding box of the coarse result.
    coarse_box = bounding_box(code, (0, 0, 0))
    full_box = tuple(
        slice(b.start * f, min(n, b.stop * f))
        for b, f, n in zip(coarse_box, factors, hu.shape, strict=True)
    )
    box_shape = tuple(b.stop - b.start for b in full_box)
    kept = full_resolution_mask(
        upsample(code[coarse_box], factors, box_shape),
        upsample(added[coarse_box], factors, box_shape),
        hu[full_box],
        spacing,
        threads,
    )

    volume = int(np.count_nonzero(kept)) * math.prod(spacing) / MM3_PER_ML / ML_PER_LITRE
    logger.debug("%s: lung volume %.2f L", patient, volume)
    if not litres[0] <= volume <= litres[1]:
        raise _plausibility_error(patient, litres, f"{volume:.2f} L",
                                  extent_mm if volume < litres[0] else None)
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
    margin_mm: float,
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
        return bounding_box(mask, margins)
    found = bounding_box(mask, (0, 0, 0))
    return tuple(  # type: ignore[return-value]
        slice(max(0, b.start + f.start - m), min(n, b.start + f.stop + m))
        for b, f, m, n in zip(box, found, margins, shape, strict=True)
    )


def _plausibility_error(
    patient: str, litres: tuple[float, float], received: str, extent_mm: float | None = None
) -> LungMaskError:
    """The error for no or implausible lungs; a scan of `extent_mm` head to foot under
    `SHORT_SCAN_MM` is named as the likely cause (found by a user's trial: a 38 mm upper-abdomen
    series failed with "received 0.02 L" alone)."""
    hint = (f" (the scan covers only {extent_mm:.0f} mm head to foot, where adult lungs span "
            f"about 200–300 mm: is it a chest CT?)"
            if extent_mm is not None and extent_mm < SHORT_SCAN_MM else "")
    return LungMaskError(
        f"{patient}: expected lungs of {litres[0]:g}–{litres[1]:g} L, received {received}{hint}"
    )
