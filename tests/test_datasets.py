"""Tests for kdsb.data.datasets: patient splits and the patch and volume tf.data pipelines."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from kdsb.data import datasets, patches
from kdsb.data.inputs import VolumeInput
from kdsb.errors import KdsbError, LabelsError
from kdsb.hu import INPUT_CLIP_MAX_HU
from kdsb.io import volumes

SHAPES = {"a": (40, 36, 44), "b": (34, 40, 38), "c": (20, 30, 50)}
PATCH = 16
X_MAX = float(patches.normalize_hu(INPUT_CLIP_MAX_HU))
PLAIN = VolumeInput(mask_outside_lungs=False)


def _phantom(shape, rng):
    """Body of soft tissue with one ellipsoid lung (-850 HU) and a bone spot (2000 HU)."""
    z, y, x = np.indices(shape)
    centre = np.array(shape) / 2
    radii = np.array(shape) / 4
    lung = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) < 1
    hu = np.where(lung, -850, 40) + rng.normal(0, 20, shape)
    hu[:3, :3, :3] = 2000
    return hu.astype(np.int16), lung.astype(np.uint8)


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    for patient_id, shape in SHAPES.items():
        hu, lung = _phantom(shape, rng)
        volumes.write_volume(volumes.volume_path(folder, patient_id), hu, lung, (1, 1, 1),
                             (0, 0, 0))
    return folder


@pytest.fixture(scope="module")
def paths(volume_dir) -> list[Path]:
    return list(volumes.list_volumes(volume_dir).values())


def _take(dataset, n):
    return [tuple(np.asarray(t) for t in element) for element in dataset.take(n)]


# split_patients


def test_split_is_disjoint_complete_deterministic_and_order_free():
    ids = [f"p{i:02d}" for i in range(30)]
    train, val = datasets.split_patients(ids, val_fraction=0.2, seed=3)
    assert len(val) == 6 and not set(train) & set(val) and sorted(train + val) == ids
    assert datasets.split_patients(ids[::-1], val_fraction=0.2, seed=3) == (train, val)
    assert datasets.split_patients(ids, val_fraction=0.2, seed=4) != (train, val)


def test_split_is_stratified_with_a_positive_in_validation():
    ids = [f"p{i:02d}" for i in range(20)]
    labels = {i: int(k < 5) for k, i in enumerate(ids)}
    train, val = datasets.split_patients(ids, val_fraction=0.2, seed=0, labels=labels)
    assert sum(labels[i] for i in val) == 1 and len(val) == 4
    few = {i: int(k < 2) for k, i in enumerate(ids)}
    train, val = datasets.split_patients(ids, val_fraction=0.1, seed=0, labels=few)
    assert sum(few[i] for i in val) == 1 and sum(few[i] for i in train) == 1
    # A class of one stays in training whatever the fraction (found in review: at 0.6 it went
    # to validation, leaving training without a positive).
    one = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 1}
    for fraction in (0.2, 0.5, 0.6, 0.9):
        train, val = datasets.split_patients(list(one), val_fraction=fraction, labels=one)
        assert "e" in train and "e" not in val


def test_split_rejects_bad_input():
    with pytest.raises(KdsbError, match="expected val_fraction"):
        datasets.split_patients(["a", "b"], val_fraction=1.0)
    with pytest.raises(LabelsError, match="received none for"):
        datasets.split_patients(["a", "b"], labels={"a": 0})
    with pytest.raises(LabelsError, match="expected labels 0 or 1"):
        datasets.split_patients(["a", "b"], labels={"a": 0, "b": 2})


# patch_dataset


def test_patch_batches_shapes_values_and_targets(paths):
    ds = datasets.patch_dataset(paths, patch_size=PATCH, batch_size=4, patches_per_volume=3)
    for x, y in _take(ds, 3):
        assert x.shape == (4, PATCH, PATCH, PATCH, 1) and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
        assert x.min() >= -1.0 and x.max() <= X_MAX + 1e-6
        # Centred on lung: each patch holds lung-like voxels (-850 HU → about -0.79).
        assert np.all((x < -0.6).reshape(4, -1).mean(axis=1) >= 0.1)


def test_patch_dataset_is_deterministic_for_a_seed(paths):
    def first(seed):
        ds = datasets.patch_dataset(
            paths, patch_size=PATCH, batch_size=4, patches_per_volume=2, seed=seed
        )
        return np.concatenate([x for x, _ in _take(ds, 4)])

    a = first(0)
    np.testing.assert_array_equal(a, first(0))
    assert not np.array_equal(a, first(1))


def test_patch_dataset_reads_symlinks_and_only_patches(paths, tmp_path, monkeypatch):
    for path in paths:
        (tmp_path / path.name).symlink_to(path)
    linked = list(volumes.list_volumes(tmp_path).values())
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        out = original(self, key)
        reads.append((self.name, out.size))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    ds = datasets.patch_dataset(
        linked, patch_size=PATCH, batch_size=4, patches_per_volume=4, num_parallel_calls=1
    )
    _take(ds, 2)
    hu_reads = [size for name, size in reads if name == "/hu"]
    assert hu_reads and max(hu_reads) <= PATCH**3
    assert {name for name, _ in reads} == {"/hu", "/lung_mask"}


def test_grid_pass_yields_every_grid_patch_once(paths):
    ds = datasets.patch_dataset(
        paths, patch_size=PATCH, batch_size=5, patches_per_volume=None, sampling="grid",
        augment=False, repeat=False,
    )
    got = np.concatenate([x for x, _ in _take(ds, -1)])
    expected = sum(len(patches.grid_patch_corners(s, PATCH)) for s in SHAPES.values())
    assert got.shape == (expected, PATCH, PATCH, PATCH, 1)
    # Unaugmented grid patch at the origin holds the bone spot, clipped to the maximum.
    assert np.isclose(got.max(), X_MAX)
    # Every grid patch of every volume once, as NumPy cuts it (in whatever order they came).
    reference = []
    for path in paths:
        hu = volumes.read_volume(path).hu
        reference += [patches.normalize_hu(patches.extract_patch(hu, corner, PATCH))
                      .astype(np.float32).tobytes()
                      for corner in patches.grid_patch_corners(hu.shape, PATCH)]
    assert sorted(p[..., 0].tobytes() for p in got) == sorted(reference)


def test_patch_dataset_rejects_bad_options(paths, tmp_path):
    with pytest.raises(KdsbError, match="expected sampling"):
        datasets.patch_dataset(paths, sampling="random")
    with pytest.raises(KdsbError, match="missing paths"):
        datasets.patch_dataset([tmp_path / "nope.h5"])
    with pytest.raises(KdsbError, match="expected patches_per_volume >= 1 for lung sampling"):
        datasets.patch_dataset(paths, patches_per_volume=None)
    # read_patches checks them too (found in review: a typo sampled a grid, None a TypeError).
    rng = np.random.default_rng(0)
    with pytest.raises(KdsbError, match="expected sampling"):
        datasets.read_patches(paths[0], sampling="lungs", rng=rng)
    with pytest.raises(KdsbError, match="expected count >= 1 for lung sampling, received None"):
        datasets.read_patches(paths[0], count=None, rng=rng)
    with pytest.raises(KdsbError, match="expected count >= 1, received 0"):
        datasets.read_patches(paths[0], count=0, rng=rng)


# volume_dataset


def test_volume_dataset_variable_sizes_and_labels(paths):
    labels = {"a": 1, "b": 0, "c": 1}
    elements = _take(datasets.volume_dataset(paths, labels, volume_input=PLAIN), -1)
    assert len(elements) == 3
    for (x, y), path in zip(elements, paths, strict=True):
        assert x.shape == (1, *SHAPES[path.stem], 1) and x.dtype == np.float32
        assert y.shape == (1, 1) and y.dtype == np.float32 and y[0, 0] == labels[path.stem]
        np.testing.assert_array_equal(x[0], PLAIN.read(path))
    unlabelled = [np.asarray(x) for x in datasets.volume_dataset(paths, volume_input=PLAIN)]
    np.testing.assert_array_equal(unlabelled[0], elements[0][0])


def test_volume_dataset_shuffled_and_augmented_keeps_each_label_with_its_volume(paths):
    """The default head's training stream (shuffled, augmented, repeated): every element's
    label is its own volume's, told apart by the sorted shape a cube symmetry keeps."""
    labels = {"a": 1, "b": 0, "c": 1}
    by_shape = {tuple(sorted(shape)): labels[i] for i, shape in SHAPES.items()}
    stream = datasets.volume_dataset(paths, labels, volume_input=PLAIN, augment=True, seed=4,
                                     shuffle=True, repeat=True)
    elements = _take(stream, 12)
    order = [tuple(sorted(x.shape[1:4])) for x, _ in elements]
    assert [float(y[0, 0]) for _, y in elements] == [by_shape[s] for s in order]
    assert order[:3] != [tuple(sorted(SHAPES[i])) for i in "abc"] or \
        order[3:6] != order[:3]  # shuffled: not the files' order on every pass


@pytest.mark.parametrize("budget_volumes", [3, 1])
def test_volume_dataset_reads_each_volume_once_within_its_memory_budget(
        paths, monkeypatch, budget_volumes):
    """Repeated passes read a volume once while the kept ones fit `VOLUME_CACHE_BYTES` (beyond
    it, on every visit), and every element equals a fresh read under one of the symmetries."""
    reads = []
    read = VolumeInput.read

    def counted(self, path):
        reads.append(Path(path).stem)
        return read(self, path)

    monkeypatch.setattr(VolumeInput, "read", counted)
    sizes = sorted(np.prod(shape) * 4 for shape in SHAPES.values())
    monkeypatch.setattr(datasets, "VOLUME_CACHE_BYTES", int(sum(sizes[:budget_volumes])))
    stream = datasets.volume_dataset(paths, volume_input=PLAIN, augment=True, seed=3,
                                     shuffle=True, repeat=True)
    elements = [x.numpy()[0] for x in stream.take(12)]
    fresh = {tuple(sorted(SHAPES[p.stem])): read(PLAIN, p) for p in paths}
    for x in elements:
        assert any(np.array_equal(patches.apply_symmetry(fresh[tuple(sorted(x.shape[:3]))], i), x)
                   for i in range(48))
    list(datasets.volume_dataset(paths, volume_input=PLAIN, augment=True, seed=3,
                                 shuffle=True, repeat=True).take(12))
    # Two streams of 12 = four shuffled passes each; the parallel reads in flight (and those
    # prefetched past the 12th element) may read a path once more.
    slack = 2 * 2 * datasets.VOLUME_PREFETCH
    if budget_volumes == 3:  # all fit: about one read each per stream
        assert set(reads) == {p.stem for p in paths} and len(reads) <= 2 * len(paths) + slack
    else:  # only the first volume read is kept: the other two at each of their 4 visits
        assert len(reads) >= 2 * 2 * 4


def test_volume_dataset_rejects_missing_labels(paths):
    with pytest.raises(LabelsError, match="received none for"):
        datasets.volume_dataset(paths, {"a": 1}, volume_input=PLAIN)
    with pytest.raises(LabelsError, match="expected one label per volume"):
        datasets.volume_dataset(paths, [1, 0], volume_input=PLAIN)


def test_volume_dataset_augment_is_a_cube_symmetry(paths):
    """Each visit shows the volume under exactly one of the 48 symmetries, not always the same."""
    reference = PLAIN.read(paths[0])
    stream = datasets.volume_dataset(paths[:1], volume_input=PLAIN, augment=True, seed=1,
                                     repeat=True)
    seen = []
    for x in stream.take(8):
        x = x[0].numpy()
        matches = [
            i for i in range(48)
            if patches.apply_symmetry(reference, i).shape == x.shape
            and np.array_equal(patches.apply_symmetry(reference, i), x)
        ]
        assert len(matches) == 1
        seen.append(matches[0])
    assert len(set(seen)) >= 4 and set(seen) != {0}


def test_augmentation_on_an_anisotropic_grid_never_moves_its_coarse_axis(tmp_path, monkeypatch):
    """Volumes of 1 × 2 × 1 mm: the volume stream and the patch reader draw only symmetries
    that leave y in place (a transpose of y and z would squash the anatomy)."""
    rng = np.random.default_rng(2)
    hu, lung = _phantom((30, 40, 40), rng)
    path = volumes.volume_path(tmp_path, "coarse")
    volumes.write_volume(path, hu, lung, (1, 2, 1), (0, 0, 0))
    kept = set(patches.symmetries_for((1.0, 2.0, 1.0)))
    drawn = []
    apply_symmetry = patches.apply_symmetry
    monkeypatch.setattr(patches, "apply_symmetry",
                        lambda volume, index: drawn.append(int(index)) or apply_symmetry(volume,
                                                                                         index))
    datasets.read_patches(path, patch_size=PATCH, count=40, rng=np.random.default_rng(0))
    assert len(drawn) == 40 and set(drawn) <= kept and len(set(drawn)) > 8
    drawn.clear()
    coarse = VolumeInput(spacing_mm=(1, 2, 1), mask_outside_lungs=False)
    for _ in datasets.volume_dataset([path], volume_input=coarse, augment=True, seed=1,
                                     repeat=True).take(20):
        pass
    assert len(drawn) >= 20 and set(drawn) <= kept and len(set(drawn)) > 4  # prefetch: more


def test_stratified_folds_are_disjoint_balanced_and_seeded():
    from kdsb.data.datasets import stratified_folds

    ids = [f"p{i:02d}" for i in range(23)]
    labels = {i: int(n % 3 == 0) for n, i in enumerate(ids)}  # 8 positives, 15 negatives
    folds = stratified_folds(ids, labels, 4, seed=1)
    assert sorted(sum(folds, [])) == ids  # every patient once
    assert sorted(len(f) for f in folds) == [5, 6, 6, 6]
    assert sorted(sum(labels[i] for i in f) for f in folds) == [2, 2, 2, 2]
    assert stratified_folds(list(reversed(ids)), labels, 4, seed=1) == folds
    assert stratified_folds(ids, labels, 4, seed=2) != folds
    with pytest.raises(LabelsError, match="at least 9 patients of class 1 for 9 folds"):
        stratified_folds(ids, labels, 9)
    with pytest.raises(KdsbError, match="at least 2 folds"):
        stratified_folds(ids, labels, 1)
    with pytest.raises(LabelsError, match="received none for \\['p00'\\]"):
        stratified_folds(ids, {i: 0 for i in ids[1:]}, 2)
    with pytest.raises(LabelsError, match="expected labels 0 or 1, received {'p00': 2}"):
        stratified_folds(ids, {**labels, "p00": 2}, 2)
