"""Tests for kdsb.preprocessing.resample: geometry, linear interpolation, dtypes, masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kdsb.errors import KdsbError
from kdsb.preprocessing.resample import resample_mask, resample_volume, resampled_shape

SPACING = (2.5, 0.7, 0.8)
TARGET = (1.0, 1.0, 1.0)


def output_coordinates(shape, spacing, target):
    """Patient coordinates (mm, relative to voxel [0, 0, 0]) of the output voxels, per axis."""
    out_shape = resampled_shape(shape, spacing, target)
    return [np.arange(n) * t for n, t in zip(out_shape, target, strict=True)]


def ramp(coordinates, slopes, offset):
    """slopes · (z, y, x) + offset on the grid given by per-axis coordinates (mm)."""
    z, y, x = np.meshgrid(*coordinates, indexing="ij")
    return slopes[0] * z + slopes[1] * y + slopes[2] * x + offset


@pytest.mark.parametrize(
    ("shape", "spacing", "target", "expected"),
    [
        ((100, 512, 512), (2.5, 0.7, 0.7), (1.0, 1.0, 1.0), (248, 358, 358)),
        ((11, 11, 11), (2.0, 1.0, 0.5), (1.0, 1.0, 1.0), (21, 11, 6)),
        ((10, 10, 10), (0.7, 0.7, 0.7), (0.7, 0.7, 0.7), (10, 10, 10)),
        ((1, 5, 5), (3.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1, 5, 5)),
    ],
)
def test_resampled_shape_covers_the_input_extent(shape, spacing, target, expected):
    out = resampled_shape(shape, spacing, target)
    assert out == expected
    for n_in, n_out, s, t in zip(shape, out, spacing, target, strict=True):
        last_in = (n_in - 1) * s
        assert (n_out - 1) * t <= last_in + 1e-9  # never beyond the last input voxel centre
        assert n_out * t > last_in - 1e-9  # one more voxel would be


def test_linear_ramp_is_reproduced_exactly():
    shape = (9, 23, 17)
    slopes, offset = (3.0, -1.5, 0.25), 7.0
    volume = ramp([np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)], slopes, offset)
    result = resample_volume(volume, SPACING, TARGET)
    expected = ramp(output_coordinates(shape, SPACING, TARGET), slopes, offset)
    assert result.dtype == np.float64
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-9)


def test_matches_scipy_linear_interpolation_on_random_data():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(7, 19, 13)).astype(np.float32)
    spacing, target = (1.25, 0.6, 0.9), (0.8, 1.1, 0.7)
    result = resample_volume(volume, spacing, target)
    grids = np.meshgrid(
        *[np.arange(n) * t / s for n, s, t in zip(result.shape, spacing, target, strict=True)],
        indexing="ij",
    )
    reference = ndimage.map_coordinates(volume.astype(np.float64), grids, order=1)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-5)


def test_int16_is_kept_and_rounded():
    shape = (6, 15, 14)
    index_ramp = ramp([np.arange(n) for n in shape], (37.0, -11.0, 5.0), -300.0)
    volume = index_ramp.astype(np.int16)
    result = resample_volume(volume, SPACING, TARGET)
    # The same ramp in index units, evaluated at the output voxels' input-index positions.
    positions = [c / s for c, s in zip(output_coordinates(shape, SPACING, TARGET), SPACING,
                                       strict=True)]
    expected = ramp(positions, (37.0, -11.0, 5.0), -300.0)
    assert result.dtype == np.int16
    assert np.abs(result - expected).max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(result, np.rint(expected).astype(np.int16))


def test_same_spacing_returns_an_equal_copy():
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    result = resample_volume(volume, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(result, volume)
    assert result is not volume


def test_mask_stays_binary_and_its_boundary_moves_less_than_half_a_voxel():
    spacing, target = (2.0, 0.75, 0.75), (1.0, 1.0, 1.0)
    shape = (20, 48, 48)
    radius, centre = 12.0, np.array([19.0, 17.5, 18.2])
    coordinates = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*coordinates, indexing="ij")
    mask = (np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
            <= radius).astype(np.uint8)
    result = resample_mask(mask, spacing, target)
    assert result.dtype == np.uint8
    assert set(np.unique(result)) == {0, 1}
    z, y, x = np.meshgrid(*output_coordinates(shape, spacing, target), indexing="ij")
    distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    # Voxels more than half an input voxel inside (outside) the sphere stay in (out).
    tolerance = 0.5 * max(spacing)
    assert result[distance <= radius - tolerance].all()
    assert not result[distance > radius + tolerance].any()
    volume_in = mask.sum() * np.prod(spacing)
    volume_out = result.sum() * np.prod(target)
    assert abs(volume_out - volume_in) / volume_in < 0.05  # trilinear 0.5-level rounds corners


def test_bool_mask_is_accepted():
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1:3, 2:4, 2:4] = True
    result = resample_mask(mask, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    assert result.shape == (7, 11, 11)
    assert result.dtype == np.uint8
    assert result.max() == 1


def test_non_3d_volume_is_a_clear_error():
    with pytest.raises(KdsbError, match=r"expected a non-empty 3D volume .* shape \(4, 4\)"):
        resample_volume(np.zeros((4, 4), np.int16), (1.0, 1.0), (1.0, 1.0))
