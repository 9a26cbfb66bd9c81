"""A patch cache that feeds a GPU: lung patches extracted once per data folder, then sampled from
memory-mapped shards with whole-batch cube symmetries.

Streaming patches from HDF5 (`kdsb.data.datasets.patch_dataset`) decompresses chunks and samples
lung voxels on every visit: a few hundred patches per second on two cores, far below what a
GPU consumes. The cache moves that work to a one-off pass:

- `build_patch_cache` takes `per_volume` lung-centred patches of every volume once (the
  patches `read_patches` gives with the same generator (seeded by the cache's seed and the
  volume's id) and no augmentation, but from the whole
  volume read at once: 1.6–2.3× faster than reading each patch by slicing the file) into one
  float16 `.npy` shard per volume under `cache_dir/<settings>/`, written atomically (a killed
  build's temporary is swept by the next build once an hour old). A shard is
  reused while its volume file keeps its size and modification time and the settings (patch
  size, count, seed, lung fraction) are the same; otherwise it is rebuilt. The record of built
  shards (`key.json`) is saved every few seconds and when the build ends or fails, so a killed
  build resumes with the shards recorded (at most the last seconds' shards are rebuilt). A
  damaged shard or record (a partial copy, a disk fault) is rebuilt, with a warning.
- `cached_patch_dataset` memory-maps the shards (the operating system pages them in and out, so
  memory stays flat for any cohort size) and makes each batch with one gather of random
  (volume, patch) pairs and one random cube symmetry for the whole batch (a transpose and flips
  of the batch array, 48 possibilities on an isotropic grid): a few milliseconds per batch.

The price: each volume contributes a fixed set of `per_volume` patches (times its symmetries)
instead of fresh positions on every visit; choose `per_volume` large (hundreds) for long runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.data import patches
from kdsb.errors import KdsbError, one_line
from kdsb.io import volumes
from kdsb.io.atomic import atomic_path, remove_stale_temporaries

logger = logging.getLogger(__name__)

CACHE_DTYPE = np.float16  # normalised HU in [-1, 1.86]: float16 keeps 3 significant digits
# How a volume's patches are drawn (in the settings, so a cache of another rule is not reused):
# from the seed and the volume's id.
DRAW_RULE = "seed-and-id"
SHARD_SUFFIX = ".npy"
KEY_NAME = "key.json"
# Open files kept beside the shards' maps (the process's own, TensorFlow's, HDF5 files).
OTHER_OPEN_FILES = 256
# Seconds between saves of key.json: rewriting it after every shard made a 1,600-volume build
# quadratic in the cohort.
KEY_SAVE_SECONDS = 5.0
# A shard's temporary not written to for this long was left by a killed build (a shard is
# written in seconds; the workers of a multi-machine run share the folder, so age is the test).
STALE_SHARD_SECONDS = 3600.0


def _settings_dir(cache_dir: Path, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"p{settings['patch_size']}_n{settings['per_volume']}_{digest}"


def _source_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _intact_shard(shard: Path, shape: tuple[int, ...]) -> bool:
    """Whether a shard opens as a float16 array of `shape` (n, P, P, P) (a cut-off copy does
    not: found by a user's check, it stopped training with numpy's traceback)."""
    try:
        array = np.load(shard, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == shape and array.dtype == CACHE_DTYPE


def _read_keys(key_path: Path) -> dict:
    """The record of built shards; empty (every shard checked and rebuilt) when missing or
    damaged."""
    if not key_path.is_file():
        return {}
    try:
        keys = json.loads(key_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s: unreadable (%s); its shards are rebuilt", key_path, one_line(error))
        return {}
    return keys if isinstance(keys, dict) else {}


def volume_patches(
    path: Path, patch_size: int, count: int, rng: np.random.Generator, min_lung_fraction: float
) -> np.ndarray:
    """`count` lung-centred patches (count, P, P, P) float32 normalised HU of one volume file:
    `read_patches(..., sampling="lung", augment=False)`, but the HU volume is read whole once
    (one pass over its compressed chunks) instead of slice by slice for every patch."""
    with volumes.open_volume(path) as f:
        hu = f[volumes.HU_DATASET][...]
        mask = f[volumes.MASK_DATASET][...]
    corners = patches.sample_patch_corners(mask, count, patch_size, rng,
                                           min_lung_fraction=min_lung_fraction,
                                           source=str(path))
    return np.stack([patches.normalize_hu(patches.extract_patch(hu, corner, patch_size))
                     for corner in corners])


def build_patch_cache(
    paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    *,
    patch_size: int = 32,
    per_volume: int = 256,
    seed: int = 0,
    min_lung_fraction: float = patches.DEFAULT_MIN_LUNG_FRACTION,
) -> list[Path]:
    """Extract (or reuse) the cached patches of every volume; returns the shard paths in order.

    Args:
        paths: kdsb volume files.
        cache_dir: folder of the cache (created if needed).
        patch_size: patch edge in voxels.
        per_volume: patches kept per volume.
        seed: seed of the patch positions (a volume's draw also depends on its id, never on
            its place in `paths`: a shard reused by a run of other volumes is the one a fresh
            build would draw).
        min_lung_fraction: see `kdsb.data.patches.sample_patch_corners`.
    """
    if per_volume < 1:
        raise KdsbError(f"expected at least 1 cached patch per volume, received {per_volume}")
    settings = {"patch_size": int(patch_size), "per_volume": int(per_volume), "seed": int(seed),
                "min_lung_fraction": float(min_lung_fraction), "draw": DRAW_RULE}
    folder = _settings_dir(Path(cache_dir), settings)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, idle_seconds=STALE_SHARD_SECONDS)
    key_path = folder / KEY_NAME
    keys = _read_keys(key_path)
    shape = (int(per_volume), *(int(patch_size),) * 3)

    def save_keys() -> None:
        with atomic_path(key_path) as temp:
            temp.write_text(json.dumps(keys, indent=1, sort_keys=True))

    shards, saved_at, unsaved = [], time.monotonic(), False
    try:
        for path in tqdm(paths, desc="patch cache", unit="volume", disable=None):
            path = Path(path)
            shard = folder / f"{path.stem}{SHARD_SUFFIX}"
            source = _source_key(path)
            recorded = keys.get(path.stem) == source and shard.is_file()
            if recorded and not _intact_shard(shard, shape):
                logger.warning("%s: damaged; rebuilding it", shard)
                recorded = False
            if not recorded:
                rng = np.random.default_rng([int(seed), zlib.crc32(path.stem.encode())])
                found = volume_patches(path, patch_size, per_volume, rng, min_lung_fraction)
                with atomic_path(shard) as temp:
                    np.save(temp, found.astype(CACHE_DTYPE))
                keys[path.stem], unsaved = source, True
                if time.monotonic() - saved_at > KEY_SAVE_SECONDS:
                    save_keys()
                    saved_at, unsaved = time.monotonic(), False
            shards.append(shard)
    finally:
        if unsaved:
            save_keys()
    return shards


def sample_batch(
    shards: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator,
    symmetries: Sequence[int] = (),
) -> np.ndarray:
    """One batch (batch, P, P, P, 1) float32: random patches of random shards, and one cube
    symmetry for the whole batch drawn from `symmetries` (indices into `CUBE_SYMMETRIES`; none:
    no augmentation)."""
    volume = rng.integers(len(shards), size=batch_size)
    order = np.argsort(volume, kind="stable")  # memory-mapped reads grouped by shard
    batch = np.empty((batch_size, *shards[0].shape[1:]), dtype=np.float32)
    for i in order:
        shard = shards[volume[i]]
        batch[i] = shard[rng.integers(len(shard))]
    if len(symmetries):  # the batch axis moved last, where apply_symmetry leaves it alone
        symmetry = patches.random_symmetry(rng, symmetries)
        moved = patches.apply_symmetry(np.moveaxis(batch, 0, -1), symmetry)
        batch = np.ascontiguousarray(np.moveaxis(moved, -1, 0))
    return batch[..., np.newaxis]


def allow_open_files(count: int) -> None:
    """Let this process hold `count` open files: each memory-mapped shard keeps one for the
    whole run, and 1,024 (a common soft limit) is under a DSB cohort's ~1,300 training shards.
    The soft limit is raised toward the hard one (no root needed).

    Raises:
        KdsbError: the hard limit is lower than `count`.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        raise KdsbError(f"expected to open {count} files (one per patch-cache shard, and "
                        f"others), received a hard limit of {hard} (`ulimit -Hn`): raise it, "
                        "or train without --patch-cache")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def cached_patch_dataset(
    shard_paths: Sequence[str | os.PathLike],
    *,
    spacing: Sequence[float] | None,
    batch_size: int = 16,
    augment: bool = True,
    seed: int = 0,
):
    """An endless tf.data.Dataset of (x, x) batches, x float32 (batch, P, P, P, 1), drawn from
    the memory-mapped shards of `build_patch_cache` (the GMCAE's input, as `patch_dataset`);
    with `augment`, one cube symmetry a batch of those that keep `spacing` (the volumes' (z, y,
    x) mm, asked for: shards do not record it; None takes any grid as isotropic: all 48)."""
    import tensorflow as tf

    if not shard_paths:
        raise KdsbError("expected at least one patch cache shard, received none")
    allow_open_files(len(shard_paths) + OTHER_OPEN_FILES)
    shards = []
    for path in shard_paths:
        try:
            shards.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError, EOFError) as error:
            raise KdsbError(f"{path}: expected a patch cache shard, received an unreadable one "
                            f"({one_line(error)}): delete it and run again") from error
    size = shards[0].shape[1:]
    symmetries = patches.symmetries_for(spacing) if augment else ()

    def make(step):
        rng = np.random.default_rng([seed, int(step)])
        return sample_batch(shards, batch_size, rng, symmetries)

    def load(step):
        x = tf.numpy_function(make, [step], tf.float32, stateful=False)
        x.set_shape((batch_size, *size, 1))
        return x, x

    return tf.data.Dataset.counter().map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True).prefetch(tf.data.AUTOTUNE)
