"""The base of a nodule too small for the fringe: a solid core that one erosion removes whole.

A nodule of 3 mm radius against the chest wall is two to four source voxels across. Its core
(tissue the filling took in, or tissue protruding into the lung) has no voxel that the fringe's
6-neighbour erosion keeps (`refine.FRINGE_VOXELS` grows from the eroded core), so the voxels of
its base in the mask's boundary blocks, between the core and the wall, were lost: 2-3 of such a
nodule's 18-26 voxels (`benchmarks/lung_mask.py`, thirty-third to thirty-fifth sessions).
Growing every core by a voxel keeps them but takes in the wall beside every vessel stub (+2.7-3.1
% of every mask); what tells a nodule's core from a vessel's is its shape: a nodule's core is a
compact blob, a vessel's a strand (under 4 mm across) or a sprawling piece that fills little of
its box. So only whole core components that the erosion removes (no voxel of theirs within one
voxel of an eroded one, none touching one that is) and that are compact (`SMALL_CORE_*`) give
their 6-neighbours of boundary tissue to the mask. (A one-voxel sheet folded into a small box
can pass for compact.)

Components are found among those thin core voxels only, in flat-index space (the thin voxels are
a few per cent of the box): labelling the whole box with `ndimage.label` cost 40-90 ms a scan,
this ~10 ms. The union-find is written here (`_components`) because `scipy.sparse.csgraph`, which
has one, costs ~80 ms of imports in every fresh process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SMALL_CORE_MAX_MM3 = 300.0  # a ball of ~4 mm radius: larger nodules' cores survive the erosion
SMALL_CORE_MIN_ACROSS_MM = 4.0  # and at least 3 voxels, along each axis: thinner is a vessel
SMALL_CORE_MAX_ACROSS_MM = 10.0  # along each axis (also what a slab's halo must hold)
SMALL_CORE_MIN_FILL = 0.4  # of its bounding box (a ball fills 0.52; a sprawling piece less)
SMALL_CORE_MIN_VOXELS = 3  # along each axis: a thinner core is no blob at any spacing


def small_core_slices(spacing: Sequence[float]) -> int:
    """The most slices a small core spans: the most whose length along z (slices × spacing,
    mm, as `small_core_bases` measures it) is within `SMALL_CORE_MAX_ACROSS_MM`."""
    slices = int(SMALL_CORE_MAX_ACROSS_MM // spacing[0])
    while (slices + 1) * spacing[0] <= SMALL_CORE_MAX_ACROSS_MM:
        slices += 1
    while slices * spacing[0] > SMALL_CORE_MAX_ACROSS_MM:
        slices -= 1
    return slices


def small_core_bases(
    thin_cores: np.ndarray,
    kept_cores: np.ndarray,
    candidates: np.ndarray,
    spacing: Sequence[float],
) -> np.ndarray:
    """The `candidates` 6-adjacent to a small, compact core, bool of the box's shape (z, y, x).

    Args:
        thin_cores: core voxels farther than one voxel from any the erosion keeps, bool.
        kept_cores: the other core voxels (the eroded cores dilated by one voxel), bool.
        candidates: tissue that may join the mask (boundary tissue not kept yet), bool.
        spacing: voxel size (z, y, x), mm.

    A component of `thin_cores` (6-connected) counts when it touches no `kept_cores` voxel (it
    is a whole core, not the thin end of a larger one), holds at most `SMALL_CORE_MAX_MM3`, is
    between `SMALL_CORE_MIN_ACROSS_MM` (and `SMALL_CORE_MIN_VOXELS` voxels) and
    `SMALL_CORE_MAX_ACROSS_MM` long along each axis and fills `SMALL_CORE_MIN_FILL` of its box.
    """
    shape = thin_cores.shape
    result = np.zeros(thin_cores.size, dtype=bool)
    index = np.flatnonzero(thin_cores)
    if index.size == 0:
        return result.reshape(shape)
    thin_flat, kept_flat = thin_cores.ravel(), kept_cores.ravel()
    rows, cols = [], []
    touches_kept = np.zeros(index.size, dtype=bool)
    for where, neighbour, sign in _six_neighbours(index, shape):
        touches_kept[where[kept_flat[neighbour]]] = True
        if sign == 1:  # each edge once: the graph is undirected
            linked = thin_flat[neighbour]
            rows.append(where[linked])
            cols.append(np.searchsorted(index, neighbour[linked]))
    label = _components(index.size, np.concatenate(rows), np.concatenate(cols))
    count = int(label.max()) + 1

    voxels = np.bincount(label, minlength=count)
    compact = np.bincount(label, weights=touches_kept, minlength=count) == 0
    compact &= voxels * float(np.prod(spacing)) <= SMALL_CORE_MAX_MM3
    box = np.ones(count)
    coords = np.unravel_index(index, shape)
    for axis, mm in enumerate(spacing):
        low = np.full(count, shape[axis])
        high = np.full(count, -1)
        np.minimum.at(low, label, coords[axis])
        np.maximum.at(high, label, coords[axis])
        across = high - low + 1
        compact &= across >= SMALL_CORE_MIN_VOXELS
        compact &= across * mm >= SMALL_CORE_MIN_ACROSS_MM
        compact &= across * mm <= SMALL_CORE_MAX_ACROSS_MM
        box *= across
    compact &= voxels >= SMALL_CORE_MIN_FILL * box
    chosen = index[compact[label]]
    if chosen.size == 0:
        return result.reshape(shape)
    candidates_flat = candidates.ravel()
    for _where, neighbour, _sign in _six_neighbours(chosen, shape):
        result[neighbour[candidates_flat[neighbour]]] = True
    return result.reshape(shape)


def _six_neighbours(index: np.ndarray, shape: Sequence[int]):
    """For each of the 6 directions: (positions in `index` whose neighbour lies inside the box,
    those neighbours' flat indices, +1 or -1 along the axis). `index`: flat indices (C order) into
    a box of `shape` (z, y, x); a neighbour never wraps to the next row or slice."""
    coords = np.unravel_index(index, shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    for axis, stride in enumerate(strides):
        for sign in (1, -1):
            inside = coords[axis] < shape[axis] - 1 if sign == 1 else coords[axis] > 0
            where = np.flatnonzero(inside)
            yield where, index[where] + sign * stride, sign


def _components(count: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph of `count` nodes and edges (rows[i], cols[i]):
    each node's component, numbered 0, 1, … by union-find in whole-array steps (each edge hooks
    the larger of its two roots under the smaller, then pointer jumping makes every node point at
    its root), a few rounds even along a strand of thousands of nodes."""
    label = np.arange(count)
    while True:
        first, second = label[rows], label[cols]
        apart = first != second
        if not apart.any():
            break
        np.minimum.at(label, np.maximum(first, second)[apart], np.minimum(first, second)[apart])
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
    return np.unique(label, return_inverse=True)[1]
