"""tf.data input pipelines: 3D patches for the GMCAE and whole volumes for the classifier.

Both read kdsb HDF5 volume files (see `kdsb.io.volumes`) lazily, one volume at a time, so memory
stays bounded whatever the cohort size (the classifier's streams keep the volumes they read, up to
`VOLUME_CACHE_BYTES`). TensorFlow is imported inside the functions that build
pipelines, so importing this module stays cheap. Arrays are (z, y, x[, channels]); values fed to
networks are HU normalised by `kdsb.data.patches.normalize_hu`; whole volumes are prepared by
`kdsb.data.inputs.VolumeInput`.

Determinism: every random choice (volume order, patch positions, symmetries) comes from NumPy
generators or tf.data ops seeded from `seed`, and parallel maps keep their order, so the same
arguments give the same stream.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kdsb.data import patches
from kdsb.data.inputs import VolumeInput
from kdsb.errors import KdsbError, LabelsError
from kdsb.io import volumes

# TensorFlow turns an exception raised inside a pipeline's Python reader (tf.numpy_function)
# into an error whose message is that reader's traceback; the reader's own error is kept here
# for the command line to report in one line (`pipeline_error`).
_pipeline_errors: list[KdsbError] = []

SAMPLINGS = ("lung", "grid")
DEFAULT_SHUFFLE_BUFFER = 256
# Whole volumes are large (tens of MB as float32): load at most this many ahead of the model.
VOLUME_PREFETCH = 2
# Prepared volumes a classifier pipeline keeps in memory, in bytes: a small cohort's (24
# phantoms at 2 mm: ~50 MB) are read once instead of once an epoch (reading and preparing one
# cost ~30 % of an SPP epoch's CPU there); a large one is read from disk as before once this
# much is held (a DSB volume at 1 mm is ~170 MB).
VOLUME_CACHE_BYTES = 2 << 30


def split_patients(
    ids: Sequence[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: Mapping[str, int] | None = None,
) -> tuple[list[str], list[str]]:
    """Split patient ids into training and validation sets, by patient, reproducibly.

    The result depends only on the set of ids, `val_fraction`, `seed` (and `labels`), not on the
    order of `ids`. With labels the split is stratified: each class contributes
    round(val_fraction × its size) patients to validation, at least one when the class has two
    or more patients (one always stays in training).

    Args:
        ids: patient ids (unique).
        val_fraction: fraction in [0, 1) of patients for validation.
        seed: random seed.
        labels: optional id → 0/1 label for every id.

    Returns:
        (train_ids, val_ids), each sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise KdsbError(f"expected val_fraction in [0, 1), received {val_fraction}")
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise KdsbError(f"expected unique patient ids, received {len(ids) - len(unique)} repeats")
    if labels is None:
        groups = [unique]
    else:
        missing = [i for i in unique if i not in labels]
        if missing:
            raise LabelsError(
                f"expected a label for every patient, received none for {missing[:5]}"
            )
        bad = {i: labels[i] for i in unique if labels[i] not in (0, 1)}
        if bad:
            raise LabelsError(f"expected labels 0 or 1, received {dict(list(bad.items())[:5])}")
        groups = [[i for i in unique if labels[i] == c] for c in (0, 1)]
    rng = np.random.default_rng(seed)
    val: list[str] = []
    for group in groups:
        n_val = int(round(val_fraction * len(group)))
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        elif len(group) == 1:  # found in review: at --val-fraction > 0.5 it went to validation
            n_val = 0
        order = rng.permutation(len(group))
        val.extend(group[i] for i in order[:n_val])
    val_set = set(val)
    return [i for i in unique if i not in val_set], sorted(val_set)


def stratified_folds(ids: Sequence[str], labels: Mapping[str, int], folds: int, *,
                     seed: int = 0) -> list[list[str]]:
    """Split patients into `folds` disjoint folds of near-equal size and class balance.

    Each class is shuffled (seeded) and dealt round-robin, the positives continuing where the
    negatives stopped, so fold sizes differ by at most one. Like `split_patients`, the result
    depends only on the set of ids, `folds`, `seed` and the labels.

    Returns:
        The folds, each a sorted list of ids; together they hold every id exactly once.

    Raises:
        LabelsError: an id has no 0/1 label, or a class has fewer patients than `folds`.
        KdsbError: fewer than 2 folds, or repeated ids.
    """
    if folds < 2:
        raise KdsbError(f"expected at least 2 folds, received {folds}")
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise KdsbError(f"expected unique patient ids, received {len(ids) - len(unique)} repeats")
    missing = [i for i in unique if i not in labels]
    if missing:
        raise LabelsError(
            f"expected a 0/1 label for every patient, received none for {missing[:5]}"
        )
    bad = {i: labels[i] for i in unique if labels[i] not in (0, 1)}
    if bad:  # found in review: reported as missing
        raise LabelsError(f"expected labels 0 or 1, received {dict(list(bad.items())[:5])}")
    rng = np.random.default_rng(seed)
    assigned: list[list[str]] = [[] for _ in range(folds)]
    dealt = 0
    for c in (0, 1):
        group = [i for i in unique if labels[i] == c]
        if len(group) < folds:
            raise LabelsError(
                f"expected at least {folds} patients of class {c} for {folds} folds, received "
                f"{len(group)}"
            )
        for i in rng.permutation(len(group)):
            assigned[dealt % folds].append(group[i])
            dealt += 1
    return [sorted(fold) for fold in assigned]


def _reporting_errors(reader):
    """`reader`, keeping each KdsbError it raises (an unreadable volume) for `pipeline_error`
    before TensorFlow wraps it."""

    def read(*args):
        try:
            return reader(*args)
        except KdsbError as error:
            _pipeline_errors.append(error)
            raise

    return read


def pipeline_error(raised: BaseException) -> KdsbError | None:
    """The reader's error that `raised` (TensorFlow's, while a pipeline was consumed) carries in
    its message, or None; every kept error is forgotten."""
    found = next((error for error in _pipeline_errors if str(error) in str(raised)), None)
    forget_pipeline_errors()
    return found


def forget_pipeline_errors() -> None:
    """Forget the readers' errors kept so far (a new command begins)."""
    _pipeline_errors.clear()


def _check_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise KdsbError("expected at least one kdsb volume file, received none")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise KdsbError(f"expected kdsb volume files, received missing paths {missing[:3]}")
    return paths


class _PreparedVolumes:
    """`VolumeInput.read` of each path, kept in memory until `limit` bytes are held (then
    later paths are read every time), with the spacing it was read at. Returned arrays are
    the kept ones: callers must not write to them."""

    def __init__(self, volume_input: VolumeInput, limit: int):
        self.volume_input, self.limit, self.held = volume_input, limit, 0
        self.kept: dict[str, tuple[np.ndarray, tuple[float, ...]]] = {}

    def get(self, path: str) -> tuple[np.ndarray, tuple[float, ...]]:
        """The prepared volume (z, y, x, 1) float32 and its spacing (z, y, x) in mm."""
        if path in self.kept:
            return self.kept[path]
        x = self.volume_input.read(path)
        spacing = self.volume_input.spacing_mm or tuple(volumes.read_attrs(path)["spacing"])
        if self.held + x.nbytes <= self.limit:  # (two threads may read a path twice: harmless)
            self.kept[path] = (x, spacing)
            self.held += x.nbytes
        return x, spacing


def _visit_rng(seed: int, visit: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(visit)])


def read_patches(
    path: str | os.PathLike,
    *,
    patch_size: int = 32,
    count: int | None = 8,
    sampling: str = "lung",
    augment: bool = True,
    rng: np.random.Generator,
    min_lung_fraction: float = patches.DEFAULT_MIN_LUNG_FRACTION,
) -> np.ndarray:
    """Read normalised patches from one volume file (one visit of the patch pipeline).

    The file is opened once; the lung mask is read once (lung sampling only) and each patch is
    read by slicing, so the HU volume is never loaded whole.

    Args:
        path: kdsb volume file.
        patch_size: patch edge in voxels.
        count: patches to read; with grid sampling None reads every grid patch in order.
        sampling: "lung" (centred on lung voxels) or "grid" (random cells of a regular grid).
        augment: apply a random cube symmetry to each patch (of those that keep the volume's
            spacing, `kdsb.data.patches.symmetries_for`).
        rng: NumPy random generator.
        min_lung_fraction: see `kdsb.data.patches.sample_patch_corners`.

    Returns:
        float32 array (count, P, P, P) of normalised HU.
    """
    _check_sampling(sampling, count, "count")  # found in review: unchecked on this path
    with volumes.open_volume(path) as f:
        hu = f[volumes.HU_DATASET]
        if sampling == "lung":
            corners = patches.sample_patch_corners(
                f[volumes.MASK_DATASET][...], count, patch_size, rng,
                min_lung_fraction=min_lung_fraction, source=str(path),
            )
        else:
            corners = patches.grid_patch_corners(hu.shape, patch_size)
            if count is not None:
                chosen = rng.choice(len(corners), size=count, replace=count > len(corners))
                corners = corners[chosen]
        out = np.empty((len(corners),) + (patch_size,) * 3, dtype=np.float32)
        allowed = patches.symmetries_for(f.attrs["spacing"]) if augment else ()
        for i, corner in enumerate(corners):
            patch = patches.normalize_hu(patches.extract_patch(hu, corner, patch_size))
            if augment:
                patch = patches.apply_symmetry(patch, patches.random_symmetry(rng, allowed))
            out[i] = patch
    return out


def _check_sampling(sampling: str, count: int | None, name: str) -> None:
    """Refuse a sampling other than `SAMPLINGS`, or a patch `count` (named `name`) below 1;
    None (every grid patch) only with grid sampling."""
    if sampling not in SAMPLINGS:
        raise KdsbError(f"expected sampling in {SAMPLINGS}, received {sampling!r}")
    if count is None and sampling != "grid":
        raise KdsbError(f"expected {name} >= 1 for lung sampling, received None")
    if count is not None and count < 1:
        raise KdsbError(f"expected {name} >= 1, received {count}")


def patch_dataset(
    paths: Sequence[str | os.PathLike],
    *,
    patch_size: int = 32,
    batch_size: int = 16,
    patches_per_volume: int | None = 8,
    sampling: str = "lung",
    augment: bool = True,
    seed: int = 0,
    repeat: bool = True,
    num_parallel_calls: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    min_lung_fraction: float = patches.DEFAULT_MIN_LUNG_FRACTION,
    cycle_length: int | None = None,
):
    """The GMCAE's input: batches of normalised 3D patches, streamed from volume files.

    Volumes are visited in a shuffled order (reshuffled each pass); each visit opens one file
    and reads `patches_per_volume` patches by slicing (see `read_patches`), several visits in
    parallel. Patches then pass a shuffle buffer (mixing patients within a batch), are batched
    and prefetched. Memory is bounded by the buffer, about `shuffle_buffer` patches plus one
    lung mask per parallel visit, whatever the number of volumes.

    Args:
        paths: kdsb volume files (symlinks allowed).
        patch_size: patch edge in voxels.
        batch_size: patches per batch.
        patches_per_volume: patches read per visit of a volume; with grid sampling None reads
            every grid patch (an ordered pass over whole volumes, e.g. for evaluation).
        sampling: "lung" (patches centred on lung voxels) or "grid" (blind regular grid).
        augment: random cube symmetry per patch (one of 48 on an isotropic grid,
            `kdsb.data.patches.symmetries_for`).
        seed: random seed of volume order, patch positions, symmetries and shuffling.
        repeat: cycle forever (training); False gives one pass over the volumes.
        num_parallel_calls: parallel volume visits; default tf.data.AUTOTUNE.
        shuffle_buffer: patches in the shuffle buffer (0 or 1 disables shuffling).
        min_lung_fraction: see `kdsb.data.patches.sample_patch_corners`.
        cycle_length: volumes visited at once, interleaved; default one per core (at least 2).
            The patches' order, and so which patches come first, depends on it: pass a number
            for a stream that must be the same on every machine.

    Returns:
        tf.data.Dataset of (x, x), x float32 (batch, P, P, P, 1); the GMCAE's loss takes the
        patch itself as y_true. The last batch may be smaller when `repeat` is False.

    Reads run Python (h5py) in tf.data's threads: drop iterators over a repeating dataset
    (`del it`) before the interpreter exits, or exit can block. `model.fit` and temporary
    iterators (`next(iter(ds))`) release theirs themselves.
    """
    import tensorflow as tf

    paths = _check_paths(paths)
    _check_sampling(sampling, patches_per_volume, "patches_per_volume")
    if patch_size < 1 or batch_size < 1:
        raise KdsbError(
            f"expected patch_size and batch_size >= 1, received {patch_size} and {batch_size}"
        )
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls

    def visit(path, index):
        return read_patches(
            path.decode(),
            patch_size=patch_size,
            count=patches_per_volume,
            sampling=sampling,
            augment=augment,
            rng=_visit_rng(seed, index),
            min_lung_fraction=min_lung_fraction,
        )

    def load(index, path):
        x = tf.numpy_function(_reporting_errors(visit), [path, index], tf.float32,
                              stateful=False)
        x.set_shape((patches_per_volume,) + (patch_size,) * 3)
        return tf.data.Dataset.from_tensor_slices(x[..., tf.newaxis])

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate().interleave(
        load,
        cycle_length=min(len(paths), cycle_length or max(2, os.cpu_count() or 1)),
        num_parallel_calls=parallel,
        deterministic=True,
    )
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=repeat)
    return ds.map(lambda x: (x, x)).prefetch(tf.data.AUTOTUNE)


def _label_list(
    paths: list[str], labels: Sequence[float] | Mapping[str, float] | None
) -> list[float] | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        ids = [Path(p).stem for p in paths]
        missing = [i for i in ids if i not in labels]
        if missing:
            raise LabelsError(f"expected a label for every volume, received none for {missing[:5]}")
        labels = [labels[i] for i in ids]
    if len(labels) != len(paths):
        raise LabelsError(
            f"expected one label per volume ({len(paths)}), received {len(labels)} labels"
        )
    bad = [v for v in labels if v not in (0, 1)]
    if bad:
        raise LabelsError(f"expected labels 0 or 1, received {bad[:5]}")
    return [float(v) for v in labels]


def volume_dataset(
    paths: Sequence[str | os.PathLike],
    labels: Sequence[float] | Mapping[str, float] | None = None,
    *,
    volume_input: VolumeInput,
    augment: bool = False,
    seed: int = 0,
    shuffle: bool = False,
    repeat: bool = False,
):
    """The classifier's input: whole volumes, one at a time (batch 1, sizes vary).

    Each element is read by `volume_input.read`, once while the volumes read fit in
    `VOLUME_CACHE_BYTES` (`_PreparedVolumes`); at most `VOLUME_PREFETCH` volumes are held ahead
    of the model.

    Args:
        paths: kdsb volume files (symlinks allowed).
        labels: None, one 0/1 label per path, or a mapping patient id (file stem) → 0/1.
        augment: random cube symmetry per volume (one of 48 on an isotropic grid,
            `kdsb.data.patches.symmetries_for`).
        volume_input: how a volume file becomes the network input.
        seed: random seed of order and symmetries.
        shuffle: visit volumes in a random order (reshuffled each pass).
        repeat: cycle forever.

    Returns:
        tf.data.Dataset of x float32 (1, z, y, x, 1), or of (x, y) with y float32 (1, 1) when
        labels are given.
    """
    import tensorflow as tf

    paths = _check_paths(paths)
    label_values = _label_list(paths, labels)

    prepared = _PreparedVolumes(volume_input, VOLUME_CACHE_BYTES)

    def visit(path, index):
        x, spacing = prepared.get(path.decode())
        if augment:
            symmetry = patches.random_symmetry(_visit_rng(seed, index),
                                               patches.symmetries_for(spacing))
            x = patches.apply_symmetry(x, symmetry)
        # A copy, never the kept array itself: TensorFlow may reuse a tensor's buffer in place.
        return np.array(x, copy=True, order="C")

    def load(index, element):
        path = element[0] if label_values is not None else element
        x = tf.numpy_function(_reporting_errors(visit), [path, index], tf.float32,
                              stateful=False)
        x.set_shape((None, None, None, 1))
        if label_values is None:
            return x
        return x, tf.reshape(element[1], (1,))

    elements = paths if label_values is None else (paths, np.asarray(label_values, np.float32))
    ds = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate().map(load, num_parallel_calls=VOLUME_PREFETCH, deterministic=True)
    return ds.batch(1).prefetch(VOLUME_PREFETCH)
