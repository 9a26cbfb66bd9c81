"""kdsb.io.volumes: atomic HDF5 volume files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from kdsb._version import __version__
from kdsb.errors import StoreError
from kdsb.io import volumes


def _volume(rng, shape=(5, 40, 36)):
    hu = rng.integers(-1000, 400, size=shape).astype(np.int16)
    mask = (hu < -500).astype(np.uint8)
    return hu, mask


def test_write_read_round_trip(tmp_path):
    hu, mask = _volume(np.random.default_rng(0))
    path = volumes.write_volume(
        volumes.volume_path(tmp_path, "p1"), hu, mask, (1.0, 0.5, 0.5), (-10.0, 2.5, -3.0),
        attrs={"patient_id": "p1", "series_uid": "1.2.3", "source_shape": (5, 80, 72)},
    )
    assert path == tmp_path / "p1.h5"
    volume = volumes.read_volume(path)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_array_equal(volume.lung_mask, mask)
    assert volume.hu.dtype == np.int16 and volume.lung_mask.dtype == np.uint8
    assert volume.spacing == (1.0, 0.5, 0.5)
    assert volume.origin == (-10.0, 2.5, -3.0)
    assert volume.patient_id == "p1"
    assert volume.attrs["series_uid"] == "1.2.3"
    assert volume.attrs["kdsb_version"] == __version__
    attrs = volumes.read_attrs(path)
    assert attrs["shape"] == (5, 40, 36) and attrs["source_shape"] == [5, 80, 72]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_threads_write_the_same_chunks(tmp_path):
    # 3 × 3 × 10 chunks with edge chunks: more than one batch of chunks per thread.
    hu, mask = _volume(np.random.default_rng(3), shape=(70, 80, 300))
    paths = [volumes.write_volume(tmp_path / f"t{threads}.h5", hu, mask, (1, 1, 1), (0, 0, 0),
                                  threads=threads) for threads in (1, 3)]
    assert volumes.DEFLATE_BATCH_CHUNKS * 3 < 90
    with h5py.File(paths[0]) as one, h5py.File(paths[1]) as three:
        for name in ("hu", "lung_mask"):
            for start in ((0, 0, 0), (64, 64, 288), (32, 32, 160)):
                assert (one[name].id.read_direct_chunk(start)
                        == three[name].id.read_direct_chunk(start))
            np.testing.assert_array_equal(three[name][...], one[name][...])
    np.testing.assert_array_equal(volumes.read_volume(paths[1]).hu, hu)


def test_mask_is_stored_as_zero_one(tmp_path):
    hu, _ = _volume(np.random.default_rng(1))
    mask = np.where(hu < 0, 255, 0)  # any nonzero value is lung
    volumes.write_volume(tmp_path / "p.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    stored = volumes.read_volume(tmp_path / "p.h5").lung_mask
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, (hu < 0).astype(np.uint8))
    assert set(np.unique(stored)) == {0, 1}


def test_failed_write_keeps_previous_file(tmp_path):
    hu, mask = _volume(np.random.default_rng(2))
    path = volumes.write_volume(tmp_path / "p.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    with pytest.raises(TypeError):
        volumes.write_volume(path, hu, mask, (1, 1, 1), (0, 0, 0), attrs={"bad": object()})
    np.testing.assert_array_equal(volumes.read_volume(path).hu, hu)
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]


def test_shape_mismatch_is_rejected(tmp_path):
    hu, mask = _volume(np.random.default_rng(3))
    with pytest.raises(StoreError, match="same shape"):
        volumes.write_volume(tmp_path / "p.h5", hu, mask[:-1], (1, 1, 1), (0, 0, 0))


def test_list_volumes_skips_temporaries_and_follows_symlinks(tmp_path):
    hu, mask = _volume(np.random.default_rng(4))
    volumes.write_volume(tmp_path / "b.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    volumes.write_volume(tmp_path / "a.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    (tmp_path / ".tmp-123-c.h5").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "a.h5").symlink_to(tmp_path / "a.h5")
    assert list(volumes.list_volumes(tmp_path)) == ["a", "b"]
    # By id: "a" before "a-2", though "a-2.h5" sorts before "a.h5" (found in review).
    volumes.write_volume(tmp_path / "a-2.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    assert list(volumes.list_volumes(tmp_path)) == ["a", "a-2", "b"]
    assert volumes.read_volume(volumes.list_volumes(linked)["a"]).hu.shape == hu.shape


def test_unreadable_and_foreign_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="junk.h5: expected an HDF5 file"):
        volumes.read_volume(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(StoreError, match="missing hu, lung_mask, spacing, origin"):
        volumes.read_volume(tmp_path / "foreign.h5")
    with pytest.raises(StoreError, match="missing path"):
        volumes.read_volume(tmp_path / "absent.h5")
    # Found in review: a mask of another shape gave patches cut beyond the volume, silently;
    # a 2D volume a broadcast error without the file's name.
    for name, hu_shape, mask_shape in (("other.h5", (4, 5, 6), (4, 5, 7)),
                                       ("flat.h5", (5, 6), (5, 6))):
        with h5py.File(tmp_path / name, "w") as f:
            f["hu"], f["lung_mask"] = np.zeros(hu_shape, np.int16), np.zeros(mask_shape, np.uint8)
            f.attrs["spacing"], f.attrs["origin"] = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
        with pytest.raises(StoreError, match=rf"{name}: expected 3D hu and lung_mask of one "
                                             rf"shape, received \({hu_shape[0]}, "):
            with volumes.open_volume(tmp_path / name):
                pass
    with pytest.raises(StoreError, match="expected a folder"):
        volumes.list_volumes(tmp_path / "nowhere")


def test_partial_reads_use_chunks(tmp_path):
    hu, mask = _volume(np.random.default_rng(5), shape=(70, 64, 64))
    path = volumes.write_volume(tmp_path / "p.h5", hu, mask, (1, 1, 1), (0, 0, 0))
    with volumes.open_volume(path) as f:
        assert f["hu"].chunks == (32, 32, 32)
        # Chunks are deflated by kdsb, inflated by HDF5's own filters (edge chunks included).
        assert (f["hu"].compression, f["hu"].shuffle) == ("gzip", True)
        assert f["hu"].id.get_storage_size() < hu.nbytes
        np.testing.assert_array_equal(f["hu"][...], hu)
        np.testing.assert_array_equal(f["lung_mask"][...], mask)
        np.testing.assert_array_equal(f["hu"][40:72, 10:42, 0:32], hu[40:72, 10:42, 0:32])


def test_damaged_voxels_are_a_store_error(tmp_path):
    """A header that opens over damaged chunks (found in review: a raw h5py OSError stopped a
    whole export)."""
    rng = np.random.default_rng(0)
    path = volumes.write_volume(tmp_path / "p.h5", rng.integers(-1000, 400, (40, 40, 40)),
                                np.ones((40, 40, 40)), (1, 1, 1), (0, 0, 0))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 4000] = bytes(4000)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"p.h5: expected readable voxels, received damaged"):
        volumes.read_volume(path)


@pytest.mark.parametrize("kind", ["volume", "heatmap"])
def test_every_damaged_header_byte_is_a_store_error_naming_the_file(tmp_path, kind):
    """Each of the first 1024 bytes (superblock, groups, object headers) flipped in turn: the
    file reads or fails with a StoreError naming it (found in review: flips of the header's
    bytes escaped as h5py's KeyError, RuntimeError or AttributeError, a traceback naming no
    file)."""
    from kdsb.io import heatmaps

    zeros = np.zeros((8, 8, 8))
    if kind == "volume":
        path = volumes.write_volume(tmp_path / "good.h5", zeros, zeros, (1, 1, 1), (0, 0, 0))
        read = volumes.read_volume
    else:
        path = heatmaps.write_heatmap(tmp_path / "good.h5", zeros, (1, 1, 1), (0, 0, 0))
        read = heatmaps.read_heatmap
    data, damaged = path.read_bytes(), tmp_path / "damaged.h5"
    failed = 0
    for offset in range(1024):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            read(damaged)
        except StoreError as error:
            assert str(damaged) in str(error) and "\n" not in str(error)
            failed += 1
    assert failed > 100  # the scan does reach damage h5py notices


def test_a_callers_own_error_in_the_block_is_not_taken_for_damage(tmp_path):
    """Only h5py's KeyError/RuntimeError mean a damaged file (found in review: the caller's
    own became "damaged data", and predict --fill-missing would have filled its patient)."""
    zeros = np.zeros((4, 4, 4))
    path = volumes.write_volume(tmp_path / "p.h5", zeros, zeros, (1, 1, 1), (0, 0, 0))
    for error in (KeyError("mine"), RuntimeError("mine")):
        with pytest.raises(type(error), match="mine"), volumes.open_volume(path):
            raise error


def test_hu_are_rounded_and_never_wrapped(tmp_path):
    """Found in review: floats were truncated (-160.7 → -160) and 40000 wrapped to -25536."""
    hu = np.full((2, 3, 4), -160.7)
    path = volumes.write_volume(tmp_path / "p.h5", hu, np.ones(hu.shape), (1, 1, 1), (0, 0, 0))
    assert volumes.read_volume(path).hu.min() == -161
    with pytest.raises(StoreError, match=r"q.h5: expected HU within \[-32768, 32767\], "
                                         r"received -1000 to 40000"):
        volumes.write_volume(tmp_path / "q.h5", np.array([-1000, 40000]).reshape(1, 1, 2),
                             np.ones((1, 1, 2)), (1, 1, 1), (0, 0, 0))
    assert not (tmp_path / "q.h5").exists()


def test_the_files_geometry_and_values_follow_the_contract(tmp_path):
    """Found in review: a scalar spacing raised a TypeError naming no file, a 2-value one was
    taken; NaN HU was written as 0; a caller's attrs replaced the spacing."""
    import h5py

    hu, mask = _volume(np.random.default_rng(4))
    path = volumes.write_volume(tmp_path / "p.h5", hu, mask, (2, 1, 1), (0, 0, 0),
                                attrs={"spacing": [9, 9], "kdsb_version": "0.0"})
    attrs = volumes.read_attrs(path)
    assert attrs["spacing"] == [2.0, 1.0, 1.0] and attrs["kdsb_version"] != "0.0"
    for spacing, origin in ((1.0, [0, 0, 0]), ([1, -1, 1], [0, 0, 0]), ([1, 1], [0, 0]),
                            ([1, 1, 1], [0, np.nan, 0])):
        with h5py.File(path, "r+") as f:
            f.attrs["spacing"], f.attrs["origin"] = spacing, origin
        with pytest.raises(StoreError, match=r"p.h5: expected spacing and origin as 3 finite mm"):
            volumes.read_attrs(path)
    nan = hu.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="q.h5: expected finite HU values, received 1 NaN"):
        volumes.write_volume(tmp_path / "q.h5", nan, mask, (1, 1, 1), (0, 0, 0))
