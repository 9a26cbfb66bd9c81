"""Tests for kdsb.data.patches: normalisation, cube symmetries, patch sampling and reading."""

from __future__ import annotations

import numpy as np
import pytest

from kdsb.data import patches
from kdsb.errors import KdsbError
from kdsb.hu import AIR_HU
from kdsb.io import volumes

N_SYMMETRIES = 48


def test_normalize_hu_linear_map_and_clipping():
    hu = np.array([-3024, -1000, -300, 400, 1000, 3000], dtype=np.int16)
    out = patches.normalize_hu(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 13 / 7, 13 / 7], rtol=1e-6, atol=1e-6)
    unclipped = patches.normalize_hu(hu, clip=None)
    np.testing.assert_allclose(unclipped, (hu + 1000) / 700 - 1, rtol=1e-6)


def test_exactly_48_distinct_symmetries_with_identity_first():
    cube = np.random.default_rng(0).normal(size=(4, 4, 4))
    assert len(patches.CUBE_SYMMETRIES) == N_SYMMETRIES
    images = {patches.apply_symmetry(cube, i).tobytes() for i in range(N_SYMMETRIES)}
    assert len(images) == N_SYMMETRIES
    np.testing.assert_array_equal(patches.apply_symmetry(cube, 0), cube)


def test_symmetries_that_keep_a_grid_move_only_axes_of_equal_spacing():
    """A volume's shape stands in for its physical extent in mm: a symmetry that keeps the grid
    maps a box of spacing × shape onto a box of the same extent along every axis."""
    shape = np.array([6, 10, 14])
    for spacing, expected in (((1.0, 1.0, 1.0), 48), ((2.5, 1.0, 1.0), 16),
                              ((1.0, 2.0, 1.0), 16), ((3.0, 2.0, 1.0), 8), (None, 48)):
        kept = patches.symmetries_for(spacing)
        assert len(kept) == expected and kept[0] == 0 and list(kept) == sorted(kept)
        step = np.ones(3) if spacing is None else np.array(spacing)
        volume = np.zeros(shape)
        for index in range(N_SYMMETRIES):
            perm = list(patches.CUBE_SYMMETRIES[index][0])
            # The turned volume's extent in mm along each axis, read on the same grid.
            turned = np.array(patches.apply_symmetry(volume, index).shape) * step
            source = (shape * step)[perm]
            assert (index in kept) == (spacing is None or np.allclose(step[perm], step)), index
            if index in kept:
                np.testing.assert_allclose(turned, source)
    # Spacings within the project's tolerance (1e-3 mm) count as equal.
    assert len(patches.symmetries_for((1.0, 1.0004, 0.9996))) == 48


def test_a_random_symmetry_of_all_48_is_the_plain_draw():
    """Drawing from every symmetry gives what `rng.integers(48)` gave before the spacing was
    taken into account: isotropic runs keep their figures."""
    everything = patches.symmetries_for((1.0, 1.0, 1.0))
    draws = [patches.random_symmetry(np.random.default_rng(seed), everything)
             for seed in range(50)]
    assert draws == [int(np.random.default_rng(seed).integers(48)) for seed in range(50)]
    kept = patches.symmetries_for((1.0, 2.0, 1.0))  # y stays: the symmetries 0–7 and 40–47
    assert kept == (*range(8), *range(40, 48))
    rng = np.random.default_rng(0)
    assert {patches.random_symmetry(rng, kept) for _ in range(400)} == set(kept)


def test_each_symmetry_is_a_bijection_of_voxels():
    cube = np.arange(5**3).reshape(5, 5, 5)
    for i in range(N_SYMMETRIES):
        moved = patches.apply_symmetry(cube, i)
        assert moved.shape == cube.shape
        np.testing.assert_array_equal(np.sort(moved.ravel()), cube.ravel())


def test_apply_symmetry_keeps_channel_axis_and_permutes_shape():
    volume = np.random.default_rng(3).normal(size=(2, 3, 4, 5))
    for i in range(N_SYMMETRIES):
        moved = patches.apply_symmetry(volume, i)
        perm, _ = patches.CUBE_SYMMETRIES[i]
        assert moved.shape == tuple(volume.shape[p] for p in perm) + (5,)
        for c in range(5):
            np.testing.assert_array_equal(moved[..., c], patches.apply_symmetry(volume[..., c], i))


def test_apply_symmetry_rejects_bad_index():
    with pytest.raises(KdsbError, match="expected a cube symmetry index"):
        patches.apply_symmetry(np.zeros((2, 2, 2)), 48)


def _corner_lung_mask(shape=(64, 64, 64)) -> np.ndarray:
    """Lung in one block holding 10% of the voxels."""
    mask = np.zeros(shape, dtype=np.uint8)
    edge = round((0.1 * np.prod(shape)) ** (1 / 3))
    mask[-edge:, :edge, -edge:] = 1
    return mask


def _lung_fractions(mask, corners, size):
    return np.array([patches.extract_patch(mask, c, size, fill=0).mean() for c in corners])


def test_lung_sampling_finds_lung_that_a_grid_misses():
    mask = _corner_lung_mask()
    assert 0.09 < mask.mean() < 0.11
    corners = patches.sample_patch_corners(mask, 50, 16, np.random.default_rng(0))
    grid = patches.grid_patch_corners(mask.shape, 16)
    lung_sampled = _lung_fractions(mask, corners, 16).mean()
    lung_grid = _lung_fractions(mask, grid, 16).mean()
    assert lung_grid < 0.15
    assert lung_sampled > 0.5
    assert np.all(_lung_fractions(mask, corners, 16) >= patches.DEFAULT_MIN_LUNG_FRACTION)


def test_sampled_corners_inside_bounds_and_deterministic():
    mask = np.zeros((40, 50, 60), dtype=np.uint8)
    mask[:, 0:3, :] = 1  # lung along an edge pulls centres outside before clipping
    size = (16, 8, 32)
    corners = patches.sample_patch_corners(mask, 30, size, np.random.default_rng(5))
    assert corners.shape == (30, 3) and corners.dtype == np.int64
    assert np.all(corners >= 0) and np.all(corners <= np.subtract(mask.shape, size))
    again = patches.sample_patch_corners(mask, 30, size, np.random.default_rng(5))
    np.testing.assert_array_equal(corners, again)
    other = patches.sample_patch_corners(mask, 30, size, np.random.default_rng(6))
    assert not np.array_equal(corners, other)


def test_volume_smaller_than_patch_is_centred_with_negative_corner():
    mask = np.ones((10, 40, 20), dtype=np.uint8)
    corners = patches.sample_patch_corners(mask, 5, 32, np.random.default_rng(0))
    np.testing.assert_array_equal(corners[:, 0], (10 - 32) // 2)
    np.testing.assert_array_equal(corners[:, 2], (20 - 32) // 2)
    assert np.all((corners[:, 1] >= 0) & (corners[:, 1] <= 8))


def test_empty_lung_mask_falls_back_to_uniform(caplog):
    mask = np.zeros((20, 30, 40), dtype=np.uint8)
    count, size = 4000, 8
    corners = patches.sample_patch_corners(mask, count, size, np.random.default_rng(0),
                                           source="scans/p7.h5")
    assert "scans/p7.h5: lung mask is empty" in caplog.text  # (found in review: no file named)
    # Reference: centres uniform over every voxel, moved so the patch fits.
    centres = np.random.default_rng(0).integers(0, mask.shape, size=(count, 3))
    expected = np.clip(centres - size // 2, 0, np.array(mask.shape) - size)
    np.testing.assert_array_equal(corners, expected)
    for axis, n in enumerate(mask.shape):  # every position is reached, not just a few
        assert set(corners[:, axis]) == set(range(n - size + 1))


def test_grid_corners_cover_volume():
    corners = patches.grid_patch_corners((70, 64, 10), 32)
    z, y, x = (sorted(set(corners[:, k])) for k in range(3))
    assert z == [0, 32, 38] and y == [0, 32] and x == [(10 - 32) // 2]
    assert len(corners) == 6


def test_extract_patch_matches_numpy_padding():
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=(20, 25, 30)).astype(np.int16)
    size = np.array([8, 12, 16])
    pad = 40
    padded = np.pad(volume, pad, constant_values=AIR_HU)
    for corner in [(0, 0, 0), (-5, 20, 25), (-30, 0, 0), (15, -3, 28), (12, 13, 14)]:
        start = np.add(corner, pad)
        expected = padded[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]
        got = patches.extract_patch(volume, corner, size)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, expected)


def test_extract_patch_reads_h5py_dataset_and_channels(tmp_path):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 400, size=(40, 36, 33)).astype(np.int16)
    path = volumes.write_volume(tmp_path / "p.h5", hu, hu > 0, (1, 1, 1), (0, 0, 0))
    with volumes.open_volume(path) as f:
        got = patches.extract_patch(f["hu"], (30, -2, 5), 16)
    np.testing.assert_array_equal(got, patches.extract_patch(hu, (30, -2, 5), 16))
    assert np.all(got[10:] == AIR_HU)
    channels = np.stack([hu, -hu], axis=-1)
    patch = patches.extract_patch(channels, (1, 2, 3), 4, fill=0)
    assert patch.shape == (4, 4, 4, 2)
    np.testing.assert_array_equal(patch[..., 1], -hu[1:5, 2:6, 3:7])
