"""The GMCAE patch cache: shards equal the streamed patches, reuse and rebuild, batch symmetry."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kdsb.data import datasets, patch_cache, patches
from kdsb.errors import KdsbError
from kdsb.io import volumes


def _volume(folder, pid, seed):
    rng = np.random.default_rng(seed)
    hu = rng.normal(-850, 60, (40, 48, 48)).astype(np.int16)
    lung = np.zeros(hu.shape, np.uint8)
    lung[4:36, 6:42, 6:42] = 1
    return volumes.write_volume(volumes.volume_path(folder, pid), hu, lung, (1.0,) * 3, (0.0,) * 3)


def test_shards_hold_the_streamed_patches_and_are_reused_until_a_volume_changes(tmp_path,
                                                                                monkeypatch):
    paths = [_volume(tmp_path, f"p{i}", i) for i in range(2)]
    shards = patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                           per_volume=5, seed=3)
    for path, shard in zip(paths, shards, strict=True):
        expected = datasets.read_patches(
            path, patch_size=16, count=5, augment=False,
            rng=np.random.default_rng([3, zlib.crc32(path.stem.encode())]))
        stored = np.load(shard)
        assert stored.dtype == np.float16 and stored.shape == (5, 16, 16, 16)
        np.testing.assert_allclose(stored, expected, atol=2e-3)
    calls = []
    real = patch_cache.volume_patches
    monkeypatch.setattr(patch_cache, "volume_patches",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    assert patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                         per_volume=5, seed=3) == shards
    assert calls == []
    _volume(tmp_path, "p1", 99)  # the volume changes: its shard is rebuilt, the other kept
    patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16, per_volume=5, seed=3)
    assert [str(a[0]) for a in calls] == [str(paths[1])]
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_a_damaged_shard_or_record_is_rebuilt_with_a_warning(tmp_path, caplog):
    """Found by a user's check: a cut-off shard or key.json stopped training with numpy's or
    json's traceback."""
    paths = [_volume(tmp_path, f"p{i}", i) for i in range(2)]
    shards = patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                           per_volume=5, seed=3)
    good = [np.load(shard) for shard in shards]
    shards[0].write_bytes(shards[0].read_bytes()[:5000])
    with caplog.at_level("WARNING"):
        assert patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                             per_volume=5, seed=3) == shards
    assert f"{shards[0]}: damaged; rebuilding it" in caplog.text
    np.testing.assert_array_equal(np.load(shards[0]), good[0])
    key = shards[0].parent / patch_cache.KEY_NAME
    key.write_text('{"p0": {"size": 1')
    caplog.clear()
    with caplog.at_level("WARNING"):
        patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16, per_volume=5,
                                      seed=3)
    assert f"{key}: unreadable" in caplog.text
    for shard, array in zip(shards, good, strict=True):
        np.testing.assert_array_equal(np.load(shard), array)
    shards[1].write_bytes(b"not a shard")  # damaged after the build: a one-line error
    with pytest.raises(KdsbError, match=r"p1.npy: expected a patch cache shard, "
                                 r"received an unreadable one"):
        patch_cache.cached_patch_dataset(shards, spacing=None)


def test_a_shard_is_drawn_from_the_seed_and_its_volume_not_its_place(tmp_path):
    """Found in review: volume i drew with seed + i, so a shard reused by a run of other
    volumes was not the one a fresh build would draw (and seeds s, s + 1 drew alike)."""
    paths = [_volume(tmp_path, f"p{i}", i) for i in range(3)]
    first = patch_cache.build_patch_cache(paths, tmp_path / "a", patch_size=16, per_volume=4)
    later = patch_cache.build_patch_cache(paths[1:], tmp_path / "b", patch_size=16,
                                          per_volume=4)
    for one, other in zip(first[1:], later, strict=True):
        np.testing.assert_array_equal(np.load(one), np.load(other))
    # p1 first at place 1 with seed 0, then at place 0 with seed 1: it drew alike.
    shifted = patch_cache.build_patch_cache(paths[1:], tmp_path / "c", patch_size=16,
                                            per_volume=4, seed=1)
    assert not np.array_equal(np.load(first[1]), np.load(shifted[0]))


def test_a_failed_build_keeps_the_record_of_the_shards_it_wrote(tmp_path, monkeypatch):
    paths = [_volume(tmp_path, f"p{i}", i) for i in range(3)]
    real = patch_cache.volume_patches
    calls = []

    def fail_on_third(path, *args):
        calls.append(path.stem)
        if path.stem == "p2":
            raise OSError("disk gone")
        return real(path, *args)

    monkeypatch.setattr(patch_cache, "volume_patches", fail_on_third)
    with pytest.raises(OSError, match="disk gone"):
        patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16, per_volume=2)
    monkeypatch.setattr(patch_cache, "volume_patches", lambda path, *a: calls.append(path.stem)
                        or real(path, *a))
    shards = patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                           per_volume=2)
    assert calls == ["p0", "p1", "p2", "p2"] and all(s.is_file() for s in shards)


def test_a_killed_build_s_old_temporary_is_swept_a_live_one_kept(tmp_path):
    """A build killed mid-shard leaves its temporary; the folder is shared by the workers of a
    multi-machine run, so only one idle for `STALE_SHARD_SECONDS` is taken as a dead writer's
    (found in review: it was left for good)."""
    import os
    import time

    from kdsb.io.atomic import TEMP_PREFIX

    paths = [_volume(tmp_path, "p0", 0)]
    (shard,) = patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                             per_volume=2)
    dead = shard.with_name(f"{TEMP_PREFIX}111-0a1b2c3d-p9.npy")
    live = shard.with_name(f"{TEMP_PREFIX}222-0a1b2c3d-p8.npy")
    for temp in (dead, live):
        temp.write_bytes(b"half a shard")
    idle = time.time() - patch_cache.STALE_SHARD_SECONDS - 60
    os.utime(dead, (idle, idle))
    patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16, per_volume=2)
    assert not dead.exists() and live.exists()


def test_a_batch_gets_one_cube_symmetry_for_all_its_patches(tmp_path):
    """One symmetry a batch, drawn from those given: on a 1 × 1 × 2.5 mm grid never one that
    moves x (it would squash the anatomy)."""
    rng = np.random.default_rng(0)
    shard = rng.normal(size=(6, 8, 8, 8)).astype(np.float16)
    plain = patch_cache.sample_batch([shard], 4, np.random.default_rng(1))
    assert plain.shape == (4, 8, 8, 8, 1) and plain.dtype == np.float32
    sources = [next(i for i in range(6) if np.array_equal(p[..., 0], shard[i])) for p in plain]
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.5)):
        allowed = patches.symmetries_for(spacing)
        drawn = set()
        for seed in range(1, 21):
            plain = patch_cache.sample_batch([shard], 4, np.random.default_rng(seed))
            sources = [next(i for i in range(6) if np.array_equal(p[..., 0], shard[i]))
                       for p in plain]
            batch = patch_cache.sample_batch([shard], 4, np.random.default_rng(seed), allowed)
            symmetries = set()
            for patch, source in zip(batch, sources, strict=True):
                symmetries |= {s for s in range(len(patches.CUBE_SYMMETRIES)) if np.array_equal(
                    patch[..., 0], patches.apply_symmetry(shard[source].astype(np.float32), s))}
            assert len(symmetries) == 1
            drawn |= symmetries
        assert drawn <= set(allowed) and len(drawn) > 5
        assert any(patches.CUBE_SYMMETRIES[s][0] != (0, 1, 2) for s in drawn)  # transposes too


def test_cached_dataset_yields_gmcae_batches(tmp_path):
    pytest.importorskip("tensorflow")
    paths = [_volume(tmp_path, f"p{i}", i) for i in range(2)]
    shards = patch_cache.build_patch_cache(paths, tmp_path / "cache", patch_size=16,
                                           per_volume=4)
    x, y = next(iter(patch_cache.cached_patch_dataset(shards, batch_size=3, spacing=(1, 1, 1),
                                                      seed=0)))
    assert x.shape == (3, 16, 16, 16, 1) and np.array_equal(x, y)
    assert -1.01 <= float(np.min(x)) and float(np.max(x)) <= 1.5


def test_the_open_file_limit_is_raised_for_every_shard(monkeypatch):
    """Found in review: 1,300 shards kept open under a soft limit of 1,024 (a common default)
    failed with "Too many open files"."""
    import resource

    from kdsb.errors import KdsbError

    limits, set_to = [(1024, 4096)], []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits[0])
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: set_to.append(value))
    patch_cache.allow_open_files(1000)
    assert set_to == []
    patch_cache.allow_open_files(1556)
    assert set_to == [(1556, 4096)]
    with pytest.raises(KdsbError, match=r"expected to open 5000 files .* hard limit of 4096"):
        patch_cache.allow_open_files(5000)
    limits[0] = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    patch_cache.allow_open_files(10**6)
    assert len(set_to) == 1
