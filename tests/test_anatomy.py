"""Tests for kdsb.phantoms.anatomy: the phantom chest, its lungs, nodules, labels and HU."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kdsb.phantoms.anatomy import IMAGE_NOISE_HU, make_phantom
from kdsb.phantoms.chest import NODULE_HU
from kdsb.phantoms.nodules import (
    BIG_NODULE_RADIUS_MM,
    CANCER_RADIUS_MM,
    NODULE_IRREGULARITY,
    SMALL_NODULE_RADIUS_MM,
)

SIZE = 64
SCALE = 0.6
AIR_THRESHOLD_HU = -500


def _phantom(seed: int, cancer: bool = True, **kwargs):
    options = {"size": SIZE, "scale": SCALE, **kwargs}
    return make_phantom(np.random.default_rng(seed), cancer=cancer, **options)


def _voxel(phantom, point_mm) -> np.ndarray:
    return np.round((np.array(point_mm) - phantom.origin) / phantom.spacing).astype(int)


def _distance_mm(phantom, center_mm) -> np.ndarray:
    """Distance (mm) of every voxel centre to a point, shape (z, y, x)."""
    axes = [
        o + s * np.arange(n) - c
        for o, s, n, c in zip(
            phantom.origin, phantom.spacing, phantom.hu.shape, center_mm, strict=True
        )
    ]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(z**2 + y**2 + x**2)


@pytest.fixture(scope="module")
def phantoms():
    """Phantoms of both labels over a few seeds, at test size."""
    return [_phantom(seed, cancer=seed % 2 == 0) for seed in range(8)]


def test_same_seed_same_phantom_other_seed_other_phantom():
    first, again, other = _phantom(5), _phantom(5), _phantom(6)
    np.testing.assert_array_equal(first.hu, again.hu)
    np.testing.assert_array_equal(first.lung_mask, again.lung_mask)
    assert first.nodules == again.nodules
    assert (first.spacing, first.origin) == (again.spacing, again.origin)
    assert first.hu.shape != other.hu.shape or not np.array_equal(first.hu, other.hu)


def test_geometry_types_and_ranges(phantoms):
    for p in phantoms:
        assert p.hu.dtype == np.int16 and p.lung_mask.dtype == np.uint8
        assert p.hu.shape == p.lung_mask.shape and p.hu.shape[1:] == (SIZE, SIZE)
        assert set(np.unique(p.lung_mask)) == {0, 1}
        slice_mm, row_mm, column_mm = p.spacing
        assert 1.0 <= slice_mm <= 2.5 and row_mm == column_mm
        assert 300 * SCALE <= row_mm * SIZE <= 380 * SCALE + 0.01
        assert 220 * SCALE - 2.5 <= slice_mm * p.hu.shape[0] <= 300 * SCALE + 2.5
        # The image is centred on the patient axis: voxel (·, 31.5, 31.5) at y = x = 0.
        assert p.origin[1] == pytest.approx(-(SIZE - 1) / 2 * row_mm, abs=1e-3)


def test_labels_follow_nodule_radii(phantoms):
    for seed, p in enumerate(phantoms):
        radii = [n.radius_mm for n in p.nodules]
        assert p.label == int(seed % 2 == 0)
        assert p.label == int(any(r >= CANCER_RADIUS_MM for r in radii))
        big = [r for r in radii if r >= CANCER_RADIUS_MM]
        small = [r for r in radii if r < CANCER_RADIUS_MM]
        assert all(BIG_NODULE_RADIUS_MM[0] <= r <= BIG_NODULE_RADIUS_MM[1] for r in big)
        assert all(SMALL_NODULE_RADIUS_MM[0] <= r <= SMALL_NODULE_RADIUS_MM[1] for r in small)
        assert len(big) >= 1 if p.label else not big


def test_realistic_hu_inside_lungs_and_body(phantoms):
    p = phantoms[0]
    lung = p.hu[p.lung_mask == 1]
    assert -900 < np.median(lung) < -780
    body = p.hu[:, SIZE // 2, :]  # a coronal plane through the body
    assert body.max() > 600  # ribs or spine
    assert np.any((body > -150) & (body < -50))  # fat layer


def test_lungs_are_two_disconnected_components_without_trachea(phantoms):
    for p in phantoms:
        labels, count = ndimage.label(p.lung_mask)
        assert count == 2
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.min() > 0.4 * sizes.max()  # both lungs, neither a fragment
        # One lung on each side of the midline (x < 0 is the patient's right).
        centres_x = [
            p.origin[2] + p.spacing[2] * np.argwhere(labels == k)[:, 2].mean() for k in (1, 2)
        ]
        assert min(centres_x) < 0 < max(centres_x)
    # The trachea: air inside the body on the top slice, on the midline, not in the mask.
    top_hu, top_mask = p.hu[-1], p.lung_mask[-1]
    assert top_mask.sum() == 0
    middle = top_hu[: SIZE * 3 // 4, SIZE // 2 - 3 : SIZE // 2 + 3]
    assert (middle < AIR_THRESHOLD_HU).sum() >= 4


def test_nodules_are_solid_inside_the_lungs_and_juxtapleural_ones_touch_the_wall():
    juxtapleural_seen = interior_seen = 0
    for seed in range(6):
        p = _phantom(seed, size=96, scale=0.8)
        not_lung_tissue = (p.lung_mask == 0) & (p.hu > AIR_THRESHOLD_HU)
        for nodule in p.nodules:
            core = (
                _distance_mm(p, nodule.center_mm)
                <= nodule.radius_mm * (1 - NODULE_IRREGULARITY) - max(p.spacing) / 2
            )
            core &= p.lung_mask == 1
            if not core.any():
                continue
            tolerance = 5 + 3 * IMAGE_NOISE_HU[1] / np.sqrt(core.sum())
            assert abs(np.mean(p.hu[core]) - NODULE_HU) < tolerance
            assert p.lung_mask[tuple(_voxel(p, nodule.center_mm))] == 1
            touches = (ndimage.binary_dilation(core, iterations=2) & not_lung_tissue).any()
            if nodule.juxtapleural:
                juxtapleural_seen += 1
                assert touches, nodule
            elif nodule.radius_mm >= CANCER_RADIUS_MM:
                interior_seen += 1
                assert not touches, nodule
    assert juxtapleural_seen >= 2 and interior_seen >= 1


def test_table_below_the_body_separates_outside_air_and_padding_outside_fov(phantoms):
    for p in phantoms:
        middle = p.hu.shape[0] // 2
        image, padding = p.hu[middle], p.padding_mask
        # Padding: everything outside the inscribed circle, air in the returned HU.
        assert padding[0, 0] and padding[-1, -1] and not padding[SIZE // 2, SIZE // 2]
        assert np.all(image[padding] == -1000)
        # Dense things: the body (biggest) and the table, a separate piece below it.
        dense, count = ndimage.label(image > AIR_THRESHOLD_HU, structure=np.ones((3, 3)))
        sizes = np.bincount(dense.ravel())[1:]
        body = dense == np.argmax(sizes) + 1
        others = [k for k in range(1, count + 1) if not body[dense == k].any()]
        table = np.isin(dense, [k for k in others if sizes[k - 1] > SIZE // 4])
        assert table.any(), "no patient table"
        # In every column holding both, the table lies posterior (greater row) to the body.
        rows = np.arange(SIZE)[:, None]
        both = body.any(axis=0) & table.any(axis=0)
        assert both.sum() > SIZE // 4
        body_last = np.where(body, rows, -1).max(axis=0)
        table_first = np.where(table, rows, SIZE).min(axis=0)
        assert np.all(table_first[both] > body_last[both] + 1)  # with air between
        # Outside air touching the field of view's edge is split in two by the table.
        air, _ = ndimage.label((image <= AIR_THRESHOLD_HU) & ~padding)
        edge = ndimage.binary_dilation(padding) & ~padding
        assert len(set(np.unique(air[edge])) - {0}) >= 2
