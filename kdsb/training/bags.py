"""Bags of frozen GMCAE features for the MIL heads: computed once per volume, cached, streamed.

The MIL heads (`kdsb.models.mil`) train on frozen features of the GMCAE (`instance_features`:
the encoder's output cells for `--head mil`, each patch's mixture NLL for `--head nll`), so the
GMCAE runs once per volume and cube symmetry, not once per epoch. Each patient's bag is a
float16 array (symmetries, instances, channels), saved as `<cache>/<id>-<key>.npy` where the key
hashes what the features depend on (the volume file's size and modification time, the GMCAE
file's, the `VolumeInput`, the symmetries, the head and the encoder block): a changed volume
or model gets new features, a killed run keeps the bags it finished (each file is written
atomically), and stale files are removed. The cache is shared by the folds of a cross-validated
run (same GMCAE, same volumes).

Training streams one bag per patient per step of the batch (a random one of its symmetries),
padded to the largest bag of the batch with a mask of the real instances; memory holds only
the batch, so it stays flat on large cohorts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.data.inputs import VolumeInput
from kdsb.data.patches import apply_symmetry
from kdsb.io.atomic import atomic_path

logger = logging.getLogger(__name__)

BAG_DTYPE = np.float16


def _file_stamp(path: str | os.PathLike) -> list:
    stat = Path(path).stat()
    return [os.fspath(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def bag_key(volume: str | os.PathLike, gmcae: str | os.PathLike, volume_input: VolumeInput,
            symmetries: Sequence[int], head: str, block: int, precision: str = "float32") -> str:
    """A short hash of everything a patient's bag depends on; `precision` is the Keras dtype
    policy the encoder computes in (head "mil"; the NLL features are always float32)."""
    # A float32 bag of head "mil" keeps the key of runs made before head "nll" existed.
    what = block if head == "mil" else [head, block]
    if head == "mil" and precision != "float32":  # found in review: bfloat16 bags were reused
        what = [block, precision]
    payload = json.dumps(
        [_file_stamp(volume), _file_stamp(gmcae), volume_input.to_config(), list(symmetries),
         what],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def instance_features(gmcae: str | os.PathLike, head: str, block: int) -> Any:
    """The frozen model turning a prepared volume (1, z, y, x, 1) into a MIL bag: the GMCAE
    encoder's cells of `block` (head "mil") or each patch's GMCAE NLL (head "nll")."""
    from kdsb.models.classifier import load_encoder_from_gmcae, load_gmcae
    from kdsb.models.mil import encoder_instances
    from kdsb.models.nll import patch_nll_features

    if head == "nll":
        return patch_nll_features(load_gmcae(gmcae))
    return encoder_instances(load_encoder_from_gmcae(gmcae), block)


def encode_bags(
    volumes: Mapping[str, str | os.PathLike],
    gmcae: str | os.PathLike,
    volume_input: VolumeInput,
    symmetries: Sequence[int],
    cache_dir: str | os.PathLike,
    *,
    head: str,
    block: int,
) -> dict[str, Path]:
    """The bag file of every patient, computing the missing ones.

    Args:
        volumes: patient id → volume file.
        gmcae: the trained GMCAE that makes the features.
        head: "mil" or "nll" (see `instance_features`).
        block: the encoder block whose output cells are the instances (head "mil").
        volume_input: how a volume becomes the network input.
        symmetries: cube symmetry indices (`kdsb.data.patches.CUBE_SYMMETRIES`) encoded per
            volume; the first is the one validation and statistics use.
        cache_dir: the bag folder (created).

    Returns:
        Patient id → `.npy` file of float16 (len(symmetries), instances, channels).
    """
    import keras

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    precision = keras.config.dtype_policy().name  # the run's (`runs.begin` set it)
    files = {
        pid: cache_dir / f"{pid}-{key}.npy"
        for pid, path in volumes.items()
        if (key := bag_key(path, gmcae, volume_input, symmetries, head, block, precision))
    }
    missing = [pid for pid, file in files.items() if not _whole(file, len(symmetries))]
    _remove_stale(cache_dir, files)
    if missing:
        from kdsb.models.nll import check_holds_a_patch, smallest_input

        encoder = instance_features(gmcae, head, block)
        patch = smallest_input(encoder)  # 1 for head "mil": every volume holds a cell
        for pid in tqdm(missing, desc="encode", unit="patient", disable=None):
            x = volume_input.read(volumes[pid])
            check_holds_a_patch(volumes[pid], x.shape[:3], patch)
            bag = np.stack([_encode(encoder, apply_symmetry(x, s)) for s in symmetries])
            with atomic_path(files[pid]) as temp, temp.open("wb") as f:
                np.save(f, bag.astype(BAG_DTYPE))
    logger.info("%d bags in %s (%d computed now)", len(files), cache_dir, len(missing))
    return files


def _whole(file: Path, symmetries: int) -> bool:
    """Whether `file` is a readable bag of `symmetries` encodings. Bags are written atomically,
    so a damaged one comes from outside (a full disk, a copy cut short): computed again."""
    if not file.is_file():
        return False
    try:
        bag = np.load(file, mmap_mode="r")
        if bag.ndim == 3 and bag.shape[0] == symmetries:
            return True
    except (OSError, ValueError, EOFError):
        pass
    logger.warning("%s: a damaged bag file, computed again", file)
    return False


def _encode(encoder: Any, x: np.ndarray) -> np.ndarray:
    """Features of one prepared volume (z, y, x, 1) as instances (instances, channels)."""
    features = np.asarray(encoder(np.ascontiguousarray(x)[np.newaxis], training=False))
    return features.reshape(-1, features.shape[-1])


def _remove_stale(cache_dir: Path, keep: Mapping[str, Path]) -> None:
    """Remove bags of these patients under another key (a changed volume or model)."""
    wanted = {file.name for file in keep.values()}
    for pid in keep:
        for file in cache_dir.glob(f"{pid}-*.npy"):
            if file.name not in wanted and file.stem.rsplit("-", 1)[0] == pid:
                file.unlink(missing_ok=True)


def feature_statistics(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance over the instances of the first symmetry of every bag."""
    total = total_sq = None
    count = 0
    for file in files:
        instances = np.load(file, mmap_mode="r")[0].astype(np.float64)
        total = instances.sum(0) if total is None else total + instances.sum(0)
        squares = (instances**2).sum(0)
        total_sq = squares if total_sq is None else total_sq + squares
        count += instances.shape[0]
    mean = total / count
    return mean.astype(np.float32), np.maximum(total_sq / count - mean**2, 0.0).astype(np.float32)


def bag_dataset(
    files: Sequence[Path],
    labels: Sequence[int],
    *,
    batch_size: int,
    weights: Mapping[int, float] | None = None,
    seed: int = 0,
    augment: bool = False,
    shuffle: bool = False,
    repeat: bool = False,
) -> Any:
    """A tf.data stream of padded bag batches for the MIL head.

    Args:
        files: bag files (`encode_bags`), one per patient.
        labels: the patients' 0/1 labels.
        batch_size: bags per batch.
        weights: class → sample weight (None: no weights).
        seed: seed of the order and of the symmetry drawn per visit.
        augment: draw one of the bag's symmetries per visit (else always the first).
        shuffle: a new random order every pass.
        repeat: cycle forever.

    Returns:
        tf.data.Dataset of ((instances (batch, n, channels) float32, mask (batch, n) float32),
        labels (batch, 1)) and, with `weights`, sample weights (batch,).
    """
    import tensorflow as tf

    files = [os.fspath(f) for f in files]
    channels = int(np.load(files[0], mmap_mode="r").shape[-1])
    label_array = np.asarray(labels, dtype=np.float32)
    weight_of = weights or {0: 1.0, 1: 1.0}

    def generate():
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(files)) if shuffle else np.arange(len(files))
            for index in order:
                bag = np.load(files[index], mmap_mode="r")
                symmetry = rng.integers(bag.shape[0]) if augment else 0
                instances = np.asarray(bag[symmetry], dtype=np.float32)
                label = label_array[index]
                mask = np.ones(len(instances), np.float32)
                yield (instances, mask), [label], weight_of[int(label)]
            if not repeat:
                return

    signature = (
        (tf.TensorSpec((None, channels), tf.float32), tf.TensorSpec((None,), tf.float32)),
        tf.TensorSpec((1,), tf.float32),
        tf.TensorSpec((), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.padded_batch(batch_size)
    if weights is None:
        ds = ds.map(lambda x, y, w: (x, y))
    return ds.prefetch(2)
