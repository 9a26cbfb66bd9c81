"""The body on the coarse grid and what lies inside it, also where the scan's edge or its
field of view cuts the chest open."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from kdsb.hu import AIR_HU
from kdsb.preprocessing.lungs.filling import slice_hulls
from kdsb.preprocessing.lungs.morphology import (
    IN_PLANE,
    fill_holes_2d,
    largest_component,
    reaching_border_2d,
)
from kdsb.preprocessing.lungs.selection import select_lungs
from kdsb.preprocessing.lungs.thresholds import AIRWAY_THRESHOLD_HU

MIN_OVERLAP = 0.5  # share of a cut-open pocket that lies on the lung of the next slice
MIN_PADDING_SHARE = 0.02  # of a slice: padding this large marks its field of view


def find_body(air: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body and its inside (coarse grid, (z, y, x), bool each).

    The body is the largest component of what is not `air`; its inside is the body with its
    holes filled slice by slice (the lungs, airways and bowel gas), so air outside it (also air
    split off by the table, or outside a padded circular field of view) is left out.
    """
    body = largest_component(~air)
    return body, fill_holes_2d(body)


def cut_open_lungs(
    air: np.ndarray,
    body: np.ndarray,
    inside: np.ndarray,
    coarse_hu: np.ndarray,
    voxel_ml: float,
) -> np.ndarray:
    """Lung that the scan's edge or field of view cuts open in some axial slices, bool.

    Where the edge of the image (a scan cropped through a lung) or of a circular field of view
    (its outside reads as air) cuts through the chest wall, the lung behind it is open to the
    air outside in that slice, and the body's slice-wise hole filling leaves it out. Such a
    pocket is air outside the body's `inside` within `bridged_cut` (which parts it from the air
    outside the body); it is parenchyma (median HU above `AIRWAY_THRESHOLD_HU`, as
    `selection.select_lungs` asks of lung), and at least `MIN_OVERLAP` of it lies on the lung
    of the slice above or below (a lung's cross-section changes little from one coarse slice to
    the next). Slices are taken in turn upwards, then downwards, from the lungs where the cut
    spares them (`select_lungs` of the air inside the body; `voxel_ml` is a voxel's volume),
    through the cut slices and the lung the cut parted from them, so a lung cut open over many
    slices is followed through them. Air in the body's concavities (between the arms and the
    chest, under the back) lies on no lung, so a scan the edge does not cut gains nothing
    (nor is anything more computed than one test where no air outside the body lies on air
    inside it in the next slice). A lung cut open in every slice is not found.
    """
    candidates = air & ~inside
    interior_air = air & inside
    # Cheap first: a pocket lies on the lung of the next slice, so some candidate does.
    beside = np.zeros_like(candidates)
    beside[1:] = interior_air[:-1]
    beside[:-1] |= interior_air[1:]
    if not (candidates & beside).any():
        return np.zeros_like(candidates)
    candidates &= bridged_cut(coarse_hu, body)
    # One label per piece of air of each slice (4-connected in-plane, never across slices),
    # inside the body or a candidate: the sweep passes through slices the cut spares.
    labels, count = ndimage.label(candidates | interior_air, structure=IN_PLANE)
    area = np.bincount(labels.ravel(), minlength=count + 1)
    dark = np.bincount(labels[coarse_hu < AIRWAY_THRESHOLD_HU], minlength=count + 1)
    parenchyma = 2 * dark <= area
    parenchyma[0] = False
    if not parenchyma[np.unique(labels[candidates])].any():
        return np.zeros_like(candidates)
    lungs = _follow_pockets(labels, parenchyma, area,
                            select_lungs(interior_air, coarse_hu, voxel_ml))
    return lungs & candidates


def _follow_pockets(
    labels: np.ndarray, eligible: np.ndarray, area: np.ndarray, lungs: np.ndarray
) -> np.ndarray:
    """`lungs` (z, y, x, bool) grown slice by slice, upwards then downwards, by the `eligible`
    pieces of `labels` (one label per in-plane piece; `area` per label) of which at least
    `MIN_OVERLAP` lies on the lung of the slice before."""
    lungs = lungs.copy()
    depth = lungs.shape[0]
    for order in (range(1, depth), range(depth - 2, -1, -1)):
        for z in order:
            before = z - 1 if order.step == 1 else z + 1
            pieces = labels[z]
            if not pieces.any() or not lungs[before].any():
                continue
            on_lung = np.bincount(pieces[lungs[before]], minlength=area.size)
            keep = eligible & (on_lung >= MIN_OVERLAP * area)
            keep[0] = False
            lungs[z] |= keep[pieces]
    return lungs


def bridged_cut(coarse_hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Where a lung the scan's edge cut open may lie, apart from the air outside the body
    (coarse grid, (z, y, x), bool), slice by slice.

    In a slice that marks the outside of its field of view (padding, which reading sets to
    exactly `AIR_HU`, reaching the slice's border over at least `MIN_PADDING_SHARE` of it): the
    field of view less its edge (the coarse voxels beside the padding, which mix it with the
    body), so only that edge of a lung is lost. Elsewhere (a scan cropped through a lung, or a
    field of view read as plain air): the body's convex hull, whose chord across the cut leaves
    out the lung beyond it (up to ~2 cm deep where a circle cuts a lung along 12 cm).
    """
    region = slice_hulls(body)
    padding = coarse_hu == AIR_HU
    if not padding.any():
        return region
    padding = reaching_border_2d(padding)
    marked = np.count_nonzero(padding, axis=(1, 2)) >= MIN_PADDING_SHARE * padding[0].size
    if not marked.any():
        return region
    field = ~padding[marked]
    # The edge: beside the padding in-plane (4-neighbours), as shifted views.
    edge = padding[marked]
    field[:, 1:] &= ~edge[:, :-1]
    field[:, :-1] &= ~edge[:, 1:]
    field[:, :, 1:] &= ~edge[:, :, :-1]
    field[:, :, :-1] &= ~edge[:, :, 1:]
    region[marked] = field
    return region
